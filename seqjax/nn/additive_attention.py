"""Bahdanau additive attention (linen), built for step-by-step decoding.

    score[b, s] = v . tanh(W_q q[b] + W_k m[b, s] + bias)
    weights = softmax over valid source positions;  context = sum_s weights[b, s] m[b, s]

The key projection W_k m does not depend on the decoder step, so `keys` computes it once per source
sequence and every decoder step (`__call__`) only projects its query. Padded source positions
(`mask` False) get zero weight. Scores and the softmax are float32.

Dimension legend (docs/ARCHITECTURE.md): B batch, S source length, U memory width, R query width (the decoder's
recurrent state), F attention width (the hidden width of the score MLP).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class AdditiveAttention(nn.Module):
  """Additive attention with `features` (F) hidden units.

  Use: `keys_BSF = attn.keys(memory_BSU)` once, then per step
  `context_BU, weights_BS = attn(query_BR, memory_BSU, keys_BSF, mask_BS)`.
  """

  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.query_proj = nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="query")
    self.key_proj = nn.Dense(self.features, use_bias=True, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="key")
    self.v = self.param("v", nn.initializers.normal(self.features ** -0.5), (self.features,),
                        self.param_dtype)

  def keys(self, memory_BSU: Array) -> Array:
    """Pre-computes W_k m + bias: [B, S, U] -> [B, S, F]."""
    if memory_BSU.ndim != 3:
      raise ValueError(f"memory must be [B, S, U], got shape {memory_BSU.shape}.")
    return self.key_proj(memory_BSU)

  def __call__(self, query_BR: Array, memory_BSU: Array, keys_BSF: Array | None = None,
               mask_BS: Array | None = None) -> tuple[Array, Array]:
    """One decoder step: query [B, R] -> (context [B, U] in memory dtype, weights [B, S] f32)."""
    if query_BR.ndim != 2 or memory_BSU.ndim != 3 or query_BR.shape[0] != memory_BSU.shape[0]:
      raise ValueError(f"expected query [B, R] and memory [B, S, U] with the same B, got "
                       f"{query_BR.shape} and {memory_BSU.shape}.")
    if keys_BSF is None:
      keys_BSF = self.keys(memory_BSU)
    if mask_BS is not None and mask_BS.shape != memory_BSU.shape[:2]:
      raise ValueError(f"mask must be [B, S] = {memory_BSU.shape[:2]}, got {mask_BS.shape}.")
    q_BF = self.query_proj(query_BR)
    hidden_BSF = jnp.tanh((keys_BSF + q_BF[:, None, :]).astype(jnp.float32))
    scores_BS = jnp.einsum("bsf,f->bs", hidden_BSF, self.v.astype(jnp.float32))
    if mask_BS is not None:
      scores_BS = jnp.where(mask_BS, scores_BS, -1e30)
    weights_BS = jax.nn.softmax(scores_BS, axis=-1)
    if mask_BS is not None:  # an all-padding row attends to nothing instead of uniformly
      weights_BS = jnp.where(mask_BS, weights_BS, 0.0)
    context_BU = jnp.einsum("bs,bse->be", weights_BS, memory_BSU.astype(jnp.float32))
    return context_BU.astype(memory_BSU.dtype), weights_BS


def length_mask(lengths_B: Array, max_len: int) -> Array:
  """[B] lengths -> [B, S] bool mask of valid positions."""
  return jnp.arange(max_len)[None, :] < lengths_B[:, None]
