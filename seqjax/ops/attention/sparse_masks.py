"""Sparse attention patterns as mask objects: Longformer (window + global tokens) and BigBird (+ random blocks).

Legend: B batch, T query length, S key length. These are masks of `seqjax.ops.attention.masks` (the same
`block` / `tile_kinds` / `span_maybe_visible` answers), so the blockwise kernel skips the tiles they rule out and
its work grows linearly with the length at a fixed window:

- `GlobalPositions(positions)`: the given positions see every key and are seen by every query (`GlobalTokens`
  with arbitrary positions, e.g. a classifier's read-out token at the end).
- `RandomBlocks(block_size, num_random, seed, ...)`: BigBird's random attention. Positions are cut into blocks of
  `block_size`; query block `qb` sees `num_random` key blocks drawn by a fixed integer hash of (seed, qb, i) —
  seeded and static, so the same draw comes back in every call, in the backward pass and in decoding. Causal: the
  draw is among the blocks strictly before `qb` (block 0 draws none); not causal: among `num_kv_blocks` blocks.
- `InDocuments(mask, q_positions_BT, kv_positions_BT)`: a position mask evaluated at per-row positions (packed
  documents, positions restarting at 0): each document sees its own global tokens and random blocks.
- `longformer(...)` and `bigbird(...)` compose them with `SlidingWindow` (and `Causal`).

What "global" means for a causal LM. With `causal=True` the pattern is `Causal() & (window | global | random)`: a
global position attends to its whole past (not to the future), and every later query attends to it. With the
global positions at the start of a document (`num_global` = g, as the mixers use them) this is a prefix of g
tokens that every token of the document sees, plus a causal window; the first g tokens themselves see their
whole (short) past. Without `causal` it is the Longformer / BigBird encoder pattern.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention.masks import EMPTY, FULL, PARTIAL

# How many query blocks of a span `RandomBlocks.span_maybe_visible` checks one by one before answering "maybe".
_SPAN_QUERY_BLOCKS = 16
_GOLDEN, _PRIME_B, _PRIME_I, _MIX = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x45D9F3B


def _hash(xp, seed: int, qb, i):
  """A 32-bit integer hash of (seed, query block, draw index); `xp` is numpy or jax.numpy (bit-identical)."""
  u32 = xp.uint32
  h = (xp.asarray(qb).astype(u32) * u32(_PRIME_B) + xp.asarray(i).astype(u32) * u32(_PRIME_I)
       + u32((seed * _GOLDEN) & 0xFFFFFFFF))
  h = (h ^ (h >> u32(16))) * u32(_MIX)
  h = (h ^ (h >> u32(16))) * u32(_MIX)
  return h ^ (h >> u32(16))


class GlobalPositions(masks_lib._Positional):  # pylint: disable=protected-access
  """The positions in `positions` (a static tuple) see every key and are seen by every query.

  On its own it allows only the pairs that involve a global position; combine it with `|`.
  """

  _statics = ("positions",)

  def __init__(self, positions: Sequence[int], q_offset=0, kv_offset=0):
    positions = tuple(sorted(set(int(p) for p in positions)))
    if any(p < 0 for p in positions):
      raise ValueError(f"GlobalPositions: positions must be non-negative ints, got {positions}")
    self.positions = positions
    self.q_offset, self.kv_offset = q_offset, kv_offset

  def _is_global(self, pos):
    if not self.positions:
      return jnp.zeros(pos.shape, bool)
    return jnp.any(pos[..., None] == jnp.asarray(self.positions, jnp.int32), axis=-1)

  def block(self, q_idx, kv_idx):
    q_pos, kv_pos = self._positions(q_idx, kv_idx)
    return (self._is_global(q_pos) | self._is_global(kv_pos))[None, None]

  def _count(self, first, last):
    g = np.asarray(self.positions, np.int64)
    return np.searchsorted(g, last, side="right") - np.searchsorted(g, first, side="left")

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    pos = self._static_positions(q_lo, q_hi, kv_lo, kv_hi)
    if pos is None:
      return super().tile_kinds(q_lo, q_hi, kv_lo, kv_hi)
    q_first, q_last, kv_first, kv_last = np.broadcast_arrays(*pos)
    q_count, kv_count = self._count(q_first, q_last), self._count(kv_first, kv_last)
    kinds = np.full(q_first.shape, PARTIAL, np.int8)
    kinds[(q_count == 0) & (kv_count == 0)] = EMPTY
    kinds[(q_count == q_last - q_first + 1) | (kv_count == kv_last - kv_first + 1)] = FULL
    return kinds

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last):
    q_first, q_last, kv_first, kv_last = self._span(q_first, q_last, kv_first, kv_last)
    g = jnp.asarray(self.positions or (-1,), jnp.int32)
    hit = lambda first, last: jnp.any((g >= first[..., None]) & (g <= last[..., None]), axis=-1)  # noqa: E731
    return hit(q_first, q_last) | hit(kv_first, kv_last)


class RandomBlocks(masks_lib._Positional):  # pylint: disable=protected-access
  """BigBird's random attention: query block `p // block_size` sees `num_random` key blocks drawn by a seeded hash.

  `causal=True`: the draws are among the blocks before the query's (block 0 draws none), so the pattern of a
  position never depends on the length (decoding finds the same blocks). `causal=False`: among the
  `num_kv_blocks` blocks of the keys (required). Two draws may coincide (then fewer distinct blocks).
  """

  _statics = ("block_size", "num_random", "seed", "causal", "num_kv_blocks")

  def __init__(self, block_size: int, num_random: int, seed: int = 0, *, causal: bool = True,
               num_kv_blocks: int | None = None, q_offset=0, kv_offset=0):
    for name, value, least in (("block_size", block_size, 1), ("num_random", num_random, 0), ("seed", seed, 0)):
      if not masks_lib._is_static(value) or value < least:  # pylint: disable=protected-access
        raise ValueError(f"RandomBlocks: {name} must be an int >= {least}, got {value!r}")
    if not causal and (num_kv_blocks is None or num_kv_blocks < 1):
      raise ValueError(f"RandomBlocks: without causal=True give num_kv_blocks (the key blocks to draw from: "
                       f"ceil(S / block_size)), got {num_kv_blocks!r}")
    self.block_size, self.num_random, self.seed = int(block_size), int(num_random), int(seed)
    self.causal, self.num_kv_blocks = bool(causal), None if causal else int(num_kv_blocks)
    self.q_offset, self.kv_offset = q_offset, kv_offset

  def draws(self, xp, qb):
    """The random key blocks of query blocks `qb` (int array [...]) as int [..., num_random]; -1 = no draw."""
    qb = xp.asarray(qb)
    i = xp.arange(self.num_random)
    h = _hash(xp, self.seed, qb[..., None], i)
    if self.causal:
      choices = xp.maximum(qb, 1)[..., None].astype(xp.uint32)
      return xp.where(qb[..., None] >= 1, (h % choices).astype(xp.int32), -1)
    return (h % xp.uint32(self.num_kv_blocks)).astype(xp.int32) + xp.zeros_like(qb[..., None], dtype=xp.int32)

  def block(self, q_idx, kv_idx):
    q_pos, kv_pos = self._positions(q_idx, kv_idx)  # [T', 1], [1, S']
    drawn = self.draws(jnp, q_pos[:, 0] // self.block_size)  # [T', R]
    kb = kv_pos // self.block_size  # [1, S']
    visible = jnp.any(drawn[:, None, :] == kb[..., None], axis=-1) & (q_pos >= 0) & (kv_pos >= 0)
    return visible[None, None]

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    pos = self._static_positions(q_lo, q_hi, kv_lo, kv_hi)
    if pos is None or min(np.min(p) for p in pos) < 0:
      return super().tile_kinds(q_lo, q_hi, kv_lo, kv_hi)
    q_first, q_last, kv_first, kv_last = (np.asarray(p) // self.block_size for p in np.broadcast_arrays(*pos))
    n_q, n_kv = int(q_last.max()) + 1, int(kv_last.max()) + 1
    drawn = self.draws(np, np.arange(n_q))  # [n_q, R]
    hits = np.zeros((n_q, n_kv + 1), np.int64)
    rows = np.repeat(np.arange(n_q), self.num_random)
    cols = drawn.reshape(-1)
    keep = (cols >= 0) & (cols < n_kv)
    hits[rows[keep], cols[keep]] = 1
    # 2-d prefix sums: the number of (query block, key block) cells of a tile's rectangle that are drawn.
    prefix = np.zeros((n_q + 1, n_kv + 1), np.int64)
    prefix[1:, 1:] = hits[:, :n_kv].cumsum(0).cumsum(1)
    count = (prefix[q_last + 1, kv_last + 1] - prefix[q_first, kv_last + 1] - prefix[q_last + 1, kv_first]
             + prefix[q_first, kv_first])
    cells = (q_last - q_first + 1) * (kv_last - kv_first + 1)
    return np.where(count == 0, EMPTY, np.where(count == cells, FULL, PARTIAL)).astype(np.int8)

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last):
    q_first, q_last, kv_first, kv_last = self._span(q_first, q_last, kv_first, kv_last)
    qb_first, qb_last = q_first // self.block_size, q_last // self.block_size
    qb = qb_first[..., None] + jnp.arange(_SPAN_QUERY_BLOCKS)  # [..., J]
    drawn = self.draws(jnp, qb)  # [..., J, R]
    kb_first, kb_last = (kv_first // self.block_size)[..., None, None], (kv_last // self.block_size)[..., None, None]
    in_span = (qb <= qb_last[..., None])[..., None] & (drawn >= kb_first) & (drawn <= kb_last)
    too_many = qb_last - qb_first >= _SPAN_QUERY_BLOCKS
    return too_many | jnp.any(in_span, axis=(-2, -1))


class InDocuments(masks_lib.Mask):
  """A position mask evaluated at per-row positions: query (b, i) sits at `q_positions[b, i]`, key (b, j) at
  `kv_positions[b, j]` (then the inner mask's own offsets apply).

  For packed documents whose positions restart at 0: each document gets the pattern it has alone (its own global
  tokens and random blocks). Combine it with `SegmentIds` so that documents do not see each other. Positions need
  not be monotone: a tile is skipped at run time when the inner mask rules out the [min, max] spans of its
  positions in every batch row; the static answer is PARTIAL.
  """

  _arrays = ("mask", "q_positions", "kv_positions")

  def __init__(self, mask: masks_lib.Mask, q_positions: jax.Array, kv_positions: jax.Array):
    if not isinstance(mask, masks_lib.Mask) or not masks_lib.is_positional(mask):
      raise ValueError(f"InDocuments: the inner mask must be a position mask (Causal, SlidingWindow, GlobalTokens, "
                       f"GlobalPositions, RandomBlocks and their & / |), got {mask!r}")
    q_positions, kv_positions = jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32)
    if q_positions.ndim != 2 or kv_positions.ndim != 2 or q_positions.shape[0] != kv_positions.shape[0]:
      raise ValueError(f"InDocuments: expected positions [B, T] and [B, S] with the same B, got "
                       f"{q_positions.shape} and {kv_positions.shape}")
    self.mask, self.q_positions, self.kv_positions = mask, q_positions, kv_positions

  def block(self, q_idx, kv_idx):
    q_pos_BT = masks_lib._take_rows(self.q_positions, q_idx)  # pylint: disable=protected-access
    kv_pos_BS = masks_lib._take_rows(self.kv_positions, kv_idx)  # pylint: disable=protected-access
    return jax.vmap(self.mask.block)(q_pos_BT, kv_pos_BS)[:, 0]  # [B, 1, T', S']

  def tile_maybe_visible(self, q_lo, q_size, kv_lo, kv_size):
    def span(positions_BT, lo, size):
      rows = lo + jnp.arange(size, dtype=jnp.int32)
      tile = masks_lib._take_rows(positions_BT, rows)  # pylint: disable=protected-access
      return tile.min(axis=1), tile.max(axis=1)
    (q_min, q_max), (kv_min, kv_max) = span(self.q_positions, q_lo, q_size), span(self.kv_positions, kv_lo, kv_size)
    test = self.mask.span_maybe_visible(q_min, q_max, kv_min, kv_max)
    return None if test is None else jnp.any(test)

  def check(self, batch, q_len, kv_len):
    check = masks_lib._check_batch_array  # pylint: disable=protected-access
    check("InDocuments.q_positions", self.q_positions, (batch, q_len), "[B, T]")
    check("InDocuments.kv_positions", self.kv_positions, (batch, kv_len), "[B, S]")


def _compose(window: int, causal: bool, *extra: masks_lib.Mask) -> masks_lib.Mask:
  if not masks_lib._is_static(window) or window < 1:  # pylint: disable=protected-access
    raise ValueError(f"sparse attention: window must be an int >= 1, got {window!r}")
  parts = (masks_lib.SlidingWindow(window - 1, 0 if causal else window - 1),) + extra
  pattern = parts[0] if len(parts) == 1 else masks_lib.Or(parts)
  return masks_lib.Causal() & pattern if causal else pattern


def _globals(num_global: int, global_positions: Sequence[int]) -> tuple[masks_lib.Mask, ...]:
  if not masks_lib._is_static(num_global) or num_global < 0:  # pylint: disable=protected-access
    raise ValueError(f"sparse attention: num_global must be an int >= 0, got {num_global!r}")
  positions = tuple(range(num_global)) + tuple(global_positions)
  return (GlobalPositions(positions),) if positions else ()


def longformer(window: int, *, num_global: int = 0, global_positions: Sequence[int] = (),
               causal: bool = True) -> masks_lib.Mask:
  """The Longformer pattern: a sliding window plus global positions.

  `window` w: causal, each query sees its w - 1 predecessors and itself; not causal, the w - 1 keys on each side
  (a window of 2w - 1 keys). Global: the first `num_global` positions and `global_positions`. Causal: the
  pattern is `Causal() & (window | global)`.
  """
  return _compose(window, causal, *_globals(num_global, global_positions))


def bigbird(window: int, *, num_global: int = 0, num_random: int = 0, block_size: int = 64, seed: int = 0,
            global_positions: Sequence[int] = (), causal: bool = True, kv_len: int | None = None) -> masks_lib.Mask:
  """The BigBird pattern: `longformer(window, num_global=...)` | `RandomBlocks(block_size, num_random, seed)`.

  Not causal, the random blocks are drawn among the ceil(kv_len / block_size) key blocks (`kv_len` required).
  """
  extra = _globals(num_global, global_positions)
  if num_random:
    if not causal and kv_len is None:
      raise ValueError("bigbird: without causal=True give kv_len (the key length the random blocks are drawn from)")
    extra += (RandomBlocks(block_size, num_random, seed, causal=causal,
                           num_kv_blocks=None if causal else -(-kv_len // block_size)),)
  return _compose(window, causal, *extra)
