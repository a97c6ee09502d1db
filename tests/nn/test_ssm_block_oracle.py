"""The Mamba and Mamba-2 blocks against a float64 NumPy forward of the published blocks, on the module's own params.

tests/nn/test_ssm.py checks decoding against the full forward and the causality of the blocks: a block that
forgot its gate, convolved the wrong way round or skipped a norm would pass all of it. Here each block is written
out from its paper (Gu & Dao 2023, fig. 3; Dao & Gu 2024, fig. 6) in float64 NumPy, with loops over time, reading
the parameters `init` created (the ones initialised to constants — conv bias, D, norm scale — are perturbed first so
that dropping them shows):

Mamba:    [x, z] = u W_in;  x = SiLU(causal depthwise conv(x));  [dt_low, B, C] = x W_x;
          dt = softplus(dt_low W_dt + b_dt);  selective scan (A = -exp(A_log)) + D x;  out = (y * SiLU(z)) W_out
Mamba-2:  [z, xBC, dt] = u W_in;  xBC = SiLU(causal depthwise conv(xBC));  [x, B, C] = xBC;
          dt = softplus(dt + dt_bias);  SSD with a scalar decay per head + D x;  out = RMSNorm(y * SiLU(z)) W_out

The causal depthwise convolution is PyTorch's conv1d with padding K - 1 keeping the first T outputs, the layout
of the reference implementation: out_t = sum_k w[k] x_{t - (K - 1) + k} + b, so w[K - 1] weighs the current
step. The gated RMSNorm uses seqjax's epsilon 1e-6 (the only constant taken from seqjax). With segment ids the
convolution taps and the scan state do not cross a segment boundary. The blocks run their default scan mode; the
modes themselves are checked against oracles in tests/ops/ssm/test_numpy_oracle.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn import ssm as ssm_nn

D_MODEL, T = 8, 11
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2], [3] * T], np.int32)


def _silu(a):
  return a / (1.0 + np.exp(-a))


def _softplus(a):
  return np.log1p(np.exp(a))


def _conv(x_TF, w_KF, b_F, seg_T):
  """Causal depthwise conv1d (PyTorch layout) that does not reach across a segment boundary."""
  K = w_KF.shape[0]
  out = np.zeros_like(x_TF)
  for t in range(x_TF.shape[0]):
    out[t] = b_F
    for k in range(K):
      s = t - (K - 1) + k
      if s >= 0 and seg_T[s] == seg_T[t]:
        out[t] += w_KF[k] * x_TF[s]
  return out


def mamba_oracle(p, u_BTD, seg_BT, d_state, dt_rank):
  out = np.zeros_like(u_BTD)
  E = p["D"].shape[0]
  A_EP = -np.exp(p["A_log"])
  for b in range(u_BTD.shape[0]):
    xz = u_BTD[b] @ p["in_proj"]["kernel"]
    x, z = xz[:, :E], xz[:, E:]
    x = _silu(_conv(x, p["conv_kernel"], p["conv_bias"], seg_BT[b]))
    dbc = x @ p["x_proj"]["kernel"]
    dt_low, B, C = dbc[:, :dt_rank], dbc[:, dt_rank:dt_rank + d_state], dbc[:, dt_rank + d_state:]
    dt = _softplus(dt_low @ p["dt_proj"]["kernel"] + p["dt_proj"]["bias"])  # [T, E]
    h = np.zeros((E, d_state))
    y = np.zeros((T, E))
    for t in range(T):
      if t > 0 and seg_BT[b, t] != seg_BT[b, t - 1]:
        h[:] = 0.0
      h = np.exp(dt[t][:, None] * A_EP) * h + (dt[t] * x[t])[:, None] * B[t][None, :]
      y[t] = h @ C[t] + p["D"] * x[t]
    out[b] = (y * _silu(z)) @ p["out_proj"]["kernel"]
  return out


def mamba2_oracle(p, u_BTD, seg_BT, d_state, head_dim, eps=1e-6):
  out = np.zeros_like(u_BTD)
  E = p["norm_scale"].shape[0]
  N = E // head_dim
  A_N = -np.exp(p["A_log"])
  for b in range(u_BTD.shape[0]):
    proj = u_BTD[b] @ p["in_proj"]["kernel"]
    z, xbc, dt_raw = proj[:, :E], proj[:, E:2 * E + 2 * d_state], proj[:, 2 * E + 2 * d_state:]
    xbc = _silu(_conv(xbc, p["conv_kernel"], p["conv_bias"], seg_BT[b]))
    x, B, C = xbc[:, :E].reshape(T, N, head_dim), xbc[:, E:E + d_state], xbc[:, E + d_state:]
    dt = _softplus(dt_raw + p["dt_bias"])  # [T, N]
    y = np.zeros((T, N, head_dim))
    for n in range(N):
      h = np.zeros((head_dim, d_state))
      for t in range(T):
        if t > 0 and seg_BT[b, t] != seg_BT[b, t - 1]:
          h[:] = 0.0
        h = np.exp(dt[t, n] * A_N[n]) * h + dt[t, n] * np.outer(x[t, n], B[t])
        y[t, n] = h @ C[t] + p["D"][n] * x[t, n]
    g = y.reshape(T, E) * _silu(z)
    g = g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + eps) * p["norm_scale"]
    out[b] = g @ p["out_proj"]["kernel"]
  return out


def _params(module, u, seed):
  """The module's initialised params, with the constant-initialised ones perturbed so that each one matters."""
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), jnp.asarray(u, jnp.float32)))["params"]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, params)
  for name in ("conv_bias", "D", "norm_scale"):
    if name in params:
      params[name] = params[name] + 0.5 * rng.standard_normal(params[name].shape).astype(np.float32)
  return params


