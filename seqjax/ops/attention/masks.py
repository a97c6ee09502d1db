"""Attention masks as small objects: a kernel asks them which tiles to compute, never a T x S array.

Legend: B batch, T query length, S key length. A mask answers two questions:

- `block(q_idx_T, kv_idx_S) -> bool [B or 1, 1, T', S']`: which (query, key) pairs of a tile are visible. The
  arguments are *array indices* (row i of q, row j of k). Only the reference kernel calls it on the whole matrix
  (`materialize`); the blockwise kernel calls it once per partial tile.
- `tile_kinds(q_lo, q_hi, kv_lo, kv_hi) -> EMPTY / PARTIAL / FULL` (numpy, vectorised over tiles, half-open
  bounds): what is known *statically* (at trace time) about a tile. Empty tiles are skipped, full tiles skip the
  masking arithmetic. Masks that hold data (segment ids, lengths) answer PARTIAL; they may also give a cheap
  traced test `tile_maybe_visible(...)` that lets the kernel skip a tile at run time.

Positions and offsets (KV caches, chunked attention). Position-based masks (`Causal`, `SlidingWindow`,
`PrefixLM`, `GlobalTokens`) compare *positions*: query row i sits at position `q_offset + i`, key row j at
`kv_offset + j`. Offsets default to 0 and may be Python ints (static: tile skipping is decided at trace time) or
int scalar arrays (traced: e.g. a chunk of queries placed after keys already seen; tiles are then tested at run
time). `shift(...)` returns the same mask with offsets moved. Data masks (`SegmentIds`, `KeyPadding`) index their
arrays by array rows.

Padding convention: in `SegmentIds`, id 0 marks padding (as produced by `seqjax.data` packing) — a padding query
sees no key and a padding key is seen by no query; rows with no visible key come out as 0 from every kernel.
Pass `padding_id=None` to treat 0 as an ordinary segment.

Masks are JAX pytrees (arrays are children, ints are static aux data), so they pass through `jax.jit`; combine
them with `&` (`And`) and `|` (`Or`), e.g. `Causal() & SegmentIds(seg, seg)` or
`SlidingWindow(128, 0) | GlobalTokens(4)`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2

_ArrayOrInt = Any  # a Python int (static) or an int scalar jax.Array (traced)


def _is_static(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class TileFunction:
  """A function of (query row, key row) evaluated per tile: the base of masks and of per-tile biases (ALiBi).

  Subclasses list their fields in three groups that decide how they flatten as a pytree. `_arrays`: always
  children (jax arrays); `_statics`: always aux data (ints, None, tuples); `_offsets`: aux data when a Python
  int, children otherwise (traced offsets).
  """

  _arrays: ClassVar[tuple[str, ...]] = ()
  _statics: ClassVar[tuple[str, ...]] = ()
  _offsets: ClassVar[tuple[str, ...]] = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_pytree_node(cls, cls._flatten, cls._unflatten)

  # ---- pytree ----------------------------------------------------------------------------------------------
  def _flatten(self):
    children, child_names, aux = [], [], []
    for name in self._arrays:
      children.append(getattr(self, name))
      child_names.append(name)
    for name in self._offsets:
      value = getattr(self, name)
      if _is_static(value):
        aux.append((name, int(value)))
      else:
        children.append(value)
        child_names.append(name)
    for name in self._statics:
      aux.append((name, getattr(self, name)))
    return tuple(children), (tuple(child_names), tuple(aux))

  @classmethod
  def _unflatten(cls, aux, children):
    obj = object.__new__(cls)
    child_names, static_items = aux
    for name, value in zip(child_names, children):
      object.__setattr__(obj, name, value)
    for name, value in static_items:
      object.__setattr__(obj, name, value)
    return obj

  def _replace(self, **updates) -> "TileFunction":
    children, aux = self._flatten()
    obj = self._unflatten(aux, children)
    for name, value in updates.items():
      object.__setattr__(obj, name, value)
    return obj

  def block(self, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array:
    """The values for query rows `q_idx` [T'] x key rows `kv_idx` [S'], shaped [B or 1, N or 1, T', S']."""
    raise NotImplementedError

  def shift(self, q_offset: _ArrayOrInt = 0, kv_offset: _ArrayOrInt = 0) -> "TileFunction":
    """The same function with query positions moved by `q_offset` and key positions by `kv_offset`."""
    return self

  def check(self, batch: int, q_len: int, kv_len: int) -> None:
    """Raises ValueError if the arrays held do not fit an attention of this batch and lengths."""

  def __repr__(self) -> str:
    fields = [f"{n}={getattr(self, n)!r}" for n in self._statics + self._offsets]
    fields += [f"{n}=<{getattr(getattr(self, n), 'shape', '?')}>" for n in self._arrays]
    return f"{type(self).__name__}({', '.join(fields)})"


class Mask(TileFunction):
  """Base class of masks: `block` returns bool [B or 1, 1, T', S'] (True = visible)."""

  def block(self, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array:
    """Visibility of the tile rows `q_idx` [T'] x keys `kv_idx` [S'] as bool [B or 1, 1, T', S']."""
    raise NotImplementedError

  def materialize(self, q_len: int, kv_len: int) -> jax.Array:
    """The whole mask, bool [B or 1, 1, T, S]. Only for the reference kernel and tests."""
    return self.block(jnp.arange(q_len, dtype=jnp.int32), jnp.arange(kv_len, dtype=jnp.int32))

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi) -> np.ndarray:
    """Static EMPTY / PARTIAL / FULL for tiles [q_lo, q_hi) x [kv_lo, kv_hi) (numpy int arrays, broadcast)."""
    shape = np.broadcast_shapes(*(np.shape(a) for a in (q_lo, q_hi, kv_lo, kv_hi)))
    return np.full(shape, PARTIAL, np.int8)

  def tile_maybe_visible(self, q_lo, q_size, kv_lo, kv_size) -> jax.Array | None:
    """A traced bool scalar, False only if the tile is certainly empty; None when there is no cheap test.

    The tile is rows [q_lo, q_lo + q_size) x keys [kv_lo, kv_lo + kv_size); starts may be traced, sizes are ints.
    """
    return None

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last) -> jax.Array | None:
    """Like `tile_maybe_visible` for rows q_first..q_last x keys kv_first..kv_last (all may be traced; inclusive).

    Only position masks answer (it is what `AtPositions` asks with the positions of a tile's first and last rows);
    None when there is no cheap test.
    """
    return None

  def __and__(self, other: "Mask") -> "Mask":
    return And((self, _as_mask(other)))

  def __or__(self, other: "Mask") -> "Mask":
    return Or((self, _as_mask(other)))


def _as_mask(m: Any) -> Mask:
  if not isinstance(m, Mask):
    raise ValueError(f"masks combine only with other mask objects from seqjax.ops.attention.masks, got "
                     f"{type(m).__name__}")
  return m


class _Positional(Mask):
  """A mask defined by query and key positions `q_offset + i`, `kv_offset + j`."""

  _offsets = ("q_offset", "kv_offset")

  def shift(self, q_offset: _ArrayOrInt = 0, kv_offset: _ArrayOrInt = 0) -> Mask:
    return self._replace(q_offset=_add(self.q_offset, q_offset), kv_offset=_add(self.kv_offset, kv_offset))

  def _offsets_static(self) -> bool:
    return _is_static(self.q_offset) and _is_static(self.kv_offset)

  def _static_positions(self, q_lo, q_hi, kv_lo, kv_hi):
    """(first q pos, last q pos, first kv pos, last kv pos) as numpy arrays, or None if offsets are traced."""
    if not (_is_static(self.q_offset) and _is_static(self.kv_offset)):
      return None
    q_lo, q_hi, kv_lo, kv_hi = (np.asarray(a, np.int64) for a in (q_lo, q_hi, kv_lo, kv_hi))
    return (q_lo + self.q_offset, q_hi - 1 + self.q_offset, kv_lo + self.kv_offset, kv_hi - 1 + self.kv_offset)

  def tile_maybe_visible(self, q_lo, q_size, kv_lo, kv_size):
    if self._offsets_static() and not self._arrays:
      return None  # tile_kinds is exact: empty tiles are never visited
    return self.span_maybe_visible(q_lo, q_lo + q_size - 1, kv_lo, kv_lo + kv_size - 1)

  def _span(self, q_first, q_last, kv_first, kv_last):
    """The span's first and last query and key positions (offsets applied)."""
    q_offset, kv_offset = jnp.asarray(self.q_offset), jnp.asarray(self.kv_offset)
    return q_first + q_offset, q_last + q_offset, kv_first + kv_offset, kv_last + kv_offset

  def _positions(self, q_idx, kv_idx):
    q_pos = jnp.asarray(q_idx, jnp.int32) + jnp.asarray(self.q_offset, jnp.int32)
    kv_pos = jnp.asarray(kv_idx, jnp.int32) + jnp.asarray(self.kv_offset, jnp.int32)
    return q_pos[:, None], kv_pos[None, :]


def _add(a: _ArrayOrInt, b: _ArrayOrInt) -> _ArrayOrInt:
  if _is_static(a) and _is_static(b):
    return int(a) + int(b)
  return jnp.asarray(a, jnp.int32) + jnp.asarray(b, jnp.int32)


def _band_kinds(d_min, d_max, lo, hi) -> np.ndarray:
  """Kinds of tiles whose key-minus-query distances span [d_min, d_max], for the band lo <= d <= hi."""
  lo = -np.inf if lo is None else lo
  hi = np.inf if hi is None else hi
  kinds = np.full(np.broadcast(d_min, d_max).shape, PARTIAL, np.int8)
  kinds[(d_max < lo) | (d_min > hi)] = EMPTY
  kinds[(d_min >= lo) & (d_max <= hi)] = FULL
  return kinds


class Causal(_Positional):
  """Query at position p sees keys at positions <= p."""

  def __init__(self, q_offset: _ArrayOrInt = 0, kv_offset: _ArrayOrInt = 0):
    self.q_offset, self.kv_offset = q_offset, kv_offset

  def block(self, q_idx, kv_idx):
    q_pos, kv_pos = self._positions(q_idx, kv_idx)
    return (kv_pos <= q_pos)[None, None]

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    pos = self._static_positions(q_lo, q_hi, kv_lo, kv_hi)
    if pos is None:
      return super().tile_kinds(q_lo, q_hi, kv_lo, kv_hi)
    q_first, q_last, kv_first, kv_last = pos
    return _band_kinds(kv_first - q_last, kv_last - q_first, None, 0)

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last):
    _, q_last, kv_first, _ = self._span(q_first, q_last, kv_first, kv_last)
    return kv_first <= q_last


