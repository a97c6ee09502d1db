"""The delta rule (DeltaNet; Schlag et al. 2021, Yang et al. 2024) in three forms, chunked by the UT transform.

Per head, the state S [P, H] is corrected towards each new value instead of only accumulating it:

    u_t = beta_t (v_t - S_{t-1}^T k_t)            (the error of the state's prediction for key k_t, times beta_t)
    S_t = S_{t-1} + k_t u_t^T = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t

with beta_t in (0, 1] and, for stability, unit-norm keys (the mixer L2-normalises them). The gated delta rule
(Gated DeltaNet, Yang et al. 2024) also decays the state by a_t = exp(g_t) in (0, 1] per head and token before the
correction (`log_decay` g [B, T, N]; None: the plain delta rule):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   i.e.  u_t = beta_t (v_t - a_t S_{t-1}^T k_t),
    S_t = a_t S_{t-1} + k_t u_t^T.

Legend: B batch, T length,
N heads, P key dim, H value dim, C chunk length; q, k [B, T, N, P], v [B, T, N, H], beta [B, T, N],
state [B, N, P, H] float32.

Forms (`mode`):
- "recurrent": `lax.scan` over T (also `delta_rule_step`, the decoding step).
- "chunked":   the UT (WY) form per chunk. Unrolling u_t over the chunk, with S_0 the incoming state,
                   u_t + beta_t sum_{s<t} (k_t . k_s) u_s = beta_t (v_t - S_0^T k_t),
               i.e. (I + strictly_lower(diag(beta) K K^T)) U = diag(beta) (V - K S_0): one unit-lower-triangular
               solve per chunk gives all the chunk's u (the UT transform T = A^-1 diag(beta) applied to V and K
               jointly, W = T K and U = T V - W S_0 in the WY notation). Then
                   O = Q S_0 + (causal_mask(Q K^T)) U,     S_C = S_0 + K^T U.
               With the gate, let G_t be the chunk-local cumulative log-decay (gamma_t = exp(G_t)) and
               Gamma[t, s] = exp(G_t - G_s) (t >= s, within one document): A = I + strictly_lower(diag(beta)
               (K K^T * Gamma)), W = A^-1 diag(beta gamma) K, U_V = A^-1 diag(beta) V, U = U_V - W S_0, then
                   O = diag(gamma) Q S_0 + (causal(Q K^T) * Gamma) U,   S_C = gamma_C S_0 + (K * Gamma[C, :])^T U.
               The solve does not involve S_0, so W = A^-1 diag(beta) K and U_V = A^-1 diag(beta) V are computed for
               every chunk at once (A^-1 by a batched forward substitution with a two-matmul backward, then one matmul,
               [T, P + H] in all) and U = U_V - W S_0; the scan
               over chunks then only carries S through matmuls. Memory is O(T (P + H + C)) plus one state per chunk:
               no per-step state is ever materialised.
- "parallel":  the same UT form over the whole sequence as one chunk: a [T, T] triangular inverse (quadratic;
               for short sequences).

Segment resets: the state is zeroed before every position whose id differs from the previous one's: inside a chunk
two positions interact only within one document, and S_0 reaches only the positions before the chunk's first reset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.linear.recurrence import check_inputs
from seqjax.ops.ssm._common import as_arrays, keep_mask
from seqjax.ops.vma import vary_like

DEFAULT_CHUNK_SIZE = 32


def check_arguments(q, k, v, beta, log_decay, mode, chunk_size, initial_state, segment_ids):
  """Clear errors for `delta_rule`'s arguments (also its context-parallel form's, `context_parallel.py`)."""
  check_inputs("delta_rule", q, k, v, mode, chunk_size, initial_state, segment_ids)
  if beta.shape != q.shape[:3]:
    raise ValueError(f"delta_rule: beta must be [B, T, N] = {q.shape[:3]}, got {beta.shape}")
  if log_decay is not None and log_decay.shape != q.shape[:3]:
    raise ValueError(f"delta_rule: log_decay (the gated delta rule's) must be [B, T, N] = {q.shape[:3]}, got "
                     f"{log_decay.shape}")


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *, log_decay: jax.Array | None = None,
               mode: str = "chunked", chunk_size: int | None = None, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, return_final_state: bool = False):
  """The (gated) delta rule: o [B, T, N, H] in v's dtype (and the state after the last position, [B, N, P, H]
  float32).

  Args:
    q, k: [B, T, N, P] queries and keys (keys of unit norm keep the recurrence contractive).
    v: [B, T, N, H] values.
    beta: [B, T, N] write strengths in (0, 1].
    log_decay: optional [B, T, N] log of the gate a_t (values <= 0; Gated DeltaNet); None: no decay (DeltaNet).
    mode: "chunked" (default, C = 32), "parallel" or "recurrent".
    chunk_size: the chunked form's chunk length; need not divide T.
    initial_state: optional [B, N, P, H].
    segment_ids: optional [B, T]; the state resets where the id changes.
    return_final_state: also return the final state.
  """
  q, k, v, beta, log_decay, initial_state, segment_ids = as_arrays(q, k, v, beta, log_decay, initial_state,
                                                                   segment_ids)
  check_arguments(q, k, v, beta, log_decay, mode, chunk_size, initial_state, segment_ids)
  b, t, n, p = q.shape
  f32 = jnp.float32
  head_major = lambda a: jnp.swapaxes(a.astype(f32), 1, 2)  # noqa: E731  [B, T, N, ...] -> [B, N, T, ...]
  q_BNTP, k_BNTP, v_BNTH, beta_BNT = map(head_major, (q, k, v, beta))
  g_BNT = None if log_decay is None else head_major(log_decay)
  s0_BNPH = jnp.zeros((b, n, p, v.shape[3]), f32) if initial_state is None else initial_state.astype(f32)
  keep_BT = keep_mask(segment_ids, b, t)
  s0_BNPH = vary_like(s0_BNPH, q_BNTP, k_BNTP, v_BNTH, beta_BNT, g_BNT, keep_BT)  # a scan carry (check_vma)
  if mode == "recurrent":
    o_BNTH, s_BNPH = _recurrent(q_BNTP, k_BNTP, v_BNTH, beta_BNT, g_BNT, keep_BT, s0_BNPH)
  else:
    chunk = t if mode == "parallel" else min(chunk_size or DEFAULT_CHUNK_SIZE, t)
    o_BNTH, s_BNPH = _chunked(q_BNTP, k_BNTP, v_BNTH, beta_BNT, g_BNT, keep_BT, s0_BNPH, chunk)
  o_BTNH = jnp.swapaxes(o_BNTH, 1, 2).astype(v.dtype)
  return (o_BTNH, s_BNPH) if return_final_state else o_BTNH


def _step(s_BNPH, q_BNP, k_BNP, v_BNH, beta_BN, g_BN=None):
  if g_BN is not None:  # the gated rule decays the state before correcting it
    s_BNPH = jnp.exp(g_BN)[..., None, None] * s_BNPH
  u_BNH = beta_BN[..., None] * (v_BNH - jnp.einsum("bnp,bnph->bnh", k_BNP, s_BNPH))
  s_BNPH = s_BNPH + k_BNP[..., None] * u_BNH[..., None, :]
  return jnp.einsum("bnp,bnph->bnh", q_BNP, s_BNPH), s_BNPH


def delta_rule_step(q_BNP: jax.Array, k_BNP: jax.Array, v_BNH: jax.Array, beta_BN: jax.Array,
                    state_BNPH: jax.Array, log_decay_BN: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One decoding step (`log_decay_BN` [B, N]: the gated rule's): (o [B, N, H] in v's dtype, new state
  [B, N, P, H] float32)."""
  q_BNP, k_BNP, v_BNH, beta_BN, state_BNPH, g_BN = as_arrays(q_BNP, k_BNP, v_BNH, beta_BN, state_BNPH,
                                                             log_decay_BN)
  f32 = jnp.float32
  o_BNH, s_BNPH = _step(state_BNPH.astype(f32), q_BNP.astype(f32), k_BNP.astype(f32), v_BNH.astype(f32),
                        beta_BN.astype(f32), None if g_BN is None else g_BN.astype(f32))
  return o_BNH.astype(v_BNH.dtype), s_BNPH


