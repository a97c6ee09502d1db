"""State-space mixers: S4D, S5, Mamba and Mamba-2 blocks (linen), thin wrappers over `seqjax.ops.ssm`.

Every class here implements the mixer contract of `seqjax.nn.contract` (the LM registers them as "s4d", "s5",
"mamba", "mamba2"):

    y_BTD = mixer(x_BTD, *, segment_ids=None, positions=None, deterministic=True)   # training
    y_BTD, state = mixer(x_BTD, segment_ids=..., return_state=True)                 # prefill: + the state after
                                                                                    # each row's last real token
    state = mixer.init_state(batch_size, max_len, dtype=None)                       # zeros
    y_BD, state = mixer.step(x_BD, state)                                           # one decoding step

(call the methods through `module.apply(params, ..., method=...)`). `segment_ids` [B, T] resets the state where the id
changes (packed documents never see each other; id 0 is padding); `positions` and `deterministic` are accepted for
the contract and unused (no dropout, no position encoding: the recurrence is the position information). States are
float32 (complex64 for S4D/S5) whatever the compute dtype, so step-by-step decoding equals the full forward.
With `return_state` and segment ids, rows are rotated so that each one's last real token comes last
(`contract.right_align`): the scan's final state is then each row's own, whatever its padding.
On a sequence-sharded mesh (mesh.seq > 1, the trainer's `jax.set_mesh`) the training forward runs the convolution
and the scan context-parallel over "seq" (`seqjax.nn.sequence_parallel`, docs/parallelism.md).

Legend: B batch, T length, D model width, E expanded (inner) width, P state size, N heads, H head dim,
W conv width, X a fused projection axis split right after (Mamba x‖z = 2E; Mamba-2 x‖B‖C = E + 2P).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import contract, sequence_parallel
from seqjax.nn.layers import dense_init
from seqjax.ops import ssm as ssm_ops
from seqjax.ops.ssm import context_parallel as cp

Dtype = Any


def _param(module: nn.Module, name: str, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dense(features: int, axes: tuple[str | None, str | None], dtype, param_dtype, name: str,
           use_bias: bool = False) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(dense_init(), axes))


def _symmetric_uniform(limit: float):
  """U(-limit, limit) (`nn.initializers.uniform` is one-sided)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def _log_uniform_init(low: float, high: float):
  """Initialiser drawing exp(U(log low, log high)): log-uniform in [low, high]."""
  def init(key, shape, dtype=jnp.float32):
    return jnp.exp(jax.random.uniform(key, shape, dtype, math.log(low), math.log(high)))
  return init


