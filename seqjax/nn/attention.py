"""Multi-head attention as a thin linen module over the registered attention kernels, and its KV cache.

Legend: B batch, T query length, S key length (cache slots), D width, N query heads, K kv heads, H head dim.

    x_q [B, T, D], x_kv [B, S, D] -> q [B, T, N, H], k, v [B, S, K, H] -> kernel -> out [B, T, D]

Self-attention when `x_kv` is None, cross-attention otherwise; grouped-query attention when K < N (K = 1 is
multi-query). The kernel is chosen by name from the registry in `seqjax.ops.attention` (`implementation=`).

Decoding uses an explicit cache, a `KVCache` pytree (no flax collections):

    out_BTD, (k_BTKH, v_BTKH) = mha(x_BTD, mask=..., return_kv=True)       # parallel form + its keys/values
    cache = KVCache.from_sequence(k_BTKH, v_BTKH, lengths_B, next_positions_B, size)
    out_B1D, cache = mha(x_B1D, cache=cache)                                # one token per row

Cross-attention keys and values are computed once and reused (an encoder-decoder's decoding steps):

    out_BTD, kv = mha(x_BTD, memory_BSD, mask=..., return_kv=True)          # kv = (k_BSKH, v_BSKH)
    out_BTD = mha(x_BTD, kv=kv, mask=...)                                    # the key/value projections skipped

The cache is a ring of S slots: token number a of a row lives in slot a % S, so a cache of S = window slots is a
causal sliding window of that many keys, and S = max_len a full cache. Keys are stored after RoPE, in the compute
dtype, at K kv heads (grouped-query caches stay small), laid out [B, K, S, H] (kv heads before slots: a step's
attention reads the cache where it lies, `seqjax.ops.attention.decode`). `index` [B] counts the tokens a row has seen and
`position` [B] is its next token's position, so rows may be at different places (ragged prompts). A stepped
token sees the keys of its own document only (those at most `position` tokens back); ALiBi's bias is
`-slope * distance` in tokens, as in the parallel form.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention import ring as ring_lib
from seqjax.ops.attention import positions as positions_ops
from seqjax.ops.attention import attention_weights, get_attention
from seqjax.ops.attention.decode import cache_attention
from seqjax.ops.dense.dot import flat_dot_general

Dtype = Any


class KVCache(NamedTuple):
  """The keys and values of the tokens a row has seen, in a ring of S slots (see the module docstring).

  A full-attention cache (S = the context) that is stepped past S tokens keeps the last S: it turns into a sliding
  window. Callers keep prompt + new tokens within the context (`seqjax.decode.generate` checks it).

  Attributes:
    key, value: [B, K, S, H] in the compute dtype; token number a of row b is in slot a % S (zeros where empty).
    index: int32 [B], tokens seen so far (the number of the next token).
    position: int32 [B], the next token's position in its document (RoPE; it bounds what the token sees).
  """

  key: jax.Array
  value: jax.Array
  index: jax.Array
  position: jax.Array

  @classmethod
  def empty(cls, batch_size: int, size: int, num_kv_heads: int, head_dim: int, dtype: Dtype) -> "KVCache":
    zeros = jnp.zeros((batch_size, num_kv_heads, size, head_dim), dtype)
    counter = jnp.zeros((batch_size,), jnp.int32)
    return cls(zeros, zeros, counter, counter)

  @classmethod
  def from_sequence(cls, k_BTKH: jax.Array, v_BTKH: jax.Array, lengths_B: jax.Array, next_positions_B: jax.Array,
                    size: int) -> "KVCache":
    """The cache after the first lengths[b] tokens of each row of k, v [B, T, K, H]: the last `size` of them in
    their slots, zeros elsewhere (so the cache does not depend on what follows lengths[b])."""
    length = k_BTKH.shape[1]
    last_B1 = (lengths_B - 1)[:, None]
    token_BS = last_B1 - jnp.mod(last_B1 - jnp.arange(size, dtype=jnp.int32)[None], size)  # token in each slot
    valid_BS11 = (token_BS >= 0)[..., None, None]
    source_BS11 = jnp.clip(token_BS, 0, length - 1)[..., None, None]

    def gather(x_BTKH):
      x_BSKH = jnp.where(valid_BS11, jnp.take_along_axis(x_BTKH, source_BS11, axis=1), 0).astype(x_BTKH.dtype)
      return jnp.swapaxes(x_BSKH, 1, 2)

    return cls(gather(k_BTKH), gather(v_BTKH), lengths_B.astype(jnp.int32), next_positions_B.astype(jnp.int32))

  def extend(self, k_BTKH: jax.Array, v_BTKH: jax.Array, count_B: jax.Array) -> "KVCache":
    """The cache with the first count[b] of T new tokens k, v [B, T, K, H] appended to each row b (token t into
    slot (index + t) % S, in order, as `append` would). Speculative decoding's commit: the tokens a row accepted
    go in, the others never touch its cache."""
    size, new = self.key.shape[2], k_BTKH.shape[1]
    slot_BS = jnp.arange(size, dtype=jnp.int32)[None]
    key, value = self.key, self.value
    for t in range(new):
      write_B1S1 = ((slot_BS == jnp.mod(self.index + t, size)[:, None]) & (t < count_B)[:, None])[:, None, :, None]
      key = jnp.where(write_B1S1, k_BTKH[:, t, :, None].astype(key.dtype), key)
      value = jnp.where(write_B1S1, v_BTKH[:, t, :, None].astype(value.dtype), value)
    count_B = count_B.astype(jnp.int32)
    return KVCache(key, value, self.index + count_B, self.position + count_B)

  def append(self, k_BKH: jax.Array, v_BKH: jax.Array) -> "KVCache":
    """The cache with one more token per row (written into slot index % S)."""
    rows_B = jnp.arange(self.key.shape[0])
    slot_B = jnp.mod(self.index, self.key.shape[2])
    return KVCache(self.key.at[rows_B, :, slot_B].set(k_BKH.astype(self.key.dtype)),
                   self.value.at[rows_B, :, slot_B].set(v_BKH.astype(self.value.dtype)),
                   self.index + 1, self.position + 1)


CONTEXT_PARALLEL = ("ring", "all_gather")

# Applying a model with this collection mutable (`mutable=[WEIGHTS_COLLECTION]`) makes every attention call
# without a cache also sow its probabilities [B, N, T, S] (float32, `attention_weights`) as
# `("weights",)` (a tuple of one array per call); otherwise nothing extra is computed.
WEIGHTS_COLLECTION = "attention_weights"


def context_parallel_shards() -> int:
  """Devices on the "seq" axis of the mesh set around the current trace (`jax.set_mesh`); 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or "seq" not in mesh.axis_names else mesh.shape["seq"]


