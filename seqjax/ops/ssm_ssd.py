"""Mamba-2's state space duality (SSD): one recurrence, a chunked attention-like form and a sequential form.

The recurrence (Dao & Gu, 2024), with a scalar decay per head (A is scalar-times-identity) and one group of B/C
shared by all heads:

    h_t = exp(dt_t * A) h_{t-1} + (dt_t * x_t) B_t^T          h [B, N, H, P]  (float32)
    y_t = h_t C_t + D * x_t                                   y [B, L, N, H]

Legend: B batch, L length, N heads, H head dim, P state size, K number of chunks, C chunk length (T/S index
query/key positions inside a chunk). x is [B, L, N, H], dt [B, L, N] (positive, after softplus), A [N] (negative),
B and C [B, L, P], D [N].

Modes:
- "sequential": `lax.scan` over L (the recurrent form, the oracle; also what decoding runs one step at a time).
- "chunked":    the SSD form. Inside a chunk the output is a masked, decayed attention: scores C_t . B_s times
                exp(sum of log-decays over (s, t]) — computed as differences of a cumulative sum of log-decays
                *within the chunk* (float32, so every exponent is <= 0 and nothing overflows) — applied to dt x with
                one batched matmul per (batch, chunk, head); across chunks a short scan passes the states
                ([B, N, H, P] per chunk). Memory O(L C N + L N H + (L / C) N H P).

Segment resets: with `segment_ids` [B, L], the state is zeroed before every position whose id differs from the
previous position's (position 0 continues from `initial_state`). In the chunked form a reset becomes a mask: two
positions interact only if the count of resets up to each of them is equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.ssm_selective import keep_mask

MODES = ("sequential", "chunked")
DEFAULT_CHUNK_SIZE = 64


def _check(x, dt, A, B, C, D, mode, chunk_size, initial_state, segment_ids):
  if mode not in MODES:
    raise ValueError(f"ssd: mode={mode!r} is not one of {MODES}")
  if x.ndim != 4:
    raise ValueError(f"ssd: x must be [B, L, N, H] (batch, length, heads, head dim), got shape {x.shape}")
  b, l, n, h = x.shape
  if dt.shape != (b, l, n):
    raise ValueError(f"ssd: dt must be [B, L, N] = {(b, l, n)}, got {dt.shape}")
  if A.shape != (n,):
    raise ValueError(f"ssd: A must be [N] = ({n},) (one scalar decay per head), got {A.shape}")
  if B.ndim != 3 or B.shape[:2] != (b, l):
    raise ValueError(f"ssd: B must be [B, L, P] with B, L = {(b, l)}, got {B.shape}")
  if C.shape != B.shape:
    raise ValueError(f"ssd: C must have B's shape {B.shape} ([B, L, P]), got {C.shape}")
  p = B.shape[2]
  if D is not None and D.shape != (n,):
    raise ValueError(f"ssd: D must be [N] = ({n},), got {D.shape}")
  if initial_state is not None and initial_state.shape != (b, n, h, p):
    raise ValueError(f"ssd: initial_state must be [B, N, H, P] = {(b, n, h, p)}, got {initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"ssd: segment_ids must be [B, L] = {(b, l)}, got {segment_ids.shape}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"ssd: chunk_size must be a positive int or None, got {chunk_size!r}")


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array | None = None, *,
        mode: str = "chunked", chunk_size: int | None = None, initial_state: jax.Array | None = None,
        return_final_state: bool = False, segment_ids: jax.Array | None = None):
  """Mamba-2 SSD: y [B, L, N, H] in x's dtype (and the final state [B, N, H, P] float32 if asked).

  Args:
    x: [B, L, N, H] input, split into N heads of width H.
    dt: [B, L, N] positive step sizes.
    A: [N] negative decay rates (scalar-times-identity per head).
    B: [B, L, P] input projections (one group shared by the heads).
    C: [B, L, P] output projections.
    D: optional [N] per-head skip.
    mode: "chunked" (default) or "sequential".
    chunk_size: chunk length of the chunked form (default 64); need not divide L.
    initial_state: optional [B, N, H, P] state before position 0.
    return_final_state: also return the state after the last position.
    segment_ids: optional [B, L]; the state resets where the id changes.
  """
  _check(x, dt, A, B, C, D, mode, chunk_size, initial_state, segment_ids)
  b, l, n, h = x.shape
  p = B.shape[2]
  f32 = jnp.float32
  x_BLNH, dt_BLN, A_N, B_BLP, C_BLP = (a.astype(f32) for a in (x, dt, A, B, C))
  h0_BNHP = jnp.zeros((b, n, h, p), f32) if initial_state is None else initial_state.astype(f32)
  keep_BL = keep_mask(segment_ids, b, l)
  if mode == "sequential":
    y_BLNH, h_BNHP = _sequential(x_BLNH, dt_BLN, A_N, B_BLP, C_BLP, keep_BL, h0_BNHP)
  else:
    y_BLNH, h_BNHP = _chunked(x_BLNH, dt_BLN, A_N, B_BLP, C_BLP, keep_BL, h0_BNHP,
                              chunk_size or DEFAULT_CHUNK_SIZE)
  if D is not None:
    y_BLNH = y_BLNH + D.astype(f32)[:, None] * x_BLNH
  y_BLNH = y_BLNH.astype(x.dtype)
  return (y_BLNH, h_BNHP) if return_final_state else y_BLNH


def ssd_step(x_BNH: jax.Array, dt_BN: jax.Array, A_N: jax.Array, B_BP: jax.Array, C_BP: jax.Array,
             D_N: jax.Array | None, h_BNHP: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One recurrent step (decoding): (y [B, N, H] in x's dtype, new state [B, N, H, P] float32)."""
  f32 = jnp.float32
  x32, dt32 = x_BNH.astype(f32), dt_BN.astype(f32)
  a_BN = jnp.exp(dt32 * A_N.astype(f32))
  h_BNHP = (a_BN[..., None, None] * h_BNHP.astype(f32)
            + (dt32[..., None] * x32)[..., None] * B_BP.astype(f32)[:, None, None, :])
  y_BNH = jnp.einsum("bnhp,bp->bnh", h_BNHP, C_BP.astype(f32))
  if D_N is not None:
    y_BNH = y_BNH + D_N.astype(f32)[:, None] * x32
  return y_BNH.astype(x_BNH.dtype), h_BNHP


