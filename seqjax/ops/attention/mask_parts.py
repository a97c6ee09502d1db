"""A mask object read as the few pieces an accelerator library's attention kernel can express.

JAX's tuned kernels (TPU splash attention, the Pallas GPU kernel, cuDNN) do not take our mask objects; each takes a
band of positions (causal, a local window) plus per-token segment ids or key lengths. `decompose` reads a mask
built from `Causal`, `SlidingWindow`, `SegmentIds` and `KeyPadding` joined by `&`, with static (Python int)
offsets, into `MaskParts`:

    band      None (every key) or (left, right, offset): query row i sees key row j when
              i + offset - left <= j <= i + offset + right (left / right None = unbounded on that side);
              `Causal(q_offset, kv_offset)` is (None, 0, q_offset - kv_offset)
    segments  the `SegmentIds` (at most one), or None
    lengths   the `KeyPadding` lengths [B] (at most one), or None

Anything else (`GlobalTokens`, `PrefixLM`, `|`, `AtPositions`, traced offsets, per-tile biases) raises
`UnsupportedAttention`, a ValueError naming the piece and the backend; `seqjax.ops.attention.auto` catches it to
fall back to the blockwise kernel.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from seqjax.ops.attention import masks as masks_lib


class UnsupportedAttention(ValueError):
  """An accelerator backend cannot express this attention call (mask, bias or shapes); the message says why."""


class MaskParts(NamedTuple):
  band: tuple[int | None, int | None, int] | None
  segments: masks_lib.SegmentIds | None
  lengths: jax.Array | None


def _intersect(a: int | None, b: int | None) -> int | None:
  """The tighter of two window sides (None = unbounded)."""
  if a is None:
    return b
  return a if b is None else min(a, b)


def decompose(backend: str, mask: masks_lib.Mask | None, bias: Any = None) -> MaskParts:
  """`mask` (already combined with `causal=`) as band / segment ids / key lengths; UnsupportedAttention otherwise."""
  if bias is not None:
    raise UnsupportedAttention(f"{backend}: a score bias ({type(bias).__name__}) is not supported; use the "
                               f"'blockwise' or 'reference' implementation (or 'auto', which falls back to blockwise)")
  pieces = () if mask is None else (mask.masks if type(mask) is masks_lib.And else (mask,))
  band, offset, segments, lengths = None, None, None, None
  for piece in pieces:
    if isinstance(piece, (masks_lib.Causal, masks_lib.SlidingWindow)):
      if not (masks_lib._is_static(piece.q_offset) and masks_lib._is_static(piece.kv_offset)):  # pylint: disable=protected-access
        raise UnsupportedAttention(f"{backend}: {piece!r} has traced (array) offsets; the kernel's mask is built at "
                                   f"trace time and needs Python int offsets")
      piece_offset = int(piece.q_offset) - int(piece.kv_offset)
      if offset is not None and piece_offset != offset:
        raise UnsupportedAttention(f"{backend}: position masks with different offsets ({offset} and "
                                   f"{piece_offset}) cannot be joined into one band")
      offset = piece_offset
      left, right = (None, 0) if isinstance(piece, masks_lib.Causal) else (piece.left, piece.right)
      band = (left, right) if band is None else (_intersect(band[0], left), _intersect(band[1], right))
    elif isinstance(piece, masks_lib.SegmentIds) and segments is None:
      segments = piece
    elif isinstance(piece, masks_lib.KeyPadding) and lengths is None:
      lengths = piece.lengths
    else:
      raise UnsupportedAttention(
          f"{backend}: cannot express the mask piece {piece!r} (supported: Causal, SlidingWindow with int offsets, "
          f"one SegmentIds, one KeyPadding, joined by &); use 'blockwise' (or 'auto', which falls back to it)")
  if band is not None and band[0] is None and band[1] is None:
    band = None  # SlidingWindow(None, None): every key
  return MaskParts(None if band is None else (band[0], band[1], offset), segments, lengths)