class SlidingWindow(_Positional):
  """Query at position p sees keys at positions p - left ... p + right (None = unbounded on that side).

  `SlidingWindow(w - 1, 0)` is a causal window of w keys (the query included).
  """

  _statics = ("left", "right")

  def __init__(self, left: int | None, right: int | None = 0, q_offset: _ArrayOrInt = 0,
               kv_offset: _ArrayOrInt = 0):
    for name, w in (("left", left), ("right", right)):
      if w is not None and (not _is_static(w) or w < 0):
        raise ValueError(f"SlidingWindow: {name} must be a non-negative int or None, got {w!r}")
    self.left, self.right = left, right
    self.q_offset, self.kv_offset = q_offset, kv_offset

  def block(self, q_idx, kv_idx):
    q_pos, kv_pos = self._positions(q_idx, kv_idx)
    d = kv_pos - q_pos
    visible = jnp.ones(d.shape, bool)
    if self.left is not None:
      visible &= d >= -self.left
    if self.right is not None:
      visible &= d <= self.right
    return visible[None, None]

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    pos = self._static_positions(q_lo, q_hi, kv_lo, kv_hi)
    if pos is None:
      return super().tile_kinds(q_lo, q_hi, kv_lo, kv_hi)
    q_first, q_last, kv_first, kv_last = pos
    return _band_kinds(kv_first - q_last, kv_last - q_first, None if self.left is None else -self.left,
                       self.right)

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last):
    q_first, q_last, kv_first, kv_last = self._span(q_first, q_last, kv_first, kv_last)
    ok = jnp.asarray(True)
    if self.left is not None:
      ok &= kv_last - q_first >= -self.left
    if self.right is not None:
      ok &= kv_first - q_last <= self.right
    return ok