def _dt_bias_init(dt_min: float, dt_max: float, floor: float = 1e-4):
  """Mamba's dt bias: softplus(bias) is log-uniform in [dt_min, dt_max] (so bias = inverse softplus of dt)."""
  def init(key, shape, dtype=jnp.float32):
    dt = jnp.maximum(_log_uniform_init(dt_min, dt_max)(key, shape, jnp.float32), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _check_segment_ids(segment_ids, x_BTD):
  if segment_ids is not None and segment_ids.shape != x_BTD.shape[:2]:
    raise ValueError(f"segment_ids must be [B, T] = {x_BTD.shape[:2]}, got {segment_ids.shape}")


def causal_depthwise_conv(x_BTE: jax.Array, kernel_WE: jax.Array, bias_E: jax.Array,
                          segment_ids: jax.Array | None = None) -> jax.Array:
  """y_t = sum_k kernel[k] x_{t - (W - 1) + k} + bias, zero before the sequence and across segment boundaries."""
  width, t = kernel_WE.shape[0], x_BTE.shape[1]
  x_pad = jnp.pad(x_BTE, ((0, 0), (width - 1, 0), (0, 0)))
  if segment_ids is not None:
    seg_pad = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
  y_BTE = jnp.zeros_like(x_BTE)
  for k in range(width):
    tap_BTE = x_pad[:, k:k + t] * kernel_WE[k]
    if segment_ids is not None:
      tap_BTE = jnp.where((seg_pad[:, k:k + t] == segment_ids)[..., None], tap_BTE, 0)
    y_BTE = y_BTE + tap_BTE
  return y_BTE + bias_E


def _conv(x_BTE, kernel_WE, bias_E, segment_ids, context_parallel: bool):
  """`causal_depthwise_conv`, on a sequence-sharded mesh with its halo from the left neighbour."""
  if not context_parallel:
    return causal_depthwise_conv(x_BTE, kernel_WE, bias_E, segment_ids)
  return sequence_parallel.shard_sequence(
      lambda x, seg, kernel, bias: sequence_parallel.halo_conv(causal_depthwise_conv, x, kernel, bias, seg),
      (x_BTE, segment_ids), (kernel_WE, bias_E))


def _conv_step(x_BE, window_BWE, kernel_WE, bias_E):
  """One step of the causal conv from its state (the previous W - 1 inputs): (y [B, E], new state)."""
  full_BWE = jnp.concatenate([window_BWE.astype(x_BE.dtype), x_BE[:, None]], axis=1)
  return jnp.einsum("bwe,we->be", full_BWE, kernel_WE) + bias_E, full_BWE[:, 1:].astype(window_BWE.dtype)


def _conv_tail(x_BTE: jax.Array, width: int, segment_ids: jax.Array | None = None) -> jax.Array:
  """The conv state after the last position: the last W - 1 inputs, zeros before the sequence start and, with
  segment ids, for inputs of another segment than the last position's."""
  x_pad = jnp.pad(x_BTE, ((0, 0), (width - 1, 0), (0, 0)))
  tail_BWE = x_pad[:, x_pad.shape[1] - (width - 1):]
  if segment_ids is not None:
    seg_pad = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), constant_values=-1)
    same_BW = seg_pad[:, seg_pad.shape[1] - (width - 1):] == segment_ids[:, -1:]
    tail_BWE = jnp.where(same_BW[..., None], tail_BWE, 0).astype(tail_BWE.dtype)
  return tail_BWE


# ---------------------------------------------------------------------------------------------------------------
# S4D and S5
# ---------------------------------------------------------------------------------------------------------------


S4D_MODES = ("conv", "chunked") + ssm_ops.RECURRENT_MODES


