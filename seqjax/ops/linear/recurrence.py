"""The decayed linear recurrence that linear attention, RetNet and GLA share, in three forms.

Per head, a matrix state S [P, H] (keys' feature dim P by values' dim H) is decayed and written one token at a time,
and read by the query:

    S_t = diag(a_t) S_{t-1} + k_t v_t^T          a_t = exp(g_t) in (0, 1]   (g = the log-decay, <= 0)
    o_t = S_t^T q_t                              (the current token included: o_t = sum_{s<=t} q_t.(a_{s+1..t} k_s) v_s)

The decay g selects the variant: none (g = 0; linear attention, Katharopoulos et al. 2020), one fixed scalar per
head (RetNet's gamma, Sun et al. 2023), one scalar per head and token, or one value per head, token and key
feature (GLA's data-dependent gate, Yang et al. 2023). The variants' feature maps, normalisers and gates live in
`variants.py`; this module is the machinery.

Legend: B batch, T length, N heads, P key / query feature dim, H value head dim, C chunk length, M chunks,
T/S also index query/key positions inside a chunk. q, k [B, T, N, P], v [B, T, N, H]; g [N], [B, T, N] or
[B, T, N, P]; state [B, N, P, H]. Everything is accumulated in float32 and returned in float32 (the caller casts).

Forms (`mode`), proven equal by tests/ops/linear/ and against a float64 NumPy loop:
- "parallel":  the quadratic, masked form (the reference): o = ((q k^T) * D) v with D[t, s] the product of the
               decays over (s, t], computed as exp of a masked cumulative sum of g (every term it adds belongs to
               the interval; no difference of large sums), [B, N, T, S] (x P for a per-feature decay) in memory.
- "recurrent": `lax.scan` over T, one token from the state (also `decayed_step`, the decoding step).
- "chunked":   parallel inside chunks of C tokens, the state carried across chunks by a scan over chunks. Inside a
               chunk the decays are differences of a chunk-local cumulative sum (all exponents <= 0 where used);
               the incoming state is read by the chunk's queries decayed from the chunk start, and the chunk's
               keys are written into the outgoing state decayed to the chunk end. Only one chunk's [C, C]
               (x P) decay lives at a time, and the chunk step is rematerialised in the backward pass: no per-step
               state [T, N, P, H] is ever materialised, forward or backward. C need not divide T.

Segment resets (packed documents): with `segment_ids` [B, T] the state is zeroed before every position whose id
differs from the previous position's (position 0 continues from `initial_state`). In the recurrent form a reset
multiplies the decay by 0; in the parallel and chunked forms two positions interact only if the number of resets
up to each is equal, and the incoming state reaches only positions before the first reset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.ssm._common import as_arrays, keep_mask
from seqjax.ops.vma import vary_like

MODES = ("parallel", "recurrent", "chunked")
DEFAULT_CHUNK_SIZE = 64  # with no decay or a scalar decay per head (the fastest fwd+bwd on CPU, L = 4096)
DEFAULT_FEATURE_DECAY_CHUNK_SIZE = 16  # with a decay per key feature: its [C, C, P] decay tensor favours short chunks


def check_inputs(name, q, k, v, mode, chunk_size, initial_state, segment_ids):
  """Clear errors for the arguments every linear-attention form takes (also used by `delta.py`)."""
  if mode not in MODES:
    raise ValueError(f"{name}: mode={mode!r} is not one of {MODES}")
  if q.ndim != 4:
    raise ValueError(f"{name}: q must be [B, T, N, P] (batch, length, heads, key dim), got shape {q.shape}")
  b, t, n, p = q.shape
  if k.shape != q.shape:
    raise ValueError(f"{name}: k must have q's shape {q.shape} ([B, T, N, P]), got {k.shape}")
  if v.ndim != 4 or v.shape[:3] != (b, t, n):
    raise ValueError(f"{name}: v must be [B, T, N, H] with B, T, N = {(b, t, n)}, got {v.shape}")
  if initial_state is not None and initial_state.shape != (b, n, p, v.shape[3]):
    raise ValueError(f"{name}: initial_state must be [B, N, P, H] = {(b, n, p, v.shape[3])}, got "
                     f"{initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"{name}: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
    raise ValueError(f"{name}: chunk_size must be a positive int or None, got {chunk_size!r}")


def _check(name, q, k, v, g, mode, chunk_size, initial_state, segment_ids):
  check_inputs(name, q, k, v, mode, chunk_size, initial_state, segment_ids)
  b, t, n, p = q.shape
  if g is not None and g.shape not in ((n,), (b, t, n), (b, t, n, p)):
    raise ValueError(f"{name}: the log-decay must be [N] = ({n},), [B, T, N] = {(b, t, n)} or [B, T, N, P] = "
                     f"{(b, t, n, p)}, got {g.shape}")


def _log_decay_BTNX(g, b, t, n):
  """The log-decay as float32 [B, T, N, X] with X = 1 (a scalar per head) or P (one per key feature)."""
  if g is None:
    return jnp.zeros((b, t, n, 1), jnp.float32)
  g = g.astype(jnp.float32)
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, None, :, None], (b, t, n, 1))
  return g[..., None] if g.ndim == 3 else g


def decayed_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array | None = None, *,
                             mode: str = "chunked", chunk_size: int | None = None,
                             initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                             return_final_state: bool = False, name: str = "decayed_linear_attention"):
  """o [B, T, N, H] float32 of the decayed recurrence (and the state after the last position, [B, N, P, H]).

  Args:
    q, k: [B, T, N, P] queries and keys (already through any feature map).
    v: [B, T, N, H] values.
    log_decay: None (no decay), [N] (a fixed decay per head), [B, T, N] or [B, T, N, P]; values <= 0.
    mode: "chunked" (default), "parallel" or "recurrent".
    chunk_size: the chunked form's chunk length (default 64, or 16 with a decay per key feature); need not
      divide T.
    initial_state: optional [B, N, P, H] state before position 0.
    segment_ids: optional [B, T]; the state resets where the id changes.
    return_final_state: also return the state after position T - 1 (float32).
    name: the caller's name in error messages.
  """
  q, k, v, log_decay, initial_state, segment_ids = as_arrays(q, k, v, log_decay, initial_state, segment_ids)
  _check(name, q, k, v, log_decay, mode, chunk_size, initial_state, segment_ids)
  b, t, n, p = q.shape
  f32 = jnp.float32
  q_BTNP, k_BTNP, v_BTNH = q.astype(f32), k.astype(f32), v.astype(f32)
  g_BTNX = _log_decay_BTNX(log_decay, b, t, n)
  s0_BNPH = jnp.zeros((b, n, p, v.shape[3]), f32) if initial_state is None else initial_state.astype(f32)
  keep_BT = keep_mask(segment_ids, b, t)
  s0_BNPH = vary_like(s0_BNPH, q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT)  # a scan carry (check_vma)
  if mode == "recurrent":
    o_BTNH, s_BNPH = _recurrent(q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT, s0_BNPH)
  elif mode == "parallel":
    o_BTNH, s_BNPH = _parallel(q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT, s0_BNPH)
  else:
    default = DEFAULT_CHUNK_SIZE if g_BTNX.shape[-1] == 1 else DEFAULT_FEATURE_DECAY_CHUNK_SIZE
    o_BTNH, s_BNPH = _chunked(q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT, s0_BNPH, chunk_size or default)
  return (o_BTNH, s_BNPH) if return_final_state else o_BTNH


def decayed_step(q_BNP: jax.Array, k_BNP: jax.Array, v_BNH: jax.Array, log_decay: jax.Array | None,
                 state_BNPH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One token per row from the state (decoding): (o [B, N, H] float32, new state [B, N, P, H] float32).

  `log_decay` is None, [N], [B, N] or [B, N, P] (the per-token shapes of `decayed_linear_attention`'s).
  """
  q_BNP, k_BNP, v_BNH, log_decay, state_BNPH = as_arrays(q_BNP, k_BNP, v_BNH, log_decay, state_BNPH)
  b, n, p = q_BNP.shape
  if k_BNP.shape != (b, n, p) or v_BNH.shape[:2] != (b, n) or state_BNPH.shape != (b, n, p, v_BNH.shape[2]):
    raise ValueError(f"decayed_step: expected q, k [B, N, P], v [B, N, H], state [B, N, P, H]; got q {q_BNP.shape}, "
                     f"k {k_BNP.shape}, v {v_BNH.shape}, state {state_BNPH.shape}")
  g_BNX = None if log_decay is None else _log_decay_BTNX(
      log_decay if log_decay.ndim == 1 else log_decay[:, None], b, 1, n)[:, 0]
  return _step(state_BNPH.astype(jnp.float32), q_BNP.astype(jnp.float32), k_BNP.astype(jnp.float32),
               v_BNH.astype(jnp.float32), g_BNX, None)


