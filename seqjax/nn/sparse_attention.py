"""The efficient softmax-attention mixers: "longformer", "bigbird" (sparse masks), "reformer" (LSH), "linformer".

Legend: B batch, T length, D width, N heads, H head dim, S cache slots / keys, P Linformer's projected length, D'
a cache ordered by distance. Heads, head dim, rope and the kernel come from `model.attention`; the patterns'
settings from `model.sparse` (docs/sparse_attention.md).

- longformer / bigbird: `AttentionMixer` with the mask of `seqjax.ops.attention.sparse_masks.longformer` /
  `bigbird` (causal: global = the first `num_global` tokens of each document, which every later token of the
  document sees). Unpacked rows get the static pattern (the blockwise kernel skips its empty tiles at trace time);
  packed rows (`segment_ids`) evaluate the pattern at each document's positions (`InDocuments`: tiles are
  skipped at run time). Decoding keeps a full KV cache (globals and random blocks reach back anywhere) and a step
  attends to the cache slots the pattern's row for the new position allows.
- reformer: LSH attention with shared queries and keys (`seqjax.ops.attention.lsh`), causal. Its state is a full
  KV cache of the normalised keys (float32, so a step hashes them exactly as the parallel form did) and values; a
  step is exact (the same rule over the cache, O(S) per token), not a fallback to full attention.
- linformer: keys and values projected along the length to P rows by learned [max_len, P] matrices, then full
  attention of every query over the P rows. Bidirectional: registered as such, refused for the causal LM (use it
  in the classify task); padding keys (segment id 0) are left out of the projections, but several packed documents
  in one row would see each other (the classify task does not pack).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.config import ModelConfig
from seqjax.nn import contract
from seqjax.nn.attention import KVCache
from seqjax.nn.mixers import AttentionMixer, compute_dtype
from seqjax.ops.attention import lsh, masks, sparse_masks
from seqjax.ops.attention import positions as positions_ops
from seqjax.ops.dense.dot import flat_dot_general


class SparsePatternMixer(AttentionMixer):
  """Causal self-attention restricted to a Longformer ("longformer") or BigBird ("bigbird") pattern."""

  kind: str = "longformer"

  def pattern(self) -> masks.Mask:
    sp = self.cfg.sparse
    if self.kind == "longformer":
      return sparse_masks.longformer(sp.window, num_global=sp.num_global)
    return sparse_masks.bigbird(sp.window, num_global=sp.num_global, num_random=sp.random_blocks,
                                block_size=sp.block_size, seed=sp.seed)

  def cache_size(self, max_len: int) -> int:
    return max_len

  def mask(self, segment_ids, positions):
    if segment_ids is None:  # one document per row: positions are 0, 1, 2, ... (the contract)
      return self.pattern()
    mask = self.pattern()
    if positions is not None:
      mask = sparse_masks.InDocuments(mask, positions, positions)
    return mask & masks.SegmentIds(segment_ids, segment_ids)

  def cache_mask(self):
    return self.pattern()


def _dense(features, axis, name, dtype):
  return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=dtype, name=name, dot_general=flat_dot_general)


class ReformerMixer(nn.Module):
  """Causal LSH self-attention (Reformer): shared query/key projection, values, output projection."""

  cfg: ModelConfig

  def _dims(self):
    cfg = self.cfg
    return cfg.attention.num_heads, cfg.resolved_head_dim

  def _rotations(self):
    sp, (N, H) = self.cfg.sparse, self._dims()
    return lsh.lsh_rotations(jax.random.key(sp.seed), N, sp.num_hashes, H, sp.num_buckets)

  def _project(self, x_BTD, positions_BT):
    N, H = self._dims()
    dtype = compute_dtype(self.cfg)
    qk_BTNH = _dense((N, H), -1, "query_key", dtype)(x_BTD)
    v_BTNH = _dense((N, H), -1, "value", dtype)(x_BTD)
    if self.cfg.positions == "rope":
      qk_BTNH = positions_ops.apply_rope(qk_BTNH, positions_BT, base=self.cfg.attention.rope_base)
    return qk_BTNH, v_BTNH

  def _out(self, y_BTNH):
    return _dense(self.cfg.d_model, (-2, -1), "out", compute_dtype(self.cfg))(y_BTNH)

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True, return_state: bool = False):
    del deterministic
    B, T, _ = x_BTD.shape
    if return_state and T > self.cfg.max_len:
      raise ValueError(f"ReformerMixer: a prompt of {T} tokens does not fit the KV cache of model.max_len="
                       f"{self.cfg.max_len} tokens; shorten it or raise model.max_len")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    qk_BTNH, v_BTNH = self._project(x_BTD, positions)
    y_BTNH = lsh.lsh_attention(qk_BTNH, v_BTNH, self._rotations(), chunk=self.cfg.sparse.chunk, causal=True,
                               segment_ids=segment_ids)
    y_BTD = self._out(y_BTNH)
    if not return_state:
      return y_BTD
    lengths_B = contract.last_token_lengths(segment_ids, B, T)
    keys_BTNH = lsh._normalize(qk_BTNH)  # pylint: disable=protected-access
    state = KVCache.from_sequence(keys_BTNH, v_BTNH, lengths_B, contract.next_positions(positions, lengths_B),
                                  self.cfg.max_len)
    return y_BTD, state

  def init_state(self, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
    N, H = self._dims()
    empty = KVCache.empty(batch_size, max_len, N, H, dtype or compute_dtype(self.cfg))
    return empty._replace(key=empty.key.astype(jnp.float32))  # hashed by the step: kept exact

  @nn.compact
  def step(self, x_BD: jax.Array, state: KVCache, *, deterministic: bool = True) -> tuple[jax.Array, KVCache]:
    del deterministic
    qk_B1NH, v_B1NH = self._project(x_BD[:, None], state.position[:, None])
    index_B1, position_B1 = state.index[:, None], state.position[:, None]
    state = state.append(lsh._normalize(qk_B1NH)[:, 0], v_B1NH[:, 0])  # pylint: disable=protected-access
    size = state.key.shape[2]  # the cache is [B, N, S, H]
    distance_D = jnp.arange(size, dtype=jnp.int32)[None]
    slot_BD = jnp.mod(index_B1 - distance_D, size)
    gather = lambda x: jnp.swapaxes(jnp.take_along_axis(x, slot_BD[:, None, :, None], axis=2), 1, 2)  # noqa: E731
    visible_BD = (distance_D <= index_B1) & (distance_D <= position_B1)
    y_BNH = lsh.lsh_attention_step(qk_B1NH[:, 0], gather(state.key), gather(state.value), visible_BD,
                                   self._rotations(), chunk=self.cfg.sparse.chunk)
    return self._out(y_BNH[:, None])[:, 0], state


class LinformerMixer(nn.Module):
  """Bidirectional Linformer self-attention: keys and values projected along the length to P = projected_len."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True, return_state: bool = False):
    del positions, deterministic
    cfg = self.cfg
    if return_state:
      raise ValueError(_NOT_CAUSAL)
    B, T, _ = x_BTD.shape
    if T > cfg.max_len:
      raise ValueError(f"LinformerMixer: {T} tokens exceed model.max_len={cfg.max_len}, the rows of its length "
                       f"projections; raise model.max_len")
    N, H, P = cfg.attention.num_heads, cfg.resolved_head_dim, cfg.sparse.projected_len
    dtype = compute_dtype(cfg)
    q_BTNH = _dense((N, H), -1, "query", dtype)(x_BTD)
    k_BTNH = _dense((N, H), -1, "key", dtype)(x_BTD)
    v_BTNH = _dense((N, H), -1, "value", dtype)(x_BTD)
    init = nn.initializers.normal(stddev=P ** -0.5)
    e_SP = self.param("project_key", init, (cfg.max_len, P), jnp.float32)[:T]
    f_SP = self.param("project_value", init, (cfg.max_len, P), jnp.float32)[:T]
    from seqjax.ops.attention.linformer import linformer_attention  # pylint: disable=import-outside-toplevel
    key_mask_BT = None if segment_ids is None else segment_ids != 0
    y_BTNH = linformer_attention(q_BTNH, k_BTNH, v_BTNH, e_SP.astype(dtype), f_SP.astype(dtype),
                                 key_mask=key_mask_BT)
    return _dense(cfg.d_model, (-2, -1), "out", dtype)(y_BTNH)

  def init_state(self, batch_size: int, max_len: int, dtype: Any = None):
    del batch_size, max_len, dtype
    raise ValueError(_NOT_CAUSAL)

  def step(self, x_BD: jax.Array, state: Any, *, deterministic: bool = True):
    del x_BD, state, deterministic
    raise ValueError(_NOT_CAUSAL)


_NOT_CAUSAL = ("linformer is bidirectional (each output mixes the whole sequence through the length projections): "
               "it has no causal form, no state and no decoding step. Use it in encoders and classifiers "
               "(task='classify'); for a causal LM choose 'longformer', 'bigbird' or 'reformer'")


def make(kind: str, cfg: ModelConfig) -> nn.Module:
  """The module of mixer `kind` (one of seqjax.config.SPARSE_ATTENTION_MIXERS)."""
  if kind in ("longformer", "bigbird"):
    return SparsePatternMixer(cfg, kind=kind)
  if kind == "reformer":
    return ReformerMixer(cfg)
  if kind == "linformer":
    return LinformerMixer(cfg)
  raise ValueError(f"unknown sparse attention mixer {kind!r}")