class GlobalTokens(_Positional):
  """Longformer-style global tokens: the first `num_global` positions see every key and are seen by every query.

  On its own it allows only the pairs that involve a global token; combine it with `|`, e.g.
  `Causal() & (SlidingWindow(255, 0) | GlobalTokens(8))`.
  """

  _statics = ("num_global",)

  def __init__(self, num_global: int, q_offset: _ArrayOrInt = 0, kv_offset: _ArrayOrInt = 0):
    if not _is_static(num_global) or num_global < 0:
      raise ValueError(f"GlobalTokens: num_global must be a non-negative int, got {num_global!r}")
    self.num_global = int(num_global)
    self.q_offset, self.kv_offset = q_offset, kv_offset

  def block(self, q_idx, kv_idx):
    q_pos, kv_pos = self._positions(q_idx, kv_idx)
    return ((q_pos < self.num_global) | (kv_pos < self.num_global))[None, None]

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    pos = self._static_positions(q_lo, q_hi, kv_lo, kv_hi)
    if pos is None:
      return super().tile_kinds(q_lo, q_hi, kv_lo, kv_hi)
    q_first, q_last, kv_first, kv_last = pos
    g = self.num_global
    kinds = np.full(np.broadcast(q_first, kv_first).shape, PARTIAL, np.int8)
    kinds[(q_first >= g) & (kv_first >= g)] = EMPTY
    kinds[(q_last < g) | (kv_last < g)] = FULL
    return kinds

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last):
    q_first, _, kv_first, _ = self._span(q_first, q_last, kv_first, kv_last)
    return (q_first < self.num_global) | (kv_first < self.num_global)