class S4D(nn.Module):
  """S4D mixer: D independent SISO diagonal SSMs (S4D-Lin init), GELU, output projection.

  Training without segment ids runs the FFT convolution; with segment ids (packed sequences) and for prefill the
  chunked form (`s4d_chunked`: a masked Toeplitz inside each chunk, the state passed between chunks), which can
  reset. Decoding keeps the complex state [B, D, P].
  """

  d_model: int
  d_state: int = 32  # P: complex modes per channel (each stands for a conjugate pair)
  discretization: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  # "conv": the FFT convolution (the chunked form where segment ids need resets, and for prefill); "chunked": the
  # chunked form everywhere; "parallel" / "sequential": the recurrence by associative scan / lax.scan everywhere.
  mode: str = "conv"
  chunk_size: int | None = None  # C of the chunked form (None: `s4d_chunked`'s default, 16)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.discretization not in ssm_ops.DISCRETIZATIONS:
      raise ValueError(f"S4D: discretization={self.discretization!r} is not one of {ssm_ops.DISCRETIZATIONS}")
    if self.mode not in S4D_MODES:
      raise ValueError(f"S4D: mode={self.mode!r} is not one of {S4D_MODES}")
    d, p = self.d_model, self.d_state
    log_dt_init = lambda k, s, dt: jnp.log(_log_uniform_init(self.dt_min, self.dt_max)(k, s, dt))
    self.log_dt = _param(self, "log_dt", log_dt_init, (d,), ("embed",), jnp.float32)
    self.log_neg_a_re = _param(self, "log_neg_a_re", nn.initializers.constant(math.log(0.5)), (d, p),
                               ("embed", None), jnp.float32)
    self.a_im = _param(self, "a_im", lambda k, s, dt: jnp.broadcast_to(jnp.pi * jnp.arange(s[1], dtype=dt), s),
                       (d, p), ("embed", None), jnp.float32)
    self.c = _param(self, "c", nn.initializers.normal(stddev=0.5 ** 0.5), (d, p, 2), ("embed", None, None),
                    jnp.float32)
    self.skip = _param(self, "skip", nn.initializers.ones, (d,), ("embed",), jnp.float32)
    self.out_proj = _dense(d, ("mlp", "embed"), self.dtype, self.param_dtype, "out_proj", use_bias=True)

  def _operands(self):
    A_DP = -jnp.exp(self.log_neg_a_re) + 1j * self.a_im
    dA_DP, dB_DP = ssm_ops.discretize(A_DP, jnp.exp(self.log_dt)[:, None], self.discretization)
    return dA_DP, dB_DP, self.c[..., 0] + 1j * self.c[..., 1]

  def _read_out(self, y):
    return self.out_proj(nn.gelu(y).astype(self.dtype))

  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True, return_state=False):
    del positions, deterministic
    _check_segment_ids(segment_ids, x_BTD)
    dA_DP, dB_DP, C_DP = self._operands()
    if return_state:
      x_BTD, segment_ids, lengths_B = contract.right_align(x_BTD, segment_ids)
      y_BTD, h_BDP = self._sequence(x_BTD, segment_ids, dA_DP, dB_DP, C_DP, return_final_state=True)
      h_BDP = contract.where_rows(lengths_B > 0, h_BDP, self.init_state(x_BTD.shape[0]))
      return contract.restore(self._read_out(y_BTD), lengths_B), h_BDP
    if sequence_parallel.active():  # the recurrence on the local shards, states passed across them
      y_BTD = sequence_parallel.shard_sequence(
          lambda u, seg, *operands: cp.s4d_context_parallel(u, *operands, mode=self._recurrent_mode,
                                                            segment_ids=seg),
          (x_BTD.astype(jnp.float32), segment_ids), (dA_DP, dB_DP, C_DP, self.skip))
    elif segment_ids is None and self.mode == "conv":
      y_BTD = ssm_ops.s4d_conv(x_BTD.astype(jnp.float32), dA_DP, dB_DP, C_DP, self.skip)
    else:
      y_BTD = self._sequence(x_BTD, segment_ids, dA_DP, dB_DP, C_DP)
    return self._read_out(y_BTD)

  def _sequence(self, x_BTD, segment_ids, dA_DP, dB_DP, C_DP, **kw):
    """The forms that reset at segment starts and return the state: chunked (modes conv, chunked) or recurrent."""
    if self._recurrent_mode == "chunked":
      return ssm_ops.s4d_chunked(x_BTD.astype(jnp.float32), dA_DP, dB_DP, C_DP, self.skip,
                                 segment_ids=segment_ids, chunk=self.chunk_size or ssm_ops.S4D_DEFAULT_CHUNK, **kw)
    return ssm_ops.s4d_recurrent(x_BTD.astype(jnp.float32), dA_DP, dB_DP, C_DP, self.skip,
                                 mode=self._recurrent_mode, segment_ids=segment_ids, **kw)

  @property
  def _recurrent_mode(self) -> str:
    return "chunked" if self.mode == "conv" else self.mode

  def init_state(self, batch_size: int, max_len: int = 0, dtype: Dtype = None):
    del max_len, dtype
    return jnp.zeros((batch_size, self.d_model, self.d_state), jnp.complex64)

  def step(self, x_BD, state, *, deterministic=True):
    del deterministic
    dA_DP, dB_DP, C_DP = self._operands()
    y_BD, state = ssm_ops.s4d_step(x_BD.astype(jnp.float32), dA_DP, dB_DP, C_DP, self.skip, state)
    return self._read_out(y_BD), state


