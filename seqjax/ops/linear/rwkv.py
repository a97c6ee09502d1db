"""RWKV-6's kernels (Peng et al. 2024, "Eagle and Finch"): the wkv recurrence with its bonus, and the token shift.

The wkv of RWKV-6 is a GLA-like recurrence with a per-channel, data-dependent decay w_t = exp(g_t), whose read
happens *before* the current token is written, plus a bonus u for the current token:

    y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)  =  r_t^T S_{t-1} + (r_t . (u * k_t)) v_t
    S_t = diag(w_t) S_{t-1} + k_t v_t^T

so token s < t reaches y_t decayed by w_{s+1} ... w_{t-1} (not by w_t). It runs on the shared decayed recurrence
(`recurrence.py`, all three forms) by shifting keys, values and decays one token later inside each document:
with k'_t = k_{t-1}, v'_t = v_{t-1}, g'_t = g_{t-1} (zero at a document start), the inclusive recurrence
S'_t = diag(exp(g'_t)) S'_{t-1} + k'_t v'_t^T is RWKV's S_{t-1}, read by r_t. One extra step with q = 0 at the end
writes the last token, so the returned state is RWKV's S_{T-1} (what decoding continues from). The bonus is a
per-token term outside the recurrence.

Legend: B batch, T length, N heads, P key width, H value width, D model width. r, k [B, T, N, P], v [B, T, N, H],
log_decay [B, T, N, P] (<= 0), u [N, P]; state [B, N, P, H] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.ops.linear.recurrence import check_inputs, decayed_linear_attention
from seqjax.ops.ssm._common import as_arrays, keep_mask


def token_shift(x_BTD: jax.Array, segment_ids: jax.Array | None = None,
                previous_BD: jax.Array | None = None) -> jax.Array:
  """x_{t-1} at every position [B, T, D]: `previous_BD` (zeros if None) at position 0, zeros at every document start
  (where the segment id changes), so nothing crosses a document boundary."""
  x_BTD = jnp.asarray(x_BTD)
  b, t, d = x_BTD.shape
  first_B1D = jnp.zeros((b, 1, d), x_BTD.dtype) if previous_BD is None else jnp.asarray(previous_BD,
                                                                                         x_BTD.dtype)[:, None]
  shifted_BTD = jnp.concatenate([first_B1D, x_BTD[:, :-1]], axis=1)
  return shifted_BTD * keep_mask(segment_ids, b, t)[..., None].astype(x_BTD.dtype)


def _check(r, k, v, log_decay, u, mode, chunk_size, initial_state, segment_ids):
  check_inputs("rwkv6_wkv", r, k, v, mode, chunk_size, initial_state, segment_ids)
  if log_decay.shape != r.shape:
    raise ValueError(f"rwkv6_wkv: log_decay must be [B, T, N, P] = {r.shape} (one decay per key channel), got "
                     f"{log_decay.shape}")
  if u.shape != r.shape[2:]:
    raise ValueError(f"rwkv6_wkv: the bonus u must be [N, P] = {r.shape[2:]}, got {u.shape}")


def _bonus(r, k, v, u):
  """(r_t . (u * k_t)) v_t, float32 [B, T, N, H] (or [B, N, H] for one token)."""
  f32 = jnp.float32
  return jnp.sum(r.astype(f32) * u.astype(f32) * k.astype(f32), axis=-1, keepdims=True) * v.astype(f32)


def rwkv6_wkv(r: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array, u: jax.Array, *,
              mode: str = "chunked", chunk_size: int | None = None, initial_state: jax.Array | None = None,
              segment_ids: jax.Array | None = None, return_final_state: bool = False):
  """RWKV-6's wkv: y [B, T, N, H] float32 (and RWKV's state after the last token, [B, N, P, H] float32).

  Args:
    r, k: [B, T, N, P] receptance and keys; v [B, T, N, H] values.
    log_decay: [B, T, N, P], log w_t (<= 0; RWKV-6's -exp(w0 + lora(x))).
    u: [N, P] the bonus of the current token.
    mode, chunk_size, initial_state, segment_ids: as `decayed_linear_attention` (chunk default 16: a decay per
      key channel); the state resets at every document start.
    return_final_state: also return S_{T-1}.
  """
  r, k, v, log_decay, u, initial_state, segment_ids = as_arrays(r, k, v, log_decay, u, initial_state, segment_ids)
  _check(r, k, v, log_decay, u, mode, chunk_size, initial_state, segment_ids)
  b, t = r.shape[:2]
  f32 = jnp.float32
  keep_BT11 = keep_mask(segment_ids, b, t)[:, :, None, None]
  # One token later (zero at a document start), and one extra step at the end that only writes the last token.
  later = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :1]), a], axis=1)  # noqa: E731  [B, T + 1, ...]
  keep_ext = jnp.concatenate([keep_BT11, jnp.ones((b, 1, 1, 1), f32)], axis=1)
  k_ext = later(k.astype(f32)) * keep_ext
  v_ext = later(v.astype(f32))
  g_ext = later(log_decay.astype(f32)) * keep_ext
  r_ext = jnp.concatenate([r.astype(f32), jnp.zeros_like(r[:, :1], f32)], axis=1)
  ids_ext = None if segment_ids is None else jnp.concatenate([segment_ids, segment_ids[:, -1:]], axis=1)
  o_ext, s_BNPH = decayed_linear_attention(r_ext, k_ext, v_ext, g_ext, mode=mode, chunk_size=chunk_size,
                                           initial_state=initial_state, segment_ids=ids_ext,
                                           return_final_state=True, name="rwkv6_wkv")
  y_BTNH = o_ext[:, :t] + _bonus(r, k, v, u)
  return (y_BTNH, s_BNPH) if return_final_state else y_BTNH


def rwkv6_wkv_step(r_BNP: jax.Array, k_BNP: jax.Array, v_BNH: jax.Array, log_decay_BNP: jax.Array,
                   u_NP: jax.Array, state_BNPH: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One decoding step: (y [B, N, H] float32, the new state [B, N, P, H] float32)."""
  r_BNP, k_BNP, v_BNH, log_decay_BNP, u_NP, state_BNPH = as_arrays(r_BNP, k_BNP, v_BNH, log_decay_BNP, u_NP,
                                                                   state_BNPH)
  f32 = jnp.float32
  s_BNPH = state_BNPH.astype(f32)
  y_BNH = jnp.einsum("bnp,bnph->bnh", r_BNP.astype(f32), s_BNPH) + _bonus(r_BNP, k_BNP, v_BNH, u_NP)
  s_BNPH = (jnp.exp(log_decay_BNP.astype(f32))[..., None] * s_BNPH
            + k_BNP.astype(f32)[..., None] * v_BNH.astype(f32)[..., None, :])
  return y_BNH, s_BNPH