def _context_parallel_attention(strategy, layout, q_BTNH, k_BSKH, v_BSKH, mask):
  """Self-attention on the context mesh's sequence shards: batch over the mesh's other axes except "tensor"."""
  if strategy not in CONTEXT_PARALLEL:
    raise ValueError(f"MultiHeadAttention: context_parallel must be one of {CONTEXT_PARALLEL}, got {strategy!r}")
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = tuple(a for a in mesh.axis_names if a not in ("seq", "tensor") and mesh.shape[a] > 1) or None
  position_mask, segment_ids = ring_lib.split_segment_ids(mask)
  kernel = ring_lib.ring_attention if strategy == "ring" else ring_lib.all_gather_attention
  spec = PartitionSpec(batch_axes, "seq")
  args = (q_BTNH, k_BSKH, v_BSKH) + (() if segment_ids is None else (segment_ids,))

  def local(q, k, v, *segments):
    return kernel(q, k, v, causal=False, layout=layout, mask=position_mask,
                  segment_ids=segments[0] if segments else None)

  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec)(*args)


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
    kernel_init: initialiser of the projection kernels.
    out_features: output width; None means the input width D.
    context_parallel: on a mesh whose "seq" axis has more than one device (the trainer sets the mesh when
      `mesh.seq > 1`), self-attention runs on the sequence shards inside `shard_map`: "ring" (K/V blocks passed
      around the ring, `ring_attention`) or "all_gather" (K/V gathered once, `all_gather_attention`). The shards
      hold the sequence in the order `context_parallel_layout` ("contiguous", "striped", "zigzag"; the caller
      permutes the batch, see `seqjax.train.tasks.lm`).
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
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  out_features: int | None = None
  context_parallel: str = "ring"
  context_parallel_layout: str = "contiguous"

  def _dense(self, features, axis, names, name):
    bias_names = names[len(names) - (len(features) if isinstance(features, tuple) else 1):]
    return nn.DenseGeneral(
        features, axis=axis, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, names), dot_general=flat_dot_general,
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_names))

  @nn.compact
  def __call__(self, x_q_BTD: jax.Array, x_kv_BSD: jax.Array | None = None, *,
               mask: masks_lib.Mask | None = None, q_positions: jax.Array | None = None,
               kv_positions: jax.Array | None = None, deterministic: bool = True, return_kv: bool = False,
               cache: KVCache | None = None, cache_mask: masks_lib.Mask | None = None,
               kv: tuple[jax.Array, jax.Array] | None = None):
    """Attention of x_q [B, T, D] over x_kv [B, S, D] (default x_q); returns [B, T, out_features or D].

    `return_kv=True` (self-attention) also returns the keys (after RoPE) and values [B, T, K, H] for
    `KVCache.from_sequence`. Applied with the collection `WEIGHTS_COLLECTION` mutable, it also sows the dense
    attention probabilities [B, N, T, S] of this call (the kernel's own result is unchanged). With a `cache`, x_q is one new token per row [B, 1, D]: it is appended to the cache
    and attends over it; returns (out [B, 1, out_features or D], the new cache). `mask` and the positions are
    then not used: the cache carries them; `cache_mask` (a position mask, e.g. a sparse pattern of
    `seqjax.ops.attention.sparse_masks`) further restricts the slots a step sees: it is evaluated at the new
    token's position (query) and each slot's token position (key).
    `kv=(k, v)` [B, S, K, H] (what `return_kv=True` returned for a
    cross-attention call) attends over those keys and values without projecting them again.
    With a cache and T > 1 new tokens per row [B, T, D] (an extension,
    speculative decoding's verification), they attend over the cache and causally over each other in one pass
    and the cache is left as it was: returns (out [B, T, ...], (k, v) [B, T, K, H] of the new tokens), and
    `cache.extend(k, v, count_B)` commits the first count[b] of them.
    """
    N = self.num_heads
    K = self.num_kv_heads or N
    if N <= 0 or K <= 0 or N % K:
      raise ValueError(f"MultiHeadAttention: num_heads={N} must be a positive multiple of num_kv_heads={K}")
    attention_fn = get_attention(self.implementation)  # ValueError on an unknown name, before any compute
    if x_q_BTD.ndim != 3:
      raise ValueError(f"MultiHeadAttention: expected x_q of shape [B, T, D], got {x_q_BTD.shape}")
    if kv is not None and (x_kv_BSD is not None or cache is not None or return_kv):
      raise ValueError("MultiHeadAttention: kv= holds precomputed cross-attention keys and values; give no x_kv, "
                       "cache or return_kv with it")
    self_attention = x_kv_BSD is None and kv is None
    if cache is not None and not self_attention:
      raise ValueError("MultiHeadAttention: a KV cache (cache=) holds self-attention keys; for cross-attention "
                       "compute the keys once (return_kv=True) and pass them as kv=")
    if cache is not None and cache_mask is not None and x_q_BTD.shape[1] != 1:
      raise ValueError(f"MultiHeadAttention: an extension of the cache by several tokens ({x_q_BTD.shape[1]}) does "
                       f"not take a cache_mask (sparse patterns); step one token at a time")
    x_kv_BSD = x_q_BTD if self_attention else x_kv_BSD
    if kv is None and (x_kv_BSD.ndim != 3 or x_kv_BSD.shape[0] != x_q_BTD.shape[0]):
      raise ValueError(f"MultiHeadAttention: expected x_kv of shape [B, S, D'] with B={x_q_BTD.shape[0]}, got "
                       f"{x_kv_BSD.shape}")
    D = x_q_BTD.shape[-1]
    H = self.head_dim or D // N
    if H <= 0 or (self.rope and H % 2):
      raise ValueError(f"MultiHeadAttention: head_dim={H} must be positive (and even with rope=True)")
    T = x_q_BTD.shape[1]

    q_BTNH = self._dense((N, H), -1, ("embed", "heads", "head_dim"), "query")(x_q_BTD)
    if kv is None:
      k_BSKH = self._dense((K, H), -1, ("embed", "kv", "head_dim"), "key")(x_kv_BSD)
      v_BSKH = self._dense((K, H), -1, ("embed", "kv", "head_dim"), "value")(x_kv_BSD)
    else:
      k_BSKH, v_BSKH = kv
      if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[0] != x_q_BTD.shape[0] or k_BSKH.shape[2:] != (K, H):
        raise ValueError(f"MultiHeadAttention: kv must be keys and values [B, S, K, H] with B={x_q_BTD.shape[0]}, "
                         f"K={K}, H={H}, got {k_BSKH.shape} and {v_BSKH.shape}")
    if self.qk_norm:
      norm = lambda name: nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name,  # noqa: E731
                                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)))
      q_BTNH = norm("query_norm")(q_BTNH)
      k_BSKH = norm("key_norm")(k_BSKH) if kv is None else k_BSKH

    if cache is not None:  # cached: the new tokens' positions come from the cache
      q_positions = kv_positions = cache.position[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    if self.rope:
      if q_positions is None:
        q_positions = jnp.arange(T, dtype=jnp.int32)[None]
      if kv_positions is None:
        kv_positions = (q_positions if self_attention else
                        jnp.arange(k_BSKH.shape[1], dtype=jnp.int32)[None])
      q_BTNH = positions_ops.apply_rope(q_BTNH, q_positions, base=self.rope_base, scaling=self.rope_scaling)
      if kv is None:
        k_BSKH = positions_ops.apply_rope(k_BSKH, kv_positions, base=self.rope_base, scaling=self.rope_scaling)

    if cache is None:
      bias = positions_ops.AlibiBias(positions_ops.alibi_slopes(N)) if self.alibi else None
      if self_attention and context_parallel_shards() > 1:
        if bias is not None:
          raise ValueError("MultiHeadAttention: ALiBi is not supported with a sequence-sharded mesh (mesh.seq > 1)")
        out_BTNH = _context_parallel_attention(self.context_parallel, self.context_parallel_layout, q_BTNH, k_BSKH,
                                               v_BSKH, mask)
      else:
        out_BTNH = attention_fn(q_BTNH, k_BSKH, v_BSKH, mask=mask, bias=bias)
      if self.is_mutable_collection(WEIGHTS_COLLECTION) and not self.is_initializing():  # attention maps, on request
        self.sow(WEIGHTS_COLLECTION, "weights", attention_weights(q_BTNH, k_BSKH, mask=mask, bias=bias))
    elif T == 1:
      out_BTNH, cache = self._attend_cache(q_BTNH, k_BSKH, v_BSKH, cache, cache_mask)
    else:
      out_BTNH = self._attend_extension(q_BTNH, k_BSKH, v_BSKH, cache)
      cache = (k_BSKH, v_BSKH)
    out_BTNH = nn.Dropout(self.dropout_rate)(out_BTNH, deterministic=deterministic)
    out_features = self.out_features or D
    out_BTD = self._dense(out_features, (-2, -1), ("heads", "head_dim", "embed"), "out")(out_BTNH)
    if cache is not None:
      return out_BTD, cache
    return (out_BTD, (k_BSKH, v_BSKH)) if return_kv else out_BTD

  def _attend_extension(self, q_BTNH, k_BTKH, v_BTKH, cache: KVCache):
    """T new tokens per row attend over the cache and causally over each other; the cache is not changed.

    Query t is token number index + t. Old slot j holds token index - 1 - ((index - 1 - j) mod S) (the last one
    written there); new key u is token index + u. A key at distance d = (query's token number - key's) is visible
    when it exists, 0 <= d < S (the S tokens a stepped query sees: the window of a ring cache) and d <= position
    + t (its own document). Keys are read before any new token is written, so a ring cache loses nothing that an
    earlier query of the extension still needs. `cache_attention` over the S + T keys.
    """
    size, new = cache.key.shape[2], q_BTNH.shape[1]
    index_B11, position_B11 = cache.index[:, None, None], cache.position[:, None, None]
    t_1T1 = jnp.arange(new, dtype=jnp.int32)[None, :, None]
    back_11S = jnp.mod(index_B11 - 1 - jnp.arange(size, dtype=jnp.int32)[None, None], size)
    old_distance_BTS = t_1T1 + 1 + back_11S
    old_visible_BTS = (back_11S <= index_B11 - 1) & (old_distance_BTS < size) & (old_distance_BTS <= position_B11 + t_1T1)
    new_distance_1TT = t_1T1 - jnp.arange(new, dtype=jnp.int32)[None, None]
    new_visible_BTT = jnp.broadcast_to((new_distance_1TT >= 0) & (new_distance_1TT < size),
                                       (q_BTNH.shape[0], new, new))
    distance_BTS = jnp.concatenate([jnp.broadcast_to(old_distance_BTS, old_visible_BTS.shape),
                                    jnp.broadcast_to(new_distance_1TT, new_visible_BTT.shape)], axis=2)
    visible_BTS = jnp.concatenate([old_visible_BTS, new_visible_BTT], axis=2)
    bias = None
    if self.alibi:
      slopes_N = positions_ops.alibi_slopes(self.num_heads)
      bias = -slopes_N[None, :, None, None] * distance_BTS[:, None].astype(jnp.float32)
    keys = jnp.concatenate([cache.key, jnp.swapaxes(k_BTKH, 1, 2).astype(cache.key.dtype)], axis=2)
    values = jnp.concatenate([cache.value, jnp.swapaxes(v_BTKH, 1, 2).astype(cache.value.dtype)], axis=2)
    return cache_attention(q_BTNH, keys, values, visible_BTS, bias)

  def _attend_cache(self, q_B1NH, k_B1KH, v_B1KH, cache: KVCache, cache_mask: masks_lib.Mask | None = None):
    """Appends one token per row to the cache and attends over it: (out [B, 1, N, H], new cache).

    Slot j holds the token `distance[b, j]` tokens back (0: the new one). It is visible when that token exists
    (distance <= index) and belongs to this document (distance <= position). `cache_attention`: for one query
    it materialises only [B, N, 1, S].
    """
    index_B1, position_B1 = cache.index[:, None], cache.position[:, None]
    cache = cache.append(k_B1KH[:, 0], v_B1KH[:, 0])
    size = cache.key.shape[2]
    distance_BS = jnp.mod(index_B1 - jnp.arange(size, dtype=jnp.int32)[None], size)
    visible_BS = (distance_BS <= index_B1) & (distance_BS <= position_B1)
    if cache_mask is not None:  # the pattern's row for the new position, over each slot's token position
      row = jax.vmap(cache_mask.block)(position_B1, position_B1 - distance_BS)  # [B, 1, 1, 1, S]
      visible_BS &= row[:, 0, 0, 0]
    bias = None
    if self.alibi:
      slopes_N = positions_ops.alibi_slopes(self.num_heads)
      bias = -slopes_N[None, :, None, None] * distance_BS[:, None, None, :].astype(jnp.float32)
    out_B1NH = cache_attention(q_B1NH, cache.key, cache.value, visible_BS[:, None], bias)
    return out_B1NH, cache