def _check_batch_array(name: str, x: jax.Array, shape: tuple[int, ...], what: str) -> None:
  if tuple(x.shape) != shape:
    raise ValueError(f"{name}: expected {what} of shape {shape}, got {tuple(x.shape)}")


def _take_rows(x_BT: jax.Array, idx: jax.Array) -> jax.Array:
  """x[:, idx] with indices clipped into range (tiles past the end are masked by the kernel anyway)."""
  return jnp.take(x_BT, jnp.asarray(idx, jnp.int32), axis=1, mode="clip")


class SegmentIds(Mask):
  """Packed sequences: query (b, i) sees key (b, j) only when `q_ids[b, i] == kv_ids[b, j]`.

  `q_ids` int [B, T], `kv_ids` int [B, S]. Id `padding_id` (default 0) is padding: it sees and is seen by nothing.
  """

  _arrays = ("q_ids", "kv_ids")
  _statics = ("padding_id",)

  def __init__(self, q_ids: jax.Array, kv_ids: jax.Array, padding_id: int | None = 0):
    q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    if q_ids.ndim != 2 or kv_ids.ndim != 2 or q_ids.shape[0] != kv_ids.shape[0]:
      raise ValueError(f"SegmentIds: expected q_ids [B, T] and kv_ids [B, S] with the same B, got "
                       f"{q_ids.shape} and {kv_ids.shape}")
    self.q_ids, self.kv_ids, self.padding_id = q_ids, kv_ids, padding_id

  def block(self, q_idx, kv_idx):
    q_BT = _take_rows(self.q_ids, q_idx)[:, :, None]
    kv_BS = _take_rows(self.kv_ids, kv_idx)[:, None, :]
    visible = q_BT == kv_BS
    if self.padding_id is not None:
      visible &= q_BT != self.padding_id
    return visible[:, None]

  def tile_maybe_visible(self, q_lo, q_size, kv_lo, kv_size):
    # Conservative: in some batch row the id ranges of the two tiles overlap.
    def id_range(ids_BT, lo, size):
      tile = _take_rows(ids_BT, lo + jnp.arange(size, dtype=jnp.int32))
      return tile.min(axis=1), tile.max(axis=1)
    (q_min, q_max), (kv_min, kv_max) = id_range(self.q_ids, q_lo, q_size), id_range(self.kv_ids, kv_lo, kv_size)
    return jnp.any((q_min <= kv_max) & (kv_min <= q_max))

  def check(self, batch, q_len, kv_len):
    _check_batch_array("SegmentIds.q_ids", self.q_ids, (batch, q_len), "[B, T]")
    _check_batch_array("SegmentIds.kv_ids", self.kv_ids, (batch, kv_len), "[B, S]")