def _step(s_BNPH, q_BNP, k_BNP, v_BNH, g_BNX, keep_B):
  """S = a S + k v^T (a = exp(g), times 0 on a reset), o = S^T q."""
  if g_BNX is not None or keep_B is not None:
    a_BNX = jnp.ones((1, 1, 1), jnp.float32) if g_BNX is None else jnp.exp(g_BNX)
    if keep_B is not None:
      a_BNX = a_BNX * keep_B[:, None, None]
    s_BNPH = a_BNX[..., None] * s_BNPH
  s_BNPH = s_BNPH + k_BNP[..., None] * v_BNH[..., None, :]
  return jnp.einsum("bnp,bnph->bnh", q_BNP, s_BNPH), s_BNPH


def _recurrent(q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT, s0_BNPH):
  def step(s_BNPH, inputs):
    q_BNP, k_BNP, v_BNH, g_BNX, keep_B = inputs
    o_BNH, s_BNPH = _step(s_BNPH, q_BNP, k_BNP, v_BNH, g_BNX, keep_B)
    return s_BNPH, o_BNH

  time_major = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731
  s_BNPH, o_TBNH = lax.scan(step, s0_BNPH, tuple(map(time_major, (q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT))))
  return time_major(o_TBNH), s_BNPH


def _weighted_scores(q_BNTP, k_BNSP, decay_BNTSX):
  """sum_p q[t, p] k[s, p] decay[t, s, p] (decay[..., 0] broadcast over p when X = 1): [B, N, T, S]."""
  if decay_BNTSX.shape[-1] == 1:
    return jnp.einsum("bntp,bnsp->bnts", q_BNTP, k_BNSP) * decay_BNTSX[..., 0]
  return jnp.einsum("bntp,bnsp,bntsp->bnts", q_BNTP, k_BNSP, decay_BNTSX)


