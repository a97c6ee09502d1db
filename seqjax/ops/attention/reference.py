"""Scaled dot-product attention: the reference oracle, the registry, and the fast kernels re-exported by name.

Legend: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0; G = N // K query heads share
each kv head, so multi-query and grouped-query attention never repeat K/V in memory), H head dim.

    out[b, t, n] = sum_s softmax_s(scale * q[b, t, n] . k[b, s, n // G] + bias[b, n, t, s] | visible) v[b, s, n // G]

Every implementation takes q [B, T, N, H], k and v [B, S, K, H] (the `jax.nn.dot_product_attention` layout), returns
[B, T, N, H] in q's dtype, computes the softmax in float32, and returns 0 for a query row with no visible key (in the
forward and the backward pass, never NaN). Implementations (see `available_attentions()`):

- "reference": `reference_attention`, materialises the [B, N, T, S] scores. The oracle for the others.
- "blockwise": `blockwise_attention`, flash-style tiles with an online softmax and a memory-efficient custom_vjp.
  On a CPU it runs the native kernel below where that covers the mask and bias.
- "blockwise_jax": the same, always as the JAX program (no native kernel).
- "native": `native_attention`, the same algorithm as a C++ kernel for the CPU (XLA FFI, built on first use).
- "pallas": `pallas_attention`, the same algorithm as a Pallas kernel for GPU/TPU (interpret mode on CPU).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from seqjax.ops import masks as masks_lib
from seqjax.ops.attention_base import (AttentionFn, available_attentions, check_inputs, default_scale,
                                       get_attention, group_heads, register_attention)
from seqjax.ops.attention_blockwise import blockwise_attention  # registers "blockwise", "blockwise_jax"
from seqjax.ops.attention_native import native_attention  # registers "native"
from seqjax.ops.attention_pallas import pallas_attention  # registers "pallas"

__all__ = ["AttentionFn", "available_attentions", "get_attention", "register_attention", "reference_attention",
           "blockwise_attention", "native_attention", "pallas_attention"]


@register_attention("reference")
def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                        mask: masks_lib.Mask | None = None, bias: Any = None,
                        scale: float | None = None) -> jax.Array:
  """Attention by materialising the scores: the oracle for every other implementation.

  Args:
    q: queries [B, T, N, H].
    k, v: keys and values [B, S, K, H], N a multiple of K.
    causal: add a `masks.Causal()` to `mask`.
    mask: a `seqjax.ops.masks` object (True = visible), or None.
    bias: additive score bias: an array broadcastable to [B, N, T, S] (4-d), or a per-tile bias object such as
      `positions.AlibiBias`; added after scaling.
    scale: score scale, default 1 / sqrt(H).

  Returns:
    [B, T, N, H] in q's dtype; rows with no visible key are 0.
  """
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