class S5(nn.Module):
  """S5 mixer: one MIMO diagonal SSM over all D channels (P complex states), GELU, output projection."""

  d_model: int
  d_state: int = 64
  discretization: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  mode: str = "parallel"  # "parallel" (associative scan) | "sequential" (lax.scan)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.discretization not in ssm_ops.DISCRETIZATIONS:
      raise ValueError(f"S5: discretization={self.discretization!r} is not one of {ssm_ops.DISCRETIZATIONS}")
    if self.mode not in ssm_ops.RECURRENT_MODES:
      raise ValueError(f"S5: mode={self.mode!r} is not one of {ssm_ops.RECURRENT_MODES}")
    d, p = self.d_model, self.d_state
    log_dt_init = lambda k, s, dt: jnp.log(_log_uniform_init(self.dt_min, self.dt_max)(k, s, dt))
    self.log_dt = _param(self, "log_dt", log_dt_init, (p,), (None,), jnp.float32)
    self.log_neg_lambda_re = _param(self, "log_neg_lambda_re", nn.initializers.constant(math.log(0.5)), (p,),
                                    (None,), jnp.float32)
    self.lambda_im = _param(self, "lambda_im", lambda k, s, dt: jnp.pi * jnp.arange(s[0], dtype=dt), (p,), (None,),
                            jnp.float32)
    self.b = _param(self, "b", nn.initializers.normal(stddev=(2 * d) ** -0.5), (p, d, 2), (None, "embed", None),
                    jnp.float32)
    self.c = _param(self, "c", nn.initializers.normal(stddev=p ** -0.5), (d, p, 2), ("embed", None, None),
                    jnp.float32)
    self.skip = _param(self, "skip", nn.initializers.ones, (d,), ("embed",), jnp.float32)
    self.out_proj = _dense(d, ("mlp", "embed"), self.dtype, self.param_dtype, "out_proj", use_bias=True)

  def _operands(self):
    lam_P = -jnp.exp(self.log_neg_lambda_re) + 1j * self.lambda_im
    dlam_P, scale_P = ssm_ops.discretize(lam_P, jnp.exp(self.log_dt), self.discretization)
    dB_PD = scale_P[:, None] * (self.b[..., 0] + 1j * self.b[..., 1])
    return dlam_P, dB_PD, self.c[..., 0] + 1j * self.c[..., 1]

  def _read_out(self, y):
    return self.out_proj(nn.gelu(y).astype(self.dtype))

  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True, return_state=False):
    del positions, deterministic
    _check_segment_ids(segment_ids, x_BTD)
    if return_state:
      x_BTD, segment_ids, lengths_B = contract.right_align(x_BTD, segment_ids)
      y_BTD, h_BP = ssm_ops.s5_scan(x_BTD.astype(jnp.float32), *self._operands(), self.skip, mode=self.mode,
                                    segment_ids=segment_ids, return_final_state=True)
      h_BP = contract.where_rows(lengths_B > 0, h_BP, self.init_state(x_BTD.shape[0]))
      return contract.restore(self._read_out(y_BTD), lengths_B), h_BP
    if sequence_parallel.active():  # the scan on the local shards, states passed across them
      y_BTD = sequence_parallel.shard_sequence(
          lambda u, seg, *operands: cp.s5_context_parallel(u, *operands, mode=self.mode, segment_ids=seg),
          (x_BTD.astype(jnp.float32), segment_ids), (*self._operands(), self.skip))
    else:
      y_BTD = ssm_ops.s5_scan(x_BTD.astype(jnp.float32), *self._operands(), self.skip, mode=self.mode,
                              segment_ids=segment_ids)
    return self._read_out(y_BTD)

  def init_state(self, batch_size: int, max_len: int = 0, dtype: Dtype = None):
    del max_len, dtype
    return jnp.zeros((batch_size, self.d_state), jnp.complex64)

  def step(self, x_BD, state, *, deterministic=True):
    del deterministic
    y_BD, state = ssm_ops.s5_step(x_BD.astype(jnp.float32), *self._operands(), self.skip, state)
    return self._read_out(y_BD), state


# ---------------------------------------------------------------------------------------------------------------
# Mamba and Mamba-2
# ---------------------------------------------------------------------------------------------------------------