class KeyPadding(Mask):
  """Keys j >= lengths[b] are padding and seen by no query. `lengths` int [B]."""

  _arrays = ("lengths",)

  def __init__(self, lengths: jax.Array):
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1:
      raise ValueError(f"KeyPadding: expected lengths of shape [B], got {lengths.shape}")
    self.lengths = lengths

  def block(self, q_idx, kv_idx):
    kv_idx = jnp.asarray(kv_idx, jnp.int32)
    return (kv_idx[None, None, None, :] < self.lengths[:, None, None, None]) & jnp.ones(
        (1, 1, jnp.shape(q_idx)[0], 1), bool)

  def tile_maybe_visible(self, q_lo, q_size, kv_lo, kv_size):
    return kv_lo < jnp.max(self.lengths)

  def check(self, batch, q_len, kv_len):
    _check_batch_array("KeyPadding.lengths", self.lengths, (batch,), "[B]")


class PrefixLM(_Positional):
  """Prefix-LM: key position j is visible to query position i when j <= i or j < prefix_lengths[b].

  The prefix (the "input") attends bidirectionally; the rest is causal. `prefix_lengths` int [B].
  """

  _arrays = ("prefix_lengths",)

  def __init__(self, prefix_lengths: jax.Array, q_offset: _ArrayOrInt = 0, kv_offset: _ArrayOrInt = 0):
    prefix_lengths = jnp.asarray(prefix_lengths)
    if prefix_lengths.ndim != 1:
      raise ValueError(f"PrefixLM: expected prefix_lengths of shape [B], got {prefix_lengths.shape}")
    self.prefix_lengths = prefix_lengths
    self.q_offset, self.kv_offset = q_offset, kv_offset

  def block(self, q_idx, kv_idx):
    q_pos, kv_pos = self._positions(q_idx, kv_idx)
    causal = (kv_pos <= q_pos)[None, None]
    prefix = kv_pos[None, None] < self.prefix_lengths[:, None, None, None]
    return causal | prefix

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    kinds = Causal(self.q_offset, self.kv_offset).tile_kinds(q_lo, q_hi, kv_lo, kv_hi)
    return np.where(kinds == FULL, FULL, PARTIAL).astype(np.int8)

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last):
    _, q_last, kv_first, _ = self._span(q_first, q_last, kv_first, kv_last)
    return (kv_first <= q_last) | (kv_first < jnp.max(self.prefix_lengths))

  def check(self, batch, q_len, kv_len):
    _check_batch_array("PrefixLM.prefix_lengths", self.prefix_lengths, (batch,), "[B]")


class And(Mask):
  """Visible where every mask is visible."""

  _arrays = ("masks",)

  def __init__(self, masks: Sequence[Mask]):
    flat = []
    for m in masks:
      flat.extend(m.masks if type(_as_mask(m)) is And else (m,))
    self.masks = tuple(flat)

  def block(self, q_idx, kv_idx):
    out = self.masks[0].block(q_idx, kv_idx)
    for m in self.masks[1:]:
      out = out & m.block(q_idx, kv_idx)
    return out

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    return np.minimum.reduce([m.tile_kinds(q_lo, q_hi, kv_lo, kv_hi) for m in self.masks]).astype(np.int8)

  def tile_maybe_visible(self, q_lo, q_size, kv_lo, kv_size):
    return self._combine_tests([m.tile_maybe_visible(q_lo, q_size, kv_lo, kv_size) for m in self.masks])

  def span_maybe_visible(self, q_first, q_last, kv_first, kv_last):
    return self._combine_tests([m.span_maybe_visible(q_first, q_last, kv_first, kv_last) for m in self.masks])

  @staticmethod
  def _combine_tests(tests):
    tests = [t for t in tests if t is not None]
    if not tests:
      return None
    out = tests[0]
    for t in tests[1:]:
      out = out & t
    return out

  def shift(self, q_offset=0, kv_offset=0):
    return And([m.shift(q_offset, kv_offset) for m in self.masks])

  def check(self, batch, q_len, kv_len):
    for m in self.masks:
      m.check(batch, q_len, kv_len)

  def __repr__(self):
    return " & ".join(f"({m!r})" for m in self.masks)