def _parallel(q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT, s0_BNPH):
  """The quadratic form over the whole sequence; decays by masked cumulative sums (exact interval sums)."""
  t = q_BTNP.shape[1]
  idx = jnp.arange(t)
  count_BT = jnp.cumsum(1.0 - keep_BT, axis=1)  # resets up to and including each position
  linked_BTS = (idx[:, None] >= idx[None, :]) & (count_BT[:, :, None] == count_BT[:, None, :])
  # span[t, s] = sum of g_i over s < i <= t: the cumulative sum over i of g_i masked to i > s.
  g_BNXT = jnp.moveaxis(g_BTNX, 1, -1)
  terms_BNXIS = jnp.where(idx[:, None] > idx[None, :], g_BNXT[..., :, None], 0.0)
  span_BNXTS = jnp.cumsum(terms_BNXIS, axis=-2)
  span_BNTSX = jnp.moveaxis(span_BNXTS, 2, -1)
  decay_BNTSX = jnp.exp(jnp.where(linked_BTS[:, None, :, :, None], span_BNTSX, -jnp.inf))
  head_major = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
  scores_BNTS = _weighted_scores(head_major(q_BTNP), head_major(k_BTNP), decay_BNTSX)
  o_BTNH = jnp.einsum("bnts,bsnh->btnh", scores_BNTS, v_BTNH)
  # The initial state reaches position t decayed by g_0..g_t, unless a reset came first.
  from_start_BTNX = jnp.exp(jnp.cumsum(g_BTNX, axis=1)) * (count_BT == 0.0)[..., None, None]
  o_BTNH = o_BTNH + jnp.einsum("btnp,bnph->btnh", q_BTNP * from_start_BTNX, s0_BNPH)
  # The end state: the last row of the decays (keys of the last document, decayed to the end) and the initial state.
  to_end_BSNX = jnp.moveaxis(decay_BNTSX[:, :, -1], 1, 2)
  s_BNPH = (from_start_BTNX[:, -1, :, :, None] * s0_BNPH
            + jnp.einsum("bsnp,bsnh->bnph", k_BTNP * to_end_BSNX, v_BTNH))
  return o_BTNH, s_BNPH


