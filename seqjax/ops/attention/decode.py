"""Attention of a few new queries over a KV cache kept as [B, K, S, H]: decoding's attention.

Legend: B batch, T new queries (1 for a decoding step, k + 1 for speculative verification), S cache slots,
N query heads, K kv heads, G = N // K, H head dim.

    out[b, t, n] = sum_s softmax_s(scale * q[b, t, n] . k[b, n // G, s] + bias[b, n, t, s] | visible[b, t, s])
                   v[b, n // G, s]

The function of `reference_attention` with the keys and values in the cache's layout, [B, K, S, H] (kv heads
before slots), and the mask as a [B, T, S] visibility array. In that layout both products are batched matmuls
whose batch dimensions (b, k) already lead, so XLA reads the cache where it lies. With the [B, S, K, H] layout of
the parallel kernels, XLA:CPU copied every layer's whole key and value cache into [B, K, S, H] / [B, K, H, S] on
every decoding step to feed those matmuls: at batch 8 those copies were most of a step of the demo model
(docs/decoding.md). Scores, softmax and sums are float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cache_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, visible_BTS: jax.Array,
                    bias_BNTS: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """Attention of q [B, T, N, H] over the cache k, v [B, K, S, H]; returns [B, T, N, H] in q's dtype.

  Args:
    q_BTNH: the new queries.
    k_BKSH, v_BKSH: keys and values, N a multiple of K.
    visible_BTS: bool, the slots each query sees. A query that sees none gets 0 (and zero gradients).
    bias_BNTS: an additive score bias broadcastable to [B, N, T, S] (ALiBi), added after scaling; or None.
    scale: the score scale, default 1 / sqrt(H).
  """
  B, T, N, H = q_BTNH.shape
  if k_BKSH.ndim != 4 or k_BKSH.shape != v_BKSH.shape or k_BKSH.shape[0] != B or k_BKSH.shape[3] != H:
    raise ValueError(f"cache_attention: expected q [B, T, N, H] and k, v [B, K, S, H], got {q_BTNH.shape}, "
                     f"{k_BKSH.shape}, {v_BKSH.shape}")
  K, S = k_BKSH.shape[1], k_BKSH.shape[2]
  if N % K:
    raise ValueError(f"cache_attention: query heads N={N} must be a multiple of kv heads K={K}")
  if visible_BTS.shape != (B, T, S):
    raise ValueError(f"cache_attention: visible must be [B, T, S] = {(B, T, S)}, got {visible_BTS.shape}")
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  q_BKGTH = jnp.transpose(q_BTNH.reshape(B, T, K, G, H), (0, 2, 3, 1, 4)).reshape(B, K, G * T, H)
  scores_BKGTS = jnp.einsum("bkqh,bksh->bkqs", q_BKGTH, k_BKSH,
                            preferred_element_type=jnp.float32).reshape(B, K, G, T, S) * scale
  if bias_BNTS is not None:
    bias_BNTS = jnp.broadcast_to(jnp.asarray(bias_BNTS, jnp.float32), (B, N, T, S))
    scores_BKGTS = scores_BKGTS + bias_BNTS.reshape(B, K, G, T, S)
  visible_B11TS = visible_BTS[:, None, None]
  masked = jnp.where(visible_B11TS, scores_BKGTS, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p_BKGTS = jnp.exp(jnp.where(visible_B11TS, scores_BKGTS - row_max, -jnp.inf))
  denom = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
  p_BKGTS = p_BKGTS / jnp.where(denom == 0.0, 1.0, denom)
  out_BKQH = jnp.einsum("bkqs,bksh->bkqh", p_BKGTS.reshape(B, K, G * T, S).astype(v_BKSH.dtype), v_BKSH,
                        preferred_element_type=jnp.float32)
  out_BTNH = jnp.transpose(out_BKQH.reshape(B, K, G, T, H), (0, 3, 1, 2, 4)).reshape(B, T, N, H)
  return out_BTNH.astype(q_BTNH.dtype)