def _as64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _check(module, oracle, packed, seed=0):
  u = np.random.default_rng(seed + 10).standard_normal((2, T, D_MODEL)).astype(np.float32)
  params = _params(module, u, seed)
  seg = SEGMENTS if packed else np.ones((2, T), np.int32)
  got = jax.jit(lambda p, u, s: module.apply({"params": p}, u, segment_ids=s if packed else None))(
      params, jnp.asarray(u), jnp.asarray(seg))
  want = oracle(_as64(params), u.astype(np.float64), seg)
  assert np.max(np.abs(want)) > 0.1
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-5 * np.max(np.abs(want)))


@pytest.mark.parametrize("packed", [False, True])
def test_mamba_block_matches_numpy_forward(packed):
  """Catches (each planted once by monkeypatching seqjax.nn.ssm; both cases failed unless noted): the SiLU(z) gate
  missing, the conv kernel applied flipped (w[0] on the current step), a centred instead of causal conv, the conv
  bias dropped, D dropped, x (not SiLU(x)) fed to the scan, |.| instead of softplus on dt, B and C swapped; the conv
  reaching across a segment boundary (the packed case failed)."""
  module = ssm_nn.Mamba(d_model=D_MODEL, d_state=4, expand=2, d_conv=4, chunk_size=4)  # the default scan mode
  _check(module, lambda p, u, s: mamba_oracle(p, u, s, d_state=4, dt_rank=module.resolved_dt_rank), packed)


@pytest.mark.parametrize("packed", [False, True])
def test_mamba2_block_matches_numpy_forward(packed):
  """Catches (planted once each by monkeypatching seqjax.nn.ssm; both cases failed unless noted): the gate missing,
  the norm missing, the gate applied after the norm (norm(y) * SiLU(z)), the norm scale dropped, the conv kernel
  flipped, a centred conv, the conv bias dropped, a wrong split of the in-projection (dt taken from the front), D
  dropped; the conv reaching across a segment boundary (the packed case failed)."""
  module = ssm_nn.Mamba2(d_model=D_MODEL, d_state=4, expand=2, head_dim=4, d_conv=4, chunk_size=4)
  _check(module, lambda p, u, s: mamba2_oracle(p, u, s, d_state=4, head_dim=4), packed)
