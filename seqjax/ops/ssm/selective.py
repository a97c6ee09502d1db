"""Mamba's selective scan (S6) in three agreeing modes: sequential, parallel and chunked.

The recurrence, with the reference implementation's argument names (Gu & Dao, 2023):

    h_t = exp(delta_t * A) * h_{t-1} + (delta_t * x_t) B_t        h [B, E, P]  (float32)
    y_t = h_t C_t + D * x_t                                       y [B, T, E]

Legend: B batch, T sequence length, E expanded width (channels), P state size (the paper's N), C chunk length.
x and delta are [B, T, E] (delta already positive, i.e. after softplus), A is [E, P] (negative real), B and C
are [B, T, P], D is [E]. Every mode keeps its state in float32 whatever the input dtype and returns y in x's dtype.

Modes (all equal to tolerance, forward and gradients — see tests/ops/ssm/test_selective.py):
- "sequential": `lax.scan` over T with autodiff. The reference, the oracle of the others.
- "parallel":   `lax.associative_scan` over T. Materialises exp(delta A) and delta B x as [B, T, E, P] arrays: the
                textbook parallel form, memory O(T E P).
- "chunked":    the default. The sequence is cut into chunks of C steps and a scan over chunks passes the state
                on; inside a chunk a fused recurrence forms exp(delta A) and delta B x for one step at a time
                ([B, E, P], cache-resident) and reads out with C in the same step — no [B, T, E, P] array exists.
                A hand-written backward (custom_vjp) keeps only the chunk-boundary states ([M, B, E, P]) from
                the forward pass, recomputes one chunk's states at a time in reverse order and runs the adjoint
                recurrence there with every gradient reduction fused into the loop, so peak memory is
                O(T E + T E P / C) — linear in T E — for forward+backward (autodiff of a scan would keep
                [T, B, E, P] residuals and is ~2x slower here). The reductions that contract E's neighbours
                (the cotangents of delta and A) are multiply-sums, A's kept per batch row until the scan ends:
                as per-step dot_generals they transposed [B, E, P] every step and took half the backward.
                Unlike Mamba-2's scalar decay (see `ssd.py`), the decay here differs per (channel, state) pair,
                so the intra-chunk pairwise form would be a [C, C, E, P] tensor per chunk and exp(-A cumsum)
                factorisations overflow float32; on CPU the short in-chunk recurrence is the fastest exact form.

Segment resets (packed sequences): with `segment_ids` [B, T], the state is zeroed before every position whose id
differs from the previous position's, so no information flows between packed documents. Position 0 always
continues from `initial_state` (the streaming / chunk-passing convention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.ssm._common import as_arrays, keep_mask
from seqjax.ops.vma import vary_like

MODES = ("sequential", "parallel", "chunked")
DEFAULT_CHUNK_SIZE = 64


def _check(x, delta, A, B, C, D, mode, chunk_size, initial_state, segment_ids):
  if mode not in MODES:
    raise ValueError(f"selective_scan: mode={mode!r} is not one of {MODES}")
  if x.ndim != 3:
    raise ValueError(f"selective_scan: x must be [B, T, E], got shape {x.shape}")
  b, l, e = x.shape
  if delta.shape != x.shape:
    raise ValueError(f"selective_scan: delta must have x's shape {x.shape} ([B, T, E]), got {delta.shape}")
  if A.ndim != 2 or A.shape[0] != e:
    raise ValueError(f"selective_scan: A must be [E, P] = [{e}, P], got {A.shape}")
  p = A.shape[1]
  for name, m in (("B", B), ("C", C)):
    if m.shape != (b, l, p):
      raise ValueError(f"selective_scan: {name} must be [B, T, P] = {(b, l, p)}, got {m.shape}")
  if D is not None and D.shape != (e,):
    raise ValueError(f"selective_scan: D must be [E] = ({e},), got {D.shape}")
  if initial_state is not None and initial_state.shape != (b, e, p):
    raise ValueError(f"selective_scan: initial_state must be [B, E, P] = {(b, e, p)}, got {initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"selective_scan: segment_ids must be [B, T] = {(b, l)}, got {segment_ids.shape}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"selective_scan: chunk_size must be a positive int or None, got {chunk_size!r}")


def selective_scan(x: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   D: jax.Array | None = None, *, mode: str = "chunked", chunk_size: int | None = None,
                   initial_state: jax.Array | None = None, return_final_state: bool = False,
                   segment_ids: jax.Array | None = None):
  """Mamba's selective scan: y[B, T, E] (and the final state [B, E, P] in float32 if `return_final_state`).

  Args:
    x: [B, T, E] input.
    delta: [B, T, E] positive step sizes (after softplus).
    A: [E, P] negative real state matrix (diagonal per channel).
    B: [B, T, P] input projection per step.
    C: [B, T, P] output projection per step.
    D: optional [E] skip connection.
    mode: "sequential" | "parallel" | "chunked" (default; see the module docstring).
    chunk_size: chunk length C of the "chunked" mode (default 64); any T works, it need not divide T.
    initial_state: optional [B, E, P] state before position 0 (zeros by default).
    return_final_state: also return the state after the last position.
    segment_ids: optional [B, T] ints; the state resets where the id changes (packed sequences).
  """
  x, delta, A, B, C, D, initial_state, segment_ids = as_arrays(x, delta, A, B, C, D, initial_state, segment_ids)
  _check(x, delta, A, B, C, D, mode, chunk_size, initial_state, segment_ids)
  b, l, e = x.shape
  p = A.shape[1]
  f32 = jnp.float32
  x_BTE, delta_BTE = x.astype(f32), delta.astype(f32)
  A_EP, B_BLP, C_BLP = A.astype(f32), B.astype(f32), C.astype(f32)
  h0_BEP = jnp.zeros((b, e, p), f32) if initial_state is None else initial_state.astype(f32)
  keep_BT = keep_mask(segment_ids, b, l)
  h0_BEP = vary_like(h0_BEP, x_BTE, delta_BTE, A_EP, B_BLP, C_BLP, keep_BT)  # a scan carry (check_vma)
  if mode == "sequential":
    y_BTE, h_BEP = _sequential(x_BTE, delta_BTE, A_EP, B_BLP, C_BLP, keep_BT, h0_BEP)
  elif mode == "parallel":
    y_BTE, h_BEP = _parallel(x_BTE, delta_BTE, A_EP, B_BLP, C_BLP, keep_BT, h0_BEP)
  else:
    y_BTE, h_BEP = _chunked(x_BTE, delta_BTE, A_EP, B_BLP, C_BLP, keep_BT, h0_BEP,
                            chunk_size or DEFAULT_CHUNK_SIZE)
  if D is not None:
    y_BTE = y_BTE + D.astype(f32) * x_BTE
  y_BTE = y_BTE.astype(x.dtype)
  return (y_BTE, h_BEP) if return_final_state else y_BTE


def selective_step(x_BE: jax.Array, delta_BE: jax.Array, A_EP: jax.Array, B_BP: jax.Array, C_BP: jax.Array,
                   D_E: jax.Array | None, h_BEP: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One recurrent step (decoding): returns (y [B, E] in x's dtype, new state [B, E, P] float32)."""
  x_BE, delta_BE, A_EP, B_BP, C_BP, D_E, h_BEP = as_arrays(x_BE, delta_BE, A_EP, B_BP, C_BP, D_E, h_BEP)
  f32 = jnp.float32
  x32, d32 = x_BE.astype(f32), delta_BE.astype(f32)
  a_BEP = jnp.exp(d32[..., None] * A_EP.astype(f32))
  h_BEP = a_BEP * h_BEP.astype(f32) + (d32 * x32)[..., None] * B_BP.astype(f32)[:, None, :]
  y_BE = jnp.einsum("bep,bp->be", h_BEP, C_BP.astype(f32))
  if D_E is not None:
    y_BE = y_BE + D_E.astype(f32) * x32
  return y_BE.astype(x_BE.dtype), h_BEP


