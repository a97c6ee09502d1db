"""The SSM kernels against float64 NumPy written from the papers' equations (no code shared with seqjax.ops.ssm).

The other SSM tests check the modes against each other (sequential = parallel = chunked); a convention shared by
all modes (how B is discretised, where a reset falls, whether D is added, how the initial state enters) would pass
them. These oracles are loops over time written straight from the recurrences:

* selective scan (Mamba S6), with seqjax's documented discretisation (`seqjax.ops.ssm.selective`): A by zero-order
  hold, B by Euler (the Mamba reference code's convention, not ZOH for B):
      h_t = exp(delta_t A) * h_{t-1} + delta_t x_t B_t,     y_t = <h_t, C_t> + D x_t        (per channel)
* SSD (Mamba-2), one scalar decay per head, B and C shared by the heads:
      h_t = exp(dt_t A_n) h_{t-1} + dt_t x_t B_t^T,          y_t = h_t C_t + D_n x_t
* `discretize` against the matrix closed forms (scipy's expm / a linear solve on the diagonal matrix).

A segment reset zeroes the state before the first position of a new segment id; position 0 continues from the
initial state. Gradients are checked as directional derivatives against float64 central differences of the
oracle, so the chunked mode's hand-written backward is checked against something other than autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from seqjax.ops import ssm

SELECTIVE_MODES = ("sequential", "parallel", "chunked")
SSD_MODES = ("sequential", "chunked")
LENGTH, CHUNK = 13, 4  # not a multiple of the chunk; resets below fall on a chunk start (4) and mid-chunk (7, 10)
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4],
                     [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)


def _resets(seg_BL):
  """bool [B, L]: the state is zeroed before this position (never at position 0)."""
  out = np.zeros(seg_BL.shape, bool)
  out[:, 1:] = seg_BL[:, 1:] != seg_BL[:, :-1]
  return out


def selective_oracle(x, delta, A, B, C, D, h0, seg):
  """Mamba S6 in float64, one channel-state pair at a time: y [B, L, E], final state [B, E, P]."""
  x, delta, A, B, C, D, h0 = (np.asarray(a, np.float64) for a in (x, delta, A, B, C, D, h0))
  nb, nl, ne = x.shape
  npp = A.shape[1]
  reset = _resets(seg)
  y = np.zeros((nb, nl, ne))
  h_final = np.zeros((nb, ne, npp))
  for b in range(nb):
    h = h0[b].copy()
    for t in range(nl):
      if reset[b, t]:
        h = np.zeros_like(h)
      for e in range(ne):
        for p in range(npp):
          h[e, p] = np.exp(delta[b, t, e] * A[e, p]) * h[e, p] + delta[b, t, e] * x[b, t, e] * B[b, t, p]
        y[b, t, e] = sum(h[e, p] * C[b, t, p] for p in range(npp)) + D[e] * x[b, t, e]
    h_final[b] = h
  return y, h_final


def ssd_oracle(x, dt, A, B, C, D, h0, seg):
  """Mamba-2 SSD in float64: y [B, L, N, H], final state [B, N, H, P]."""
  x, dt, A, B, C, D, h0 = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D, h0))
  nb, nl, nn, nh = x.shape
  reset = _resets(seg)
  y = np.zeros(x.shape)
  h_final = np.zeros(h0.shape)
  for b in range(nb):
    for n in range(nn):
      h = h0[b, n].copy()  # [H, P]
      for t in range(nl):
        if reset[b, t]:
          h = np.zeros_like(h)
        h = np.exp(dt[b, t, n] * A[n]) * h + dt[b, t, n] * np.outer(x[b, t, n], B[b, t])
        y[b, t, n] = h @ C[b, t] + D[n] * x[b, t, n]
      h_final[b, n] = h
  return y, h_final


def _selective_inputs(seed=0, batch=2, width=3, state=4):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s)  # noqa: E731
  return dict(x=f(batch, LENGTH, width), delta=np.log1p(np.exp(f(batch, LENGTH, width))),  # softplus > 0
              A=-np.exp(0.5 * f(width, state)), B=f(batch, LENGTH, state), C=f(batch, LENGTH, state),
              D=1.0 + f(width), h0=2.0 * f(batch, width, state))


def _ssd_inputs(seed=0, batch=2, heads=2, head_dim=3, state=4):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s)  # noqa: E731
  return dict(x=f(batch, LENGTH, heads, head_dim), dt=np.log1p(np.exp(f(batch, LENGTH, heads))),
              A=-np.exp(0.5 * f(heads)), B=f(batch, LENGTH, state), C=f(batch, LENGTH, state),
              D=1.0 + f(heads), h0=2.0 * f(batch, heads, head_dim, state))


def _close(actual, expected, what, tol=2e-5):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale, err_msg=what)


def _check_directional_derivatives(jax_loss, oracle_loss, inputs, seed, eps=1e-6, tol=2e-4):
  """<grad of jax_loss, v> = (oracle_loss(p + eps v) - oracle_loss(p - eps v)) / 2 eps for a random v per input."""
  grads = jax.grad(jax_loss)({k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()})
  rng = np.random.default_rng(seed)
  for name in inputs:
    v = rng.standard_normal(np.shape(inputs[name]))
    plus = dict(inputs, **{name: inputs[name] + eps * v})
    minus = dict(inputs, **{name: inputs[name] - eps * v})
    numeric = (oracle_loss(plus) - oracle_loss(minus)) / (2 * eps)
    analytic = float(np.sum(np.asarray(grads[name], np.float64) * v))
    scale = float(np.sum(np.abs(np.asarray(grads[name], np.float64) * v))) + 1e-3
    assert abs(analytic - numeric) <= tol * scale, (name, analytic, numeric)


def _check_against_oracle(run, oracle, inputs, mode, *, y_shape, h_shape, seed):
  """`run(params) -> (y, final state)` against `oracle(**params, seg=SEGMENTS)`: forward, final state, and the
  directional derivatives of a random linear functional of both."""
  W = np.random.default_rng(7).standard_normal(y_shape)
  V = np.random.default_rng(8).standard_normal(h_shape)
  y, h = jax.jit(run)({k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()})
  y_ref, h_ref = oracle(**inputs, seg=SEGMENTS)
  _close(y, y_ref, f"y ({mode})")
  _close(h, h_ref, f"final state ({mode})")

  def jax_loss(p):
    y, h = run(p)
    return jnp.sum(y * W) + jnp.sum(h * V)

  def oracle_loss(p):
    y, h = oracle(**p, seg=SEGMENTS)
    return float(np.sum(y * W) + np.sum(h * V))

  _check_directional_derivatives(jax.jit(jax_loss), oracle_loss, inputs, seed=seed)


@pytest.mark.parametrize("mode", SELECTIVE_MODES)
def test_selective_scan_matches_numpy_oracle(mode):
  """Forward (y and final state) and every input's gradient, with D, resets and an initial state.

  Catches (each planted once by monkeypatching seqjax.ops.ssm.selective; every mode failed): B discretised by ZOH
  instead of Euler, a missing D skip, no state reset at a segment change, a reset one step late, the initial state
  ignored; and (chunked only, as only it has a hand-written backward) its gradient of A scaled by 0.5.
  """
  seg = jnp.asarray(SEGMENTS)

  def run(p):
    return ssm.selective_scan(p["x"], p["delta"], p["A"], p["B"], p["C"], p["D"], mode=mode, chunk_size=CHUNK,
                              initial_state=p["h0"], return_final_state=True, segment_ids=seg)

  _check_against_oracle(run, selective_oracle, _selective_inputs(), mode, y_shape=(2, LENGTH, 3),
                        h_shape=(2, 3, 4), seed=11)


@pytest.mark.parametrize("mode", SSD_MODES)
def test_ssd_matches_numpy_oracle(mode):
  """Forward, final state and gradients of Mamba-2's SSD with D, resets and an initial state.

  Catches (planted once each by monkeypatching seqjax.ops.ssm.ssd; both modes failed unless noted): no state reset,
  a missing D skip, the initial state ignored, B by ZOH instead of Euler; chunked only: the intra-chunk decay
  computed from the wrong end, a reset mask that lets two segments of one chunk interact, the incoming state read
  out without its decay to each position.
  """
  seg = jnp.asarray(SEGMENTS)

  def run(p):
    return ssm.ssd(p["x"], p["dt"], p["A"], p["B"], p["C"], p["D"], mode=mode, chunk_size=CHUNK,
                   initial_state=p["h0"], return_final_state=True, segment_ids=seg)

  _check_against_oracle(run, ssd_oracle, _ssd_inputs(), mode, y_shape=(2, LENGTH, 2, 3), h_shape=(2, 2, 3, 4),
                        seed=12)


def test_oracle_inputs_exercise_every_term():
  """The fixed inputs can see the bugs above: dropping D, the initial state or a reset changes y a lot."""
  inputs = _selective_inputs()
  y, _ = selective_oracle(**inputs, seg=SEGMENTS)
  no_reset = selective_oracle(**inputs, seg=np.ones_like(SEGMENTS))[0]
  no_d = selective_oracle(**dict(inputs, D=0 * inputs["D"]), seg=SEGMENTS)[0]
  no_h0 = selective_oracle(**dict(inputs, h0=0 * inputs["h0"]), seg=SEGMENTS)[0]
  for other in (no_reset, no_d, no_h0):
    assert np.max(np.abs(other - y)) > 0.05 * np.max(np.abs(y))


def _closed_form(A_P, dt, method):
  """(A_bar, B_bar) of one diagonal system as matrices: ZOH or bilinear written with expm / inverses, B = I."""
  dtA = dt * np.diag(A_P)
  eye = np.eye(len(A_P))
  if method == "zoh":
    A_bar = scipy.linalg.expm(dtA)
    B_bar = np.linalg.solve(dtA, A_bar - eye) @ (dt * eye)
  else:
    left = eye - dtA / 2
    A_bar = np.linalg.solve(left, eye + dtA / 2)
    B_bar = np.linalg.solve(left, dt * eye)
  return A_bar, B_bar


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_discretize_matches_closed_form(method):
  """S4D's per-channel dt [E, 1] and S5's per-state dt [P], complex diagonal A.

  Catches (planted once each by monkeypatching ssm.discretize): ZOH's B scale replaced by dt (Euler), bilinear's
  A_bar with the sign of dt A / 2 flipped in the denominator, bilinear's B scale without 1 / (1 - dt A / 2).
  """
  rng = np.random.default_rng(3)
  E, P = 3, 5
  A_EP = -np.exp(rng.standard_normal((E, P))) + 1j * np.pi * rng.standard_normal((E, P)) * 3
  dt_E1 = np.exp(rng.uniform(np.log(1e-2), np.log(0.5), (E, 1)))
  dA, scale = ssm.discretize(jnp.asarray(A_EP, jnp.complex64), jnp.asarray(dt_E1, jnp.float32), method)
  for e in range(E):
    A_bar, B_bar = _closed_form(A_EP[e], dt_E1[e, 0], method)
    np.testing.assert_allclose(np.asarray(dA[e]), np.diag(A_bar), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(scale[e]), np.diag(B_bar), rtol=2e-5, atol=2e-6)
    assert np.allclose(A_bar, np.diag(np.diag(A_bar))) and np.allclose(B_bar, np.diag(np.diag(B_bar)))

  dt_P = np.exp(rng.uniform(np.log(1e-2), np.log(0.5), (P,)))
  dA, scale = ssm.discretize(jnp.asarray(A_EP[0], jnp.complex64), jnp.asarray(dt_P, jnp.float32), method)
  for p in range(P):  # a per-state dt: each state is its own 1x1 system
    A_bar, B_bar = _closed_form(A_EP[0, p:p + 1], dt_P[p], method)
    np.testing.assert_allclose(np.asarray(dA[p]), A_bar[0, 0], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(scale[p]), B_bar[0, 0], rtol=2e-5, atol=2e-6)