def _recurrent(q_BNTP, k_BNTP, v_BNTH, beta_BNT, g_BNT, keep_BT, s0_BNPH):
  g_BNT = jnp.zeros_like(beta_BNT) if g_BNT is None else g_BNT

  def step(s_BNPH, inputs):
    q_BNP, k_BNP, v_BNH, beta_BN, g_BN, keep_B = inputs
    o_BNH, s_BNPH = _step(s_BNPH * keep_B[:, None, None, None], q_BNP, k_BNP, v_BNH, beta_BN, g_BN)
    return s_BNPH, o_BNH

  time_major = lambda a: jnp.moveaxis(a, 2, 0)  # noqa: E731
  xs = tuple(map(time_major, (q_BNTP, k_BNTP, v_BNTH, beta_BNT, g_BNT))) + (jnp.swapaxes(keep_BT, 0, 1),)
  s_BNPH, o_TBNH = lax.scan(step, s0_BNPH, xs)
  return jnp.moveaxis(o_TBNH, 0, 2), s_BNPH


@jax.custom_vjp
def unit_lower_inverse(l_XTS: jax.Array) -> jax.Array:
  """(I + L)^-1 for strictly lower-triangular L [X, C, C], by forward substitution over the C rows (batched over X).

  On a CPU this is several times faster than XLA's batched triangular solve for chunk-sized matrices. Backward:
  d(A^-1) = -A^-1 dA A^-1, so the cotangent of L is -T^T G T^T (T the inverse, G its cotangent) — two matmuls, no
  stored substitution steps.
  """
  c = l_XTS.shape[-1]
  eye_TS = jnp.eye(c, dtype=l_XTS.dtype)

  def row(i, t_XTS):  # T[i] = e_i - L[i, :i] T[:i]  (rows >= i of T are still 0)
    return t_XTS.at[:, i, :].set(eye_TS[i] - jnp.einsum("xs,xsc->xc", l_XTS[:, i, :], t_XTS))

  return lax.fori_loop(0, c, row, jnp.zeros_like(l_XTS))


