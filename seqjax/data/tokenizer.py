"""Byte-level tokenizer: 256 byte tokens plus three specials.

Id layout (fixed; checkpoints and data depend on it):

  =====  =========================
  id     meaning
  =====  =========================
  0      PAD (padding, never a real target)
  1      BOS (begin of document)
  2      EOS (end of document)
  b + 3  the byte ``b`` (0 <= b < 256)
  =====  =========================

so ``vocab_size == 259``. Any text round-trips exactly (as bytes); decoding to ``str`` replaces
invalid UTF-8 with U+FFFD.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
NUM_SPECIALS = 3
BYTE_OFFSET = NUM_SPECIALS
VOCAB_SIZE = 256 + NUM_SPECIALS


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """Maps UTF-8 bytes to ids ``byte + 3``; ids 0, 1, 2 are PAD, BOS, EOS.

  Stateless and picklable (grain workers receive a copy).
  """

  pad_id: int = PAD_ID
  bos_id: int = BOS_ID
  eos_id: int = EOS_ID
  byte_offset: int = BYTE_OFFSET
  vocab_size: int = VOCAB_SIZE

  def encode(self, text: str | bytes | np.ndarray, *, add_bos: bool = False,
             add_eos: bool = False) -> np.ndarray:
    """Encodes ``text`` (``str`` is encoded as UTF-8 first) into int32 ids of shape [T].

    Args:
      text: a ``str``, ``bytes``/``bytearray`` or a 0-d numpy bytes/str scalar.
      add_bos: prepend ``bos_id``.
      add_eos: append ``eos_id``.

    Returns:
      int32 array of length ``len(bytes) + add_bos + add_eos``.
    """
    if isinstance(text, np.ndarray):
      if text.ndim != 0:
        raise ValueError(
            f"ByteTokenizer.encode takes one document (str or bytes), got an array of shape "
            f"{text.shape}; encode documents one at a time.")
      text = text.item()
    if isinstance(text, str):
      data = text.encode("utf-8")
    elif isinstance(text, (bytes, bytearray, memoryview)):
      data = bytes(text)
    else:
      raise ValueError(
          f"ByteTokenizer.encode takes str or bytes, got {type(text).__name__}.")
    ids = np.empty(len(data) + int(add_bos) + int(add_eos), dtype=np.int32)
    start = int(add_bos)
    ids[start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
    ids[start:start + len(data)] += self.byte_offset
    if add_bos:
      ids[0] = self.bos_id
    if add_eos:
      ids[-1] = self.eos_id
    return ids

  def decode_bytes(self, ids: Iterable[int] | np.ndarray) -> bytes:
    """Returns the bytes that the byte tokens in ``ids`` stand for; specials are skipped."""
    ids_T = np.asarray(ids).reshape(-1).astype(np.int64)
    if ids_T.size and (ids_T.min() < 0 or ids_T.max() >= self.vocab_size):
      raise ValueError(
          f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}); got min "
          f"{ids_T.min()}, max {ids_T.max()}.")
    byte_ids = ids_T[ids_T >= self.byte_offset] - self.byte_offset
    return byte_ids.astype(np.uint8).tobytes()

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes ids to text (UTF-8, invalid sequences become U+FFFD); specials are skipped."""
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  def num_bytes(self, ids: Iterable[int] | np.ndarray) -> int:
    """Number of byte tokens in ``ids`` (specials and padding count 0)."""
    return int(np.count_nonzero(np.asarray(ids) >= self.byte_offset))

  def token_bytes(self, ids: np.ndarray) -> np.ndarray:
    """Per-token byte count, same shape as ``ids``: 1 for byte tokens, 0 for specials (int32)."""
    return (np.asarray(ids) >= self.byte_offset).astype(np.int32)