def _chunked(q_BTNP, k_BTNP, v_BTNH, g_BTNX, keep_BT, s0_BNPH, chunk):
  b, t, n, _ = q_BTNP.shape
  h = v_BTNH.shape[3]
  chunk = min(chunk, t)
  m = -(-t // chunk)
  pad = m * chunk - t

  def to_chunks(a_BTNX):  # [B, T, N, X] -> [M, B, N, C, X], head-major (the in-chunk einsums are plain batched
    a = jnp.pad(a_BTNX, [(0, 0), (0, pad), (0, 0), (0, 0)])  # matmuls); padded steps (k = 0, g = 0) keep the state
    return jnp.moveaxis(a.reshape(b, m, chunk, n, a.shape[3]), (1, 3), (0, 2))

  causal_TS = jnp.tril(jnp.ones((chunk, chunk), bool))

  def chunk_step(s_BNPH, inputs):
    q_BNCP, k_BNCP, v_BNCH, g_BNCX, keep_BC = inputs
    cum_BNCX = jnp.cumsum(g_BNCX, axis=2)  # chunk-local: differences of <= C terms are exact enough in float32
    count_BC = jnp.cumsum(1.0 - keep_BC, axis=1)
    linked_BTS = causal_TS & (count_BC[:, :, None] == count_BC[:, None, :])
    diff_BNTSX = cum_BNCX[:, :, :, None] - cum_BNCX[:, :, None, :]
    decay_BNTSX = jnp.exp(jnp.where(linked_BTS[:, None, :, :, None], diff_BNTSX, -jnp.inf))
    o_BNCH = jnp.einsum("bnts,bnsh->bnth", _weighted_scores(q_BNCP, k_BNCP, decay_BNTSX), v_BNCH)
    # The incoming state, read by each query decayed from the chunk start (zero after a reset).
    from_start_BNCX = jnp.exp(cum_BNCX) * (count_BC == 0.0)[:, None, :, None]
    o_BNCH = o_BNCH + jnp.einsum("bntp,bnph->bnth", q_BNCP * from_start_BNCX, s_BNPH)
    # The outgoing state: the incoming one decayed over the chunk, plus the chunk's keys decayed to its end.
    last_BNX = cum_BNCX[:, :, -1]
    to_end_BNCX = jnp.exp(last_BNX[:, :, None] - cum_BNCX) * (count_BC == count_BC[:, -1:])[:, None, :, None]
    chunk_decay_BNX = jnp.exp(last_BNX) * (count_BC[:, -1] == 0.0)[:, None, None]
    s_BNPH = (chunk_decay_BNX[..., None] * s_BNPH
              + jnp.einsum("bnsp,bnsh->bnph", k_BNCP * to_end_BNCX, v_BNCH))
    return s_BNPH, o_BNCH

  keep_MBC = jnp.swapaxes(jnp.pad(keep_BT, [(0, 0), (0, pad)], constant_values=1.0).reshape(b, m, chunk), 0, 1)
  # Rematerialised: the backward pass recomputes one chunk's decays and scores from its inputs instead of autodiff
  # stacking every chunk's [B, N, C, C(, P)] intermediates.
  s_BNPH, o_MBNCH = lax.scan(jax.checkpoint(chunk_step), s0_BNPH,
                             (to_chunks(q_BTNP), to_chunks(k_BTNP), to_chunks(v_BTNH), to_chunks(g_BTNX), keep_MBC))
  o_BTNH = jnp.moveaxis(o_MBNCH, (0, 2), (1, 3)).reshape(b, m * chunk, n, h)[:, :t]
  return o_BTNH, s_BNPH