class Mamba(nn.Module):
  """The Mamba (S6) block: in-projection to (x, z), causal depthwise conv + SiLU on x, input-dependent
  (delta, B, C), selective scan, SiLU(z) gating, out-projection.

  Decode state: {"conv": [B, W - 1, E] (the last inputs of the conv), "ssm": [B, E, P] float32}.
  """

  d_model: int
  d_state: int = 16
  expand: int = 2
  d_conv: int = 4
  dt_rank: int | None = None  # default ceil(d_model / 16)
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  mode: str = "chunked"
  chunk_size: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def resolved_dt_rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)

  def setup(self):
    if self.mode not in ssm_ops.MODES:
      raise ValueError(f"Mamba: mode={self.mode!r} is not one of {ssm_ops.MODES}")
    e, p, r = self.d_inner, self.d_state, self.resolved_dt_rank
    self.in_proj = _dense(2 * e, ("embed", "mlp"), self.dtype, self.param_dtype, "in_proj")
    self.conv_kernel = _param(self, "conv_kernel", _symmetric_uniform(1 / math.sqrt(self.d_conv)),
                              (self.d_conv, e), (None, "mlp"), self.param_dtype)
    self.conv_bias = _param(self, "conv_bias", nn.initializers.zeros, (e,), ("mlp",), self.param_dtype)
    self.x_proj = _dense(r + 2 * p, ("mlp", None), self.dtype, self.param_dtype, "x_proj")
    self.dt_proj = nn.Dense(
        e, dtype=jnp.float32, param_dtype=self.param_dtype, name="dt_proj",
        kernel_init=nn.with_logical_partitioning(
            _symmetric_uniform(r ** -0.5), (None, "mlp")),
        bias_init=nn.with_logical_partitioning(_dt_bias_init(self.dt_min, self.dt_max), ("mlp",)))
    self.A_log = _param(self, "A_log",
                        lambda k, s, dt: jnp.log(jnp.broadcast_to(jnp.arange(1, s[1] + 1, dtype=dt), s)),
                        (e, p), ("mlp", None), jnp.float32)
    self.skip = _param(self, "D", nn.initializers.ones, (e,), ("mlp",), jnp.float32)
    self.out_proj = _dense(self.d_model, ("mlp", "embed"), self.dtype, self.param_dtype, "out_proj")

  def _conv_params(self):
    return self.conv_kernel.astype(self.dtype), self.conv_bias.astype(self.dtype)

  def _ssm_inputs(self, x_conv):
    """x after conv + SiLU -> (x, delta, B, C) for the scan (the trailing axis is E or P)."""
    x_act = nn.silu(x_conv)
    dbc = self.x_proj(x_act)
    r, p = self.resolved_dt_rank, self.d_state
    delta = jax.nn.softplus(self.dt_proj(dbc[..., :r].astype(jnp.float32)))
    return x_act, delta, dbc[..., r:r + p], dbc[..., r + p:]

  def _forward(self, x_BTD, segment_ids, return_state):
    _check_segment_ids(segment_ids, x_BTD)
    if return_state:
      x_BTD, segment_ids, lengths_B = contract.right_align(x_BTD, segment_ids)
    xz_BTX = self.in_proj(x_BTD.astype(self.dtype))
    x_BTE, z_BTE = jnp.split(xz_BTX, 2, axis=-1)
    context_parallel = not return_state and sequence_parallel.active()
    x_conv = _conv(x_BTE, *self._conv_params(), segment_ids, context_parallel)
    u_BTE, delta_BTE, B_BTP, C_BTP = self._ssm_inputs(x_conv)
    if context_parallel:  # the scan on the local shards, states passed across them
      out = sequence_parallel.shard_sequence(
          lambda u, delta, B, C, seg, A, D: cp.selective_scan_context_parallel(
              u, delta, A, B, C, D, mode=self.mode, chunk_size=self.chunk_size, segment_ids=seg),
          (u_BTE, delta_BTE, B_BTP, C_BTP, segment_ids), (-jnp.exp(self.A_log), self.skip))
    else:
      out = ssm_ops.selective_scan(u_BTE, delta_BTE, -jnp.exp(self.A_log), B_BTP, C_BTP, self.skip,
                                   mode=self.mode, chunk_size=self.chunk_size, segment_ids=segment_ids,
                                   return_final_state=return_state)
    y_BTE, h_BEP = out if return_state else (out, None)
    y_BTD = self.out_proj(y_BTE * nn.silu(z_BTE))
    if return_state:
      state = {"conv": _conv_tail(x_BTE, self.d_conv, segment_ids), "ssm": h_BEP}
      state = contract.where_rows(lengths_B > 0, state, self.init_state(x_BTD.shape[0], dtype=x_BTE.dtype))
      return contract.restore(y_BTD, lengths_B), state
    return y_BTD

  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True, return_state=False):
    del positions, deterministic
    return self._forward(x_BTD, segment_ids, return_state)

  def init_state(self, batch_size: int, max_len: int = 0, dtype: Dtype = None):
    del max_len
    return {"conv": jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), dtype or self.dtype),
            "ssm": jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32)}

  def step(self, x_BD, state, *, deterministic=True):
    del deterministic
    x_BE, z_BE = jnp.split(self.in_proj(x_BD.astype(self.dtype)), 2, axis=-1)
    x_conv, conv_state = _conv_step(x_BE, state["conv"], *self._conv_params())
    u_BE, delta_BE, B_BP, C_BP = self._ssm_inputs(x_conv)
    y_BE, h_BEP = ssm_ops.selective_step(u_BE, delta_BE, -jnp.exp(self.A_log), B_BP, C_BP, self.skip,
                                         state["ssm"])
    return self.out_proj(y_BE * nn.silu(z_BE)), {"conv": conv_state, "ssm": h_BEP}