def _sequential(x_BLNH, dt_BLN, A_N, B_BLP, C_BLP, keep_BL, h0_BNHP):
  def step(h_BNHP, inputs):
    x_BNH, dt_BN, B_BP, C_BP, keep_B = inputs
    a_BN = jnp.exp(dt_BN * A_N) * keep_B[:, None]
    h_BNHP = a_BN[..., None, None] * h_BNHP + (dt_BN[..., None] * x_BNH)[..., None] * B_BP[:, None, None, :]
    return h_BNHP, jnp.einsum("bnhp,bp->bnh", h_BNHP, C_BP)

  time_major = lambda a: jnp.swapaxes(a, 0, 1)
  h_BNHP, y_LBNH = lax.scan(step, h0_BNHP, tuple(map(time_major, (x_BLNH, dt_BLN, B_BLP, C_BLP, keep_BL))))
  return time_major(y_LBNH), h_BNHP


def _chunked(x_BLNH, dt_BLN, A_N, B_BLP, C_BLP, keep_BL, h0_BNHP, chunk):
  b, l, n, h = x_BLNH.shape
  chunk = min(chunk, l)
  k = -(-l // chunk)
  pad = k * chunk - l

  def to_chunks(a, fill=0.0):  # [B, L, ...] -> [B, K, C, ...]; padding steps have dt=0: identity on the state
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
    return a.reshape(b, k, chunk, *a.shape[2:])

  x_BKCNH, dt_BKCN, B_BKCP, C_BKCP = map(to_chunks, (x_BLNH, dt_BLN, B_BLP, C_BLP))
  keep_BKC = to_chunks(keep_BL, fill=1.0)

  # Log-decays and their cumulative sum inside each chunk (all <= 0; differences stay small and exact enough).
  cum_BKCN = jnp.cumsum(dt_BKCN * A_N, axis=2)
  cum_BKNC = jnp.moveaxis(cum_BKCN, 3, 2)
  resets_BKC = jnp.cumsum(1.0 - keep_BKC, axis=2)  # resets up to and including each position of the chunk
  tril_TS = jnp.tril(jnp.ones((chunk, chunk), bool))
  linked_BKTS = tril_TS & (resets_BKC[:, :, :, None] == resets_BKC[:, :, None, :])
  segsum_BKNTS = cum_BKNC[..., :, None] - cum_BKNC[..., None, :]
  decay_BKNTS = jnp.exp(jnp.where(linked_BKTS[:, :, None], segsum_BKNTS, -jnp.inf))

  xdt_BKCNH = x_BKCNH * dt_BKCN[..., None]
  # 1. inside each chunk: masked, decayed attention with scores C_t . B_s.
  scores_BKTS = jnp.einsum("bktp,bksp->bkts", C_BKCP, B_BKCP)
  weights_BKNTS = decay_BKNTS * scores_BKTS[:, :, None]
  xdt_BKNCH = jnp.swapaxes(xdt_BKCNH, 2, 3)  # heads next to the batch dims: one batched matmul per head
  y_BKNCH = jnp.einsum("bknts,bknsh->bknth", weights_BKNTS, xdt_BKNCH)

  # 2. each chunk's own contribution to the state after it (from a zero state).
  last_linked_BKC = resets_BKC == resets_BKC[:, :, -1:]
  to_end_BKCN = jnp.exp(cum_BKCN[:, :, -1:] - cum_BKCN) * last_linked_BKC[..., None]
  local_BKNHP = jnp.einsum("bksp,bksnh->bknhp", B_BKCP, xdt_BKCNH * to_end_BKCN[..., None])

  # 3. pass states across chunks: h_in(k+1) = decay(k) h_in(k) + local(k).
  no_reset_BKC = resets_BKC == 0.0
  chunk_decay_BKN = jnp.exp(cum_BKCN[:, :, -1]) * no_reset_BKC[:, :, -1:]

  def pass_state(h_BNHP, inputs):
    decay_BN, local_BNHP = inputs
    return decay_BN[..., None, None] * h_BNHP + local_BNHP, h_BNHP

  h_BNHP, hin_KBNHP = lax.scan(pass_state, h0_BNHP,
                               (jnp.swapaxes(chunk_decay_BKN, 0, 1), jnp.swapaxes(local_BKNHP, 0, 1)))

  # 4. the incoming state's contribution inside each chunk, decayed to each position (zero after a reset).
  from_start_BKCN = jnp.exp(cum_BKCN) * no_reset_BKC[..., None]
  y_BKCNH = (jnp.swapaxes(y_BKNCH, 2, 3)
             + jnp.einsum("bktp,kbnhp->bktnh", C_BKCP, hin_KBNHP) * from_start_BKCN[..., None])
  y_BLNH = y_BKCNH.reshape(b, k * chunk, n, h)[:, :l]
  return y_BLNH, h_BNHP