class Or(And):
  """Visible where any mask is visible."""

  def __init__(self, masks: Sequence[Mask]):
    flat = []
    for m in masks:
      flat.extend(m.masks if type(_as_mask(m)) is Or else (m,))
    self.masks = tuple(flat)

  def block(self, q_idx, kv_idx):
    out = self.masks[0].block(q_idx, kv_idx)
    for m in self.masks[1:]:
      out = out | m.block(q_idx, kv_idx)
    return out

  def tile_kinds(self, q_lo, q_hi, kv_lo, kv_hi):
    return np.maximum.reduce([m.tile_kinds(q_lo, q_hi, kv_lo, kv_hi) for m in self.masks]).astype(np.int8)

  @staticmethod
  def _combine_tests(tests):
    if any(t is None for t in tests):
      return None
    out = tests[0]
    for t in tests[1:]:
      out = out | t
    return out

  def shift(self, q_offset=0, kv_offset=0):
    return Or([m.shift(q_offset, kv_offset) for m in self.masks])

  def __repr__(self):
    return " | ".join(f"({m!r})" for m in self.masks)


def is_positional(mask: Mask) -> bool:
  """True when the mask looks only at positions (`Causal`, `SlidingWindow`, `GlobalTokens`, `PrefixLM` and their
  `&` / `|`), never at array rows (`SegmentIds`, `KeyPadding` index their arrays by row)."""
  if isinstance(mask, (And, Or)):
    return all(is_positional(m) for m in mask.masks)
  return isinstance(mask, _Positional)


class AtPositions(Mask):
  """A position mask evaluated at explicit positions: query row i sits at `q_positions[i]`, key row j at
  `kv_positions[j]` (then the inner mask's own offsets apply).

  For rows that are not consecutive positions, e.g. one device's shard of a sequence laid out striped or zigzag
  over a ring (`seqjax.ops.attention.ring`). Both position vectors must be non-decreasing: a tile's span of
  positions is then read from its first and last rows, which gives the run-time tile test (`tile_maybe_visible`);
  the static tile answer is PARTIAL.
  """

  _arrays = ("mask", "q_positions", "kv_positions")

  def __init__(self, mask: Mask, q_positions: jax.Array, kv_positions: jax.Array):
    if not isinstance(mask, Mask) or not is_positional(mask):
      raise ValueError(f"AtPositions: the inner mask must be a position mask (Causal, SlidingWindow, GlobalTokens, "
                       f"PrefixLM and their & / |), got {mask!r}; combine data masks (SegmentIds) outside it")
    q_positions, kv_positions = jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32)
    if q_positions.ndim != 1 or kv_positions.ndim != 1:
      raise ValueError(f"AtPositions: positions must be 1-d [T] and [S], got {q_positions.shape} and "
                       f"{kv_positions.shape}")
    self.mask, self.q_positions, self.kv_positions = mask, q_positions, kv_positions

  def block(self, q_idx, kv_idx):
    q_pos = jnp.take(self.q_positions, jnp.asarray(q_idx, jnp.int32), mode="clip")
    kv_pos = jnp.take(self.kv_positions, jnp.asarray(kv_idx, jnp.int32), mode="clip")
    return self.mask.block(q_pos, kv_pos)

  def tile_maybe_visible(self, q_lo, q_size, kv_lo, kv_size):
    def first_last(positions, lo, size):
      return (jnp.take(positions, jnp.asarray(lo, jnp.int32), mode="clip"),
              jnp.take(positions, jnp.asarray(lo + size - 1, jnp.int32), mode="clip"))
    return self.mask.span_maybe_visible(*first_last(self.q_positions, q_lo, q_size),
                                        *first_last(self.kv_positions, kv_lo, kv_size))

  def check(self, batch, q_len, kv_len):
    if self.q_positions.shape != (q_len,) or self.kv_positions.shape != (kv_len,):
      raise ValueError(f"AtPositions: expected positions of shapes ({q_len},) and ({kv_len},), got "
                       f"{self.q_positions.shape} and {self.kv_positions.shape}")
    self.mask.check(batch, q_len, kv_len)


def combine(causal: bool, mask: Mask | None) -> Mask | None:
  """The mask an attention kernel applies for its `causal=` and `mask=` arguments."""
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(f"mask must be a seqjax.ops.attention.masks object (e.g. masks.Causal()), got "
                     f"{type(mask).__name__}; to pass a boolean array use the reference kernel with `bias` instead")
  if causal:
    return Causal() if mask is None else Causal() & mask
  return mask