# ---------------------------------------------------------------------------------------------------------------
# sequential and parallel (autodiff)
# ---------------------------------------------------------------------------------------------------------------


def _sequential(x_BTE, delta_BTE, A_EP, B_BLP, C_BLP, keep_BT, h0_BEP):
  def step(h_BEP, inputs):
    x_BE, d_BE, B_BP, C_BP, keep_B = inputs
    a_BEP = jnp.exp(d_BE[..., None] * A_EP) * keep_B[:, None, None]
    h_BEP = a_BEP * h_BEP + (d_BE * x_BE)[..., None] * B_BP[:, None, :]
    return h_BEP, jnp.einsum("bep,bp->be", h_BEP, C_BP)

  time_major = lambda a: jnp.swapaxes(a, 0, 1)
  h_BEP, y_TBE = lax.scan(step, h0_BEP, tuple(map(time_major, (x_BTE, delta_BTE, B_BLP, C_BLP, keep_BT))))
  return time_major(y_TBE), h_BEP


def _combine(first, second):
  """Associative composition of affine maps h -> a h + b (first applied, then second)."""
  a1, b1 = first
  a2, b2 = second
  return a1 * a2, a2 * b1 + b2


def _parallel(x_BTE, delta_BTE, A_EP, B_BLP, C_BLP, keep_BT, h0_BEP):
  a_BTEP = jnp.exp(delta_BTE[..., None] * A_EP) * keep_BT[:, :, None, None]
  b_BTEP = (delta_BTE * x_BTE)[..., None] * B_BLP[:, :, None, :]
  b_BTEP = b_BTEP.at[:, 0].add(a_BTEP[:, 0] * h0_BEP)
  _, h_BTEP = lax.associative_scan(_combine, (a_BTEP, b_BTEP), axis=1)
  return jnp.einsum("blep,blp->ble", h_BTEP, C_BLP), h_BTEP[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# chunked (custom_vjp)
# ---------------------------------------------------------------------------------------------------------------


def _chunked(x_BTE, delta_BTE, A_EP, B_BLP, C_BLP, keep_BT, h0_BEP, chunk):
  """Pads T to a multiple of the chunk (padding steps have delta=0: identity on the state) and runs the kernel."""
  b, l, e = x_BTE.shape
  chunk = min(chunk, l)
  n_chunks = -(-l // chunk)
  pad = n_chunks * chunk - l

  def to_chunks(a_BL_, fill=0.0):
    a_BL_ = jnp.pad(a_BL_, [(0, 0), (0, pad)] + [(0, 0)] * (a_BL_.ndim - 2), constant_values=fill)
    a_LB_ = jnp.swapaxes(a_BL_, 0, 1)
    return a_LB_.reshape(n_chunks, chunk, *a_LB_.shape[1:])  # [T/C, C, B, ...]

  y_MCBE, h_BEP = _chunked_scan(to_chunks(x_BTE), to_chunks(delta_BTE), A_EP, to_chunks(B_BLP), to_chunks(C_BLP),
                                to_chunks(keep_BT, fill=1.0), h0_BEP)
  y_BTE = jnp.swapaxes(y_MCBE.reshape(n_chunks * chunk, b, e), 0, 1)[:, :l]
  return y_BTE, h_BEP


def _step_operands(x_BE, d_BE, A_EP, B_BP, keep_B):
  a_BEP = jnp.exp(d_BE[..., None] * A_EP) * keep_B[:, None, None]
  b_BEP = (d_BE * x_BE)[..., None] * B_BP[:, None, :]
  return a_BEP, b_BEP


def _chunk_prev_states(x_CBE, d_CBE, A_EP, B_CBP, keep_CB, h_BEP):
  """The state before each step of one chunk, [C, B, E, P], from the state before the chunk."""
  def step(h_BEP, inputs):
    a_BEP, b_BEP = _step_operands(*inputs[:2], A_EP, *inputs[2:])
    return a_BEP * h_BEP + b_BEP, h_BEP
  return lax.scan(step, h_BEP, (x_CBE, d_CBE, B_CBP, keep_CB))[1]


def _chunked_forward(x_MCBE, d_MCBE, A_EP, B_KCBP, C_KCBP, keep_MCB, h0_BEP):
  def step(h_BEP, inputs):
    x_BE, d_BE, B_BP, C_BP, keep_B = inputs
    a_BEP, b_BEP = _step_operands(x_BE, d_BE, A_EP, B_BP, keep_B)
    h_BEP = a_BEP * h_BEP + b_BEP
    return h_BEP, jnp.einsum("bep,bp->be", h_BEP, C_BP)

  def chunk_fn(h_BEP, inputs):
    hout_BEP, y_CBE = lax.scan(step, h_BEP, inputs)
    return hout_BEP, (y_CBE, h_BEP)

  h_BEP, (y_MCBE, hin_MBEP) = lax.scan(chunk_fn, h0_BEP, (x_MCBE, d_MCBE, B_KCBP, C_KCBP, keep_MCB))
  return (y_MCBE, h_BEP), hin_MBEP


@jax.custom_vjp
def _chunked_scan(x_MCBE, d_MCBE, A_EP, B_KCBP, C_KCBP, keep_MCB, h0_BEP):
  """Chunked selective scan without the D term. Inputs are chunked time-major: [K chunks, C, B, ...]."""
  return _chunked_forward(x_MCBE, d_MCBE, A_EP, B_KCBP, C_KCBP, keep_MCB, h0_BEP)[0]


def _chunked_scan_fwd(x_MCBE, d_MCBE, A_EP, B_KCBP, C_KCBP, keep_MCB, h0_BEP):
  out, hin_MBEP = _chunked_forward(x_MCBE, d_MCBE, A_EP, B_KCBP, C_KCBP, keep_MCB, h0_BEP)
  return out, (x_MCBE, d_MCBE, A_EP, B_KCBP, C_KCBP, keep_MCB, hin_MBEP)


def _chunked_scan_bwd(residuals, cotangents):
  x_MCBE, d_MCBE, A_EP, B_KCBP, C_KCBP, keep_MCB, hin_MBEP = residuals
  dy_MCBE, dhT_BEP = cotangents

  def adjoint_step(carry, inputs):
    """Reverse step t: r is a_{t+1} dh_{t+1}; dh_t = C_t dy_t + r."""
    r_BEP, dA_BEP = carry
    x_BE, d_BE, B_BP, C_BP, keep_B, hprev_BEP, dy_BE = inputs
    a_BEP, b_BEP = _step_operands(x_BE, d_BE, A_EP, B_BP, keep_B)
    h_BEP = a_BEP * hprev_BEP + b_BEP
    dh_BEP = dy_BE[..., None] * C_BP[:, None, :] + r_BEP
    dlog_BEP = dh_BEP * hprev_BEP * a_BEP  # cotangent of log(a) = delta * A
    du_BE = jnp.einsum("bep,bp->be", dh_BEP, B_BP)  # cotangent of u = delta * x
    # Both reductions over E's neighbours as fused multiply-sums: as dot_generals they transpose [B, E, P] per step.
    dd_BE = jnp.sum(dlog_BEP * A_EP, axis=-1) + du_BE * x_BE
    dA_BEP = dA_BEP + dlog_BEP * d_BE[..., None]  # summed over B once, after the scan
    dB_BP = jnp.einsum("bep,be->bp", dh_BEP, d_BE * x_BE)
    dC_BP = jnp.einsum("bep,be->bp", h_BEP, dy_BE)
    return (a_BEP * dh_BEP, dA_BEP), (du_BE * d_BE, dd_BE, dB_BP, dC_BP)

  def chunk_bwd(carry, inputs):
    """Carries the cotangent of this chunk's final state back to the cotangent of its initial state."""
    x_CBE, d_CBE, B_CBP, C_CBP, keep_CB, hin_BEP, dy_CBE = inputs
    hprev_CBEP = _chunk_prev_states(x_CBE, d_CBE, A_EP, B_CBP, keep_CB, hin_BEP)
    return lax.scan(adjoint_step, carry, (x_CBE, d_CBE, B_CBP, C_CBP, keep_CB, hprev_CBEP, dy_CBE),
                    reverse=True)

  (g0_BEP, dA_BEP), (dx, dd, dB, dC) = lax.scan(
      chunk_bwd, (dhT_BEP, vary_like(jnp.zeros_like(dhT_BEP), x_MCBE, dy_MCBE, hin_MBEP)),
      (x_MCBE, d_MCBE, B_KCBP, C_KCBP, keep_MCB, hin_MBEP, dy_MCBE), reverse=True)
  return dx, dd, jnp.sum(dA_BEP, axis=0), dB, dC, jnp.zeros_like(keep_MCB), g0_BEP


_chunked_scan.defvjp(_chunked_scan_fwd, _chunked_scan_bwd)