class Mamba2(nn.Module):
  """The Mamba-2 block: one in-projection to (z, x, B, C, dt), causal depthwise conv + SiLU on (x, B, C), SSD over
  N = E / H heads with a scalar decay per head, gated RMSNorm (norm(y * SiLU(z))), out-projection.

  Decode state: {"conv": [B, W - 1, E + 2P], "ssm": [B, N, H, P] float32}.
  """

  d_model: int
  d_state: int = 64
  expand: int = 2
  head_dim: int = 32
  d_conv: int = 4
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  a_init_range: tuple[float, float] = (1.0, 16.0)
  mode: str = "chunked"
  chunk_size: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def num_heads(self) -> int:
    return self.d_inner // self.head_dim

  def setup(self):
    if self.mode not in ssm_ops.SSD_MODES:
      raise ValueError(f"Mamba2: mode={self.mode!r} is not one of {ssm_ops.SSD_MODES}")
    if self.d_inner % self.head_dim:
      raise ValueError(f"Mamba2: expand * d_model = {self.d_inner} must be a multiple of head_dim={self.head_dim}")
    e, p, n = self.d_inner, self.d_state, self.num_heads
    self.in_proj = _dense(2 * e + 2 * p + n, ("embed", "mlp"), self.dtype, self.param_dtype, "in_proj")
    self.conv_kernel = _param(self, "conv_kernel", _symmetric_uniform(1 / math.sqrt(self.d_conv)),
                              (self.d_conv, e + 2 * p), (None, "mlp"), self.param_dtype)
    self.conv_bias = _param(self, "conv_bias", nn.initializers.zeros, (e + 2 * p,), ("mlp",), self.param_dtype)
    self.dt_bias = _param(self, "dt_bias", _dt_bias_init(self.dt_min, self.dt_max), (n,), ("heads",), jnp.float32)
    lo, hi = self.a_init_range
    self.A_log = _param(self, "A_log", lambda k, s, dt: jnp.log(jax.random.uniform(k, s, dt, lo, hi)), (n,),
                        ("heads",), jnp.float32)
    self.skip = _param(self, "D", nn.initializers.ones, (n,), ("heads",), jnp.float32)
    self.norm_scale = _param(self, "norm_scale", nn.initializers.ones, (e,), ("mlp",), self.param_dtype)
    self.out_proj = _dense(self.d_model, ("mlp", "embed"), self.dtype, self.param_dtype, "out_proj")

  def _split(self, proj):
    e, p = self.d_inner, self.d_state
    return proj[..., :e], proj[..., e:2 * e + 2 * p], proj[..., 2 * e + 2 * p:]

  def _conv_params(self):
    return self.conv_kernel.astype(self.dtype), self.conv_bias.astype(self.dtype)

  def _ssd_inputs(self, xbc_conv, dt_raw):
    e, p = self.d_inner, self.d_state
    xbc = nn.silu(xbc_conv)
    x = xbc[..., :e].reshape(*xbc.shape[:-1], self.num_heads, self.head_dim)
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias)
    return x, dt, xbc[..., e:e + p], xbc[..., e + p:]

  def _gated_out(self, y, z):
    """out_proj(RMSNorm(y * SiLU(z))), the norm in float32."""
    g = (y.reshape(*z.shape).astype(jnp.float32) * nn.silu(z.astype(jnp.float32)))
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + 1e-6) * self.norm_scale.astype(jnp.float32)
    return self.out_proj(g.astype(self.dtype))

  def _forward(self, x_BTD, segment_ids, return_state):
    _check_segment_ids(segment_ids, x_BTD)
    if return_state:
      x_BTD, segment_ids, lengths_B = contract.right_align(x_BTD, segment_ids)
    z_BTE, xbc_BTX, dt_BTN = self._split(self.in_proj(x_BTD.astype(self.dtype)))
    context_parallel = not return_state and sequence_parallel.active()
    xbc_conv = _conv(xbc_BTX, *self._conv_params(), segment_ids, context_parallel)
    x_BTNH, dt_BTN, B_BTP, C_BTP = self._ssd_inputs(xbc_conv, dt_BTN)
    if context_parallel:  # SSD on the local shards, states passed across them
      out = sequence_parallel.shard_sequence(
          lambda x, dt, B, C, seg, A, D: cp.ssd_context_parallel(x, dt, A, B, C, D, mode=self.mode,
                                                                 chunk_size=self.chunk_size, segment_ids=seg),
          (x_BTNH, dt_BTN, B_BTP, C_BTP, segment_ids), (-jnp.exp(self.A_log), self.skip))
    else:
      out = ssm_ops.ssd(x_BTNH, dt_BTN, -jnp.exp(self.A_log), B_BTP, C_BTP, self.skip, mode=self.mode,
                        chunk_size=self.chunk_size, segment_ids=segment_ids, return_final_state=return_state)
    y_BTNH, h_BNHP = out if return_state else (out, None)
    y_BTD = self._gated_out(y_BTNH, z_BTE)
    if return_state:
      state = {"conv": _conv_tail(xbc_BTX, self.d_conv, segment_ids), "ssm": h_BNHP}
      state = contract.where_rows(lengths_B > 0, state, self.init_state(x_BTD.shape[0], dtype=xbc_BTX.dtype))
      return contract.restore(y_BTD, lengths_B), state
    return y_BTD

  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True, return_state=False):
    del positions, deterministic
    return self._forward(x_BTD, segment_ids, return_state)

  def init_state(self, batch_size: int, max_len: int = 0, dtype: Dtype = None):
    del max_len
    return {"conv": jnp.zeros((batch_size, self.d_conv - 1, self.d_inner + 2 * self.d_state), dtype or self.dtype),
            "ssm": jnp.zeros((batch_size, self.num_heads, self.head_dim, self.d_state), jnp.float32)}

  def step(self, x_BD, state, *, deterministic=True):
    del deterministic
    z_BE, xbc_BX, dt_BN = self._split(self.in_proj(x_BD.astype(self.dtype)))
    xbc_conv, conv_state = _conv_step(xbc_BX, state["conv"], *self._conv_params())
    x_BNH, dt_BN, B_BP, C_BP = self._ssd_inputs(xbc_conv, dt_BN)
    y_BNH, h_BNHP = ssm_ops.ssd_step(x_BNH, dt_BN, -jnp.exp(self.A_log), B_BP, C_BP, self.skip, state["ssm"])
    return self._gated_out(y_BNH, z_BE), {"conv": conv_state, "ssm": h_BNHP}
