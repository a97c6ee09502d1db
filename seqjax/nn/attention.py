"""Multi-head attention as a thin linen module over the registered attention kernels.

Legend: B batch, T query length, S key length, D width, N query heads, K kv heads, H head dim.

    x_q [B, T, D], x_kv [B, S, D] -> q [B, T, N, H], k, v [B, S, K, H] -> kernel -> out [B, T, D]

Self-attention when `x_kv` is None, cross-attention otherwise; grouped-query attention when K < N (K = 1 is
multi-query). The kernel is chosen by name from the registry in `seqjax.ops.attention` (`implementation=`).

KV cache (`decode=True`, self-attention): the module keeps a mutable "cache" collection with `cached_key`,
`cached_value` [B, S_max, K, H] and `cache_index` (int32). `init` with a full-length input sizes the cache
(S_max = that length); each `apply(..., mutable=["cache"])` then appends its T new keys at `cache_index` and
attends over the cache. The `mask` argument is given as for a plain forward over the new tokens: its position
masks are shifted so the new queries sit at positions `cache_index + i` (mask=None means causal), keys past the
filled part of the cache are masked out, and data masks (segment ids) must be given in cache coordinates
(kv arrays of length S_max). RoPE positions default to `cache_index + arange(T)`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention import positions as positions_ops
from seqjax.ops.attention import get_attention
from seqjax.ops.dense.dot import flat_dot_general

Dtype = Any


class MultiHeadAttention(nn.Module):
  """Multi-head (and grouped-/multi-query) attention with optional RoPE, ALiBi, QK-norm and a KV cache.

  Attributes:
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (a divisor of N); 0 means N.
    head_dim: H; 0 means D // N.
    implementation: a name in the attention registry ("blockwise", "reference", "pallas", ...).
    rope: rotate queries and keys by their positions (RoPE) with `rope_base` and `rope_scaling`.
    alibi: add the ALiBi bias (per-tile, from `alibi_slopes(N)`).
    qk_norm: RMS-normalise queries and keys per head before the dot product.
    use_bias: biases on the four projections.
    dropout_rate: dropout on the attention output (before the output projection).
    dtype / param_dtype: computation and parameter dtypes.
    decode: keep a KV cache (see the module docstring).
    kernel_init: initialiser of the projection kernels.
    out_features: output width; None means the input width D.
  """

  num_heads: int
  num_kv_heads: int = 0
  head_dim: int = 0
  implementation: str = "blockwise"
  rope: bool = False
  rope_base: float = 10000.0
  rope_scaling: tuple[str, float] | None = None
  alibi: bool = False
  qk_norm: bool = False
  use_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  out_features: int | None = None

  def _dense(self, features, axis, names, name):
    bias_names = names[len(names) - (len(features) if isinstance(features, tuple) else 1):]
    return nn.DenseGeneral(
        features, axis=axis, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, names), dot_general=flat_dot_general,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_names))

  @nn.compact
  def __call__(self, x_q_BTD: jax.Array, x_kv_BSD: jax.Array | None = None, *,
               mask: masks_lib.Mask | None = None, q_positions: jax.Array | None = None,
               kv_positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Attention of x_q [B, T, D] over x_kv [B, S, D] (default x_q); returns [B, T, out_features or D]."""
    N = self.num_heads
    K = self.num_kv_heads or N
    if N <= 0 or K <= 0 or N % K:
      raise ValueError(f"MultiHeadAttention: num_heads={N} must be a positive multiple of num_kv_heads={K}")
    attention_fn = get_attention(self.implementation)  # ValueError on an unknown name, before any compute
    if x_q_BTD.ndim != 3:
      raise ValueError(f"MultiHeadAttention: expected x_q of shape [B, T, D], got {x_q_BTD.shape}")
    self_attention = x_kv_BSD is None
    if self.decode and not self_attention:
      raise ValueError("MultiHeadAttention: decode=True keeps a cache of self-attention keys; for cross-attention "
                       "compute the keys once and call with decode=False")
    x_kv_BSD = x_q_BTD if self_attention else x_kv_BSD
    if x_kv_BSD.ndim != 3 or x_kv_BSD.shape[0] != x_q_BTD.shape[0]:
      raise ValueError(f"MultiHeadAttention: expected x_kv of shape [B, S, D'] with B={x_q_BTD.shape[0]}, got "
                       f"{x_kv_BSD.shape}")
    D = x_q_BTD.shape[-1]
    H = self.head_dim or D // N
    if H <= 0 or (self.rope and H % 2):
      raise ValueError(f"MultiHeadAttention: head_dim={H} must be positive (and even with rope=True)")
    B, T = x_q_BTD.shape[:2]

    q_BTNH = self._dense((N, H), -1, ("embed", "heads", "head_dim"), "query")(x_q_BTD)
    k_BSKH = self._dense((K, H), -1, ("embed", "kv", "head_dim"), "key")(x_kv_BSD)
    v_BSKH = self._dense((K, H), -1, ("embed", "kv", "head_dim"), "value")(x_kv_BSD)
    if self.qk_norm:
      norm = lambda name: nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name,  # noqa: E731
                                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)))
      q_BTNH, k_BSKH = norm("query_norm")(q_BTNH), norm("key_norm")(k_BSKH)

    # Where the new tokens sit: at cache_index when decoding from a filled cache, else at 0.
    cache_ready = self.decode and self.has_variable("cache", "cached_key")
    offset = self.get_variable("cache", "cache_index") if cache_ready else 0
    if self.rope:
      if q_positions is None:
        q_positions = offset + jnp.arange(T, dtype=jnp.int32)[None]
      if kv_positions is None:
        kv_positions = (q_positions if self_attention else
                        jnp.arange(x_kv_BSD.shape[1], dtype=jnp.int32)[None])
      q_BTNH = positions_ops.apply_rope(q_BTNH, q_positions, base=self.rope_base, scaling=self.rope_scaling)
      k_BSKH = positions_ops.apply_rope(k_BSKH, kv_positions, base=self.rope_base, scaling=self.rope_scaling)

    bias = positions_ops.AlibiBias(positions_ops.alibi_slopes(N)) if self.alibi else None
    if self.decode:
      k_BSKH, v_BSKH, mask, bias = self._update_cache(k_BSKH, v_BSKH, mask, bias)

    out_BTNH = attention_fn(q_BTNH, k_BSKH, v_BSKH, mask=mask, bias=bias)
    out_BTNH = nn.Dropout(self.dropout_rate)(out_BTNH, deterministic=deterministic)
    out_features = self.out_features or D
    return self._dense(out_features, (-2, -1), ("heads", "head_dim", "embed"), "out")(out_BTNH)

  def _update_cache(self, k_BTKH, v_BTKH, mask, bias):
    """Writes the new keys/values into the cache; returns (keys, values, mask, bias) to attend with."""
    initialised = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, k_BTKH.shape, k_BTKH.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, v_BTKH.shape, v_BTKH.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialised:  # `init`: size the cache from this input and attend as a plain forward.
      return k_BTKH, v_BTKH, mask, bias
    B, T = k_BTKH.shape[:2]
    max_len = cached_key.value.shape[1]
    if T > max_len:
      raise ValueError(f"MultiHeadAttention(decode=True): {T} new tokens do not fit a cache of length {max_len}")
    index = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_BTKH.astype(cached_key.value.dtype),
                                                    (0, index, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_BTKH.astype(cached_value.value.dtype),
                                                      (0, index, 0, 0))
    cache_index.value = index + T
    mask = masks_lib.Causal() if mask is None else mask
    filled = masks_lib.KeyPadding(jnp.full((B,), index + T, jnp.int32))
    mask = mask.shift(q_offset=index) & filled
    bias = None if bias is None else bias.shift(q_offset=index)
    return cached_key.value, cached_value.value, mask, bias
