"""The reference attention: materialises the [B, N, T, S] scores. The oracle for every other implementation.

`attention_weights` returns the softmax probabilities themselves (what attention maps show, seqjax/visualize.py);
`reference_attention` is those weights applied to the values.
"""

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
  B, T, _, N, K, _, H = check_inputs("reference_attention", q, k, v, mask, bias, array_bias=True)
  weights_BKGTS = _weights(q, k, causal, mask, bias, scale, K)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", weights_BKGTS.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
  return out_BTKGH.reshape(B, T, N, H).astype(q.dtype)


def _weights(q_BTNH, k_BSKH, causal, mask, bias, scale, K) -> jax.Array:
  """float32 probabilities [B, K, G, T, S] of checked inputs; rows with no visible key are 0."""
  B, T, N, H = q_BTNH.shape
  S = k_BSKH.shape[1]
  mask = masks_lib.combine(causal, mask)
  scale = default_scale(scale, H)
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    bias_BNTS = bias.block(jnp.arange(T), jnp.arange(S)) if isinstance(bias, masks_lib.TileFunction) else bias
    scores_BKGTS = scores_BKGTS + group_heads(jnp.asarray(bias_BNTS, jnp.float32), K)
  if mask is None:
    return jax.nn.softmax(scores_BKGTS, axis=-1)
  visible_BKGTS = mask.materialize(T, S)[:, :, None]
  masked = jnp.where(visible_BKGTS, scores_BKGTS, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p_BKGTS = jnp.exp(jnp.where(visible_BKGTS, scores_BKGTS - row_max, -jnp.inf))
  denom = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
  return p_BKGTS / jnp.where(denom == 0.0, 1.0, denom)


def attention_weights(q: jax.Array, k: jax.Array, *, causal: bool = False, mask: masks_lib.Mask | None = None,
                      bias: Any = None, scale: float | None = None) -> jax.Array:
  """The attention probabilities softmax_s(scale * q . k + bias | visible), float32 [B, N, T, S].

  Arguments as `reference_attention` (no values). Row (b, n, t) sums to 1 over the keys query t sees, and is 0 where
  it sees none. It materialises T x S per head: for inspecting a model (attention maps), not for training.
  """
  q, k = jnp.asarray(q), jnp.asarray(k)
  B, T, S, N, K, _, _ = check_inputs("attention_weights", q, k, k, mask, bias, array_bias=True)
  return _weights(q, k, causal, mask, bias, scale, K).reshape(B, N, T, S)