def _unit_lower_inverse_fwd(l_XTS):
  t_XTS = unit_lower_inverse(l_XTS)
  return t_XTS, t_XTS


def _unit_lower_inverse_bwd(t_XTS, g_XTS):
  t_T = jnp.swapaxes(t_XTS, -1, -2)
  return (-jnp.einsum("xab,xbc,xcd->xad", t_T, g_XTS, t_T),)


unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _chunked(q_BNTP, k_BNTP, v_BNTH, beta_BNT, g_BNT, keep_BT, s0_BNPH, chunk):
  b, n, t, p = q_BNTP.shape
  h = v_BNTH.shape[3]
  m = -(-t // chunk)
  pad = m * chunk - t

  def to_chunks(a):  # [B, N, T, ...] -> [M, B, N, C, ...]; padded steps (beta = 0, k = 0) leave the state alone
    a = jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
    return jnp.moveaxis(a.reshape(b, n, m, chunk, *a.shape[3:]), 2, 0)

  q, k, v, beta = map(to_chunks, (q_BNTP, k_BNTP, v_BNTH, beta_BNT))  # [M, B, N, C, ...]
  keep_MBC = jnp.swapaxes(jnp.pad(keep_BT, [(0, 0), (0, pad)], constant_values=1.0).reshape(b, m, chunk), 0, 1)
  count_MBC = jnp.cumsum(1.0 - keep_MBC, axis=2)
  same_MB1TS = (count_MBC[..., :, None] == count_MBC[..., None, :])[:, :, None]
  first_MB1C1 = (count_MBC == 0.0)[:, :, None, :, None]  # before the chunk's first reset: these see S_0
  last_MB1C1 = (count_MBC == count_MBC[..., -1:])[:, :, None, :, None]  # the chunk's last document writes S
  keep_state_MB = (count_MBC[..., -1] == 0.0).astype(jnp.float32)
  # The UT transform of every chunk at once (it does not depend on the incoming state): with
  # A = I + strictly_lower(diag(beta) K K^T) (within a document), W = A^-1 diag(beta) K (rows that see S_0) and
  # U = A^-1 diag(beta) V, so that a chunk's corrected values are U - W S_0.
  strict_TS = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
  causal_TS = jnp.tril(jnp.ones((chunk, chunk), bool))
  if g_BNT is None:  # DeltaNet: no decay
    gamma_MBNC1 = to_end_MBNC1 = decay_MBNTS = 1.0
    chunk_decay_MB11 = keep_state_MB[:, :, None, None]
  else:  # Gated DeltaNet: decays from chunk-local cumulative sums (all exponents used are <= 0)
    cum_MBNC = jnp.cumsum(to_chunks(g_BNT), axis=-1)
    gamma_MBNC1 = jnp.exp(cum_MBNC)[..., None]  # from the chunk start to t (read of S_0, W's rows)
    to_end_MBNC1 = jnp.exp(cum_MBNC[..., -1:] - cum_MBNC)[..., None]  # from s to the chunk end (write of S)
    linked = causal_TS & same_MB1TS
    decay_MBNTS = jnp.exp(jnp.where(linked, cum_MBNC[..., :, None] - cum_MBNC[..., None, :], -jnp.inf))
    chunk_decay_MB11 = (keep_state_MB[:, :, None] * jnp.exp(cum_MBNC[..., -1]))[..., None]
  l_MBNTS = jnp.where(strict_TS & same_MB1TS,
                      beta[..., None] * jnp.einsum("mbntp,mbnsp->mbnts", k, k) * decay_MBNTS, 0.0)
  rhs = beta[..., None] * jnp.concatenate([k * first_MB1C1 * gamma_MBNC1, v], axis=-1)
  inverse_XTS = unit_lower_inverse(l_MBNTS.reshape(-1, chunk, chunk))  # T = A^-1, then [W | U_V] = T rhs
  wu = jnp.einsum("xts,xsf->xtf", inverse_XTS, rhs.reshape(-1, chunk, p + h)).reshape(rhs.shape)
  w_MBNCP, u_MBNCH = wu[..., :p], wu[..., p:]
  qk_MBNTS = jnp.where(causal_TS & same_MB1TS, jnp.einsum("mbntp,mbnsp->mbnts", q, k) * decay_MBNTS, 0.0)

  def chunk_step(s_BNPH, inputs):
    q_first_BNCP, w_BNCP, u_BNCH, qk_BNTS, k_last_BNCP, chunk_decay_BN = inputs
    u_BNCH = u_BNCH - jnp.einsum("bntp,bnph->bnth", w_BNCP, s_BNPH)  # the corrected values u_t
    o_BNCH = (jnp.einsum("bntp,bnph->bnth", q_first_BNCP, s_BNPH) + jnp.einsum("bnts,bnsh->bnth", qk_BNTS, u_BNCH))
    s_BNPH = chunk_decay_BN[..., None, None] * s_BNPH + jnp.einsum("bnsp,bnsh->bnph", k_last_BNCP, u_BNCH)
    return s_BNPH, o_BNCH

  chunk_decay_MBN = jnp.broadcast_to(chunk_decay_MB11[..., 0], (m, b, n))
  s_BNPH, o_MBNCH = lax.scan(chunk_step, s0_BNPH, (q * first_MB1C1 * gamma_MBNC1, w_MBNCP, u_MBNCH, qk_MBNTS,
                                                   k * last_MB1C1 * to_end_MBNC1, chunk_decay_MBN))
  o_BNTH = jnp.moveaxis(o_MBNCH, 0, 2).reshape(b, n, m * chunk, h)[:, :, :t]
  return o_BNTH, s_BNPH
