"""The reference attention: materialises the [B, N, T, S] scores. The oracle for every other implementation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import check_inputs, default_scale, group_heads, register_attention


@register_attention("reference")
def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                        mask: masks_lib.Mask | None = None, bias: Any = None,
                        scale: float | None = None) -> jax.Array:
  """Attention by materialising the scores: the oracle for every other implementation.

  Args:
    q: queries [B, T, N, H].
    k, v: keys and values [B, S, K, H], N a multiple of K.
    causal: add a `masks.Causal()` to `mask`.
    mask: a `seqjax.ops.attention.masks` object (True = visible), or None.
    bias: additive score bias: an array broadcastable to [B, N, T, S] (4-d), or a per-tile bias object such as
      `positions.AlibiBias`; added after scaling.
    scale: score scale, default 1 / sqrt(H).

  Returns:
    [B, T, N, H] in q's dtype; rows with no visible key are 0.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  dims = check_inputs("reference_attention", q, k, v, mask, bias, array_bias=True)
  B, T, S, N, K, G, H = dims
  mask = masks_lib.combine(causal, mask)
  scale = default_scale(scale, H)
  q_BTKGH = q.reshape(B, T, K, G, H)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    bias_BNTS = bias.block(jnp.arange(T), jnp.arange(S)) if isinstance(bias, masks_lib.TileFunction) else bias
    scores_BKGTS = scores_BKGTS + group_heads(jnp.asarray(bias_BNTS, jnp.float32), K)
  if mask is None:
    weights_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
  else:
    visible_BKGTS = mask.materialize(T, S)[:, :, None]
    masked = jnp.where(visible_BKGTS, scores_BKGTS, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p_BKGTS = jnp.exp(jnp.where(visible_BKGTS, scores_BKGTS - row_max, -jnp.inf))
    denom = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    weights_BKGTS = p_BKGTS / jnp.where(denom == 0.0, 1.0, denom)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", weights_BKGTS.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
  return out_BTKGH.reshape(B, T, N, H).astype(q.dtype)
