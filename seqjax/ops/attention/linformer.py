"""Linformer attention (Wang et al. 2020): keys and values projected along the length to a fixed P rows.

Legend: B batch, T queries, S keys, N query heads, K kv heads (N % K == 0), H head dim, P the projected length.

    k'[b, p] = sum_s E[s, p] k[b, s] ,  v'[b, p] = sum_s F[s, p] v[b, s]      (E, F: [S, P])
    out[b, t] = softmax_p(scale * q[b, t] . k'[b, p]) v'[b, p]

Time and memory O(T P) instead of O(T S). Every output mixes every key: there is no causal form (the mixer is
registered as bidirectional). Keys hidden by `key_mask` (padding) are left out of the projections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linformer_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, e_SP: jax.Array, f_SP: jax.Array,
                        *, key_mask: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """Attention of q [B, T, N, H] over k, v [B, S, K, H] projected by e, f [S, P]; returns [B, T, N, H].

  `key_mask` bool [B, S] (True = a real key) drops padding from the projections. Scores and softmax in float32.
  """
  if q_BTNH.ndim != 4 or k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[0] != q_BTNH.shape[0]:
    raise ValueError(f"linformer_attention: expected q [B, T, N, H] and k, v [B, S, K, H], got {q_BTNH.shape}, "
                     f"{k_BSKH.shape}, {v_BSKH.shape}")
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if N % K:
    raise ValueError(f"linformer_attention: the {N} query heads must be a multiple of the {K} kv heads")
  if e_SP.shape != f_SP.shape or e_SP.ndim != 2 or e_SP.shape[0] != S:
    raise ValueError(f"linformer_attention: expected projections e, f of shape [S={S}, P], got {e_SP.shape} and "
                     f"{f_SP.shape}")
  if key_mask is not None:
    if key_mask.shape != (B, S):
      raise ValueError(f"linformer_attention: key_mask must be [B, S] = {(B, S)}, got {key_mask.shape}")
    keep_BS11 = key_mask[:, :, None, None]
    k_BSKH, v_BSKH = (jnp.where(keep_BS11, x, jnp.zeros((), x.dtype)) for x in (k_BSKH, v_BSKH))
  scale = H ** -0.5 if scale is None else scale
  f32 = jnp.float32
  k_BPKH = jnp.einsum("bskh,sp->bpkh", k_BSKH.astype(f32), e_SP.astype(f32))
  v_BPKH = jnp.einsum("bskh,sp->bpkh", v_BSKH.astype(f32), f_SP.astype(f32))
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H).astype(jnp.float32)
  s_BKGTP = jnp.einsum("btkgh,bpkh->bkgtp", q_BTKGH, k_BPKH) * scale
  w_BKGTP = jax.nn.softmax(s_BKGTP, axis=-1)
  out_BTKGH = jnp.einsum("bkgtp,bpkh->btkgh", w_BKGTP, v_BPKH)
  return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
