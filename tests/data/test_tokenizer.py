"""Tests for the byte tokenizer's id layout and round trips."""
import numpy as np
import pytest

from seqjax.data import tokenizer as tok_lib
from seqjax.data.tokenizer import ByteTokenizer


def test_id_layout():
  tok = ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 259 == tok_lib.VOCAB_SIZE
  ids = tok.encode(bytes(range(256)))
  np.testing.assert_array_equal(ids, np.arange(256) + 3)
  assert ids.dtype == np.int32


@pytest.mark.parametrize("text", ["", "hello", "def f(x):\n    return x  # é ü 漢字 🙂\n"])
def test_round_trip_str_and_bytes(text):
  tok = ByteTokenizer()
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert len(ids) == len(text.encode()) + 2
  assert tok.decode(ids) == text
  np.testing.assert_array_equal(tok.encode(text.encode()), tok.encode(text))
  assert tok.num_bytes(ids) == len(text.encode())
  np.testing.assert_array_equal(tok.token_bytes(ids), (ids >= 3).astype(np.int32))


def test_specials_and_padding_are_skipped():
  tok = ByteTokenizer()
  ids = np.array([1, ord("a") + 3, 0, 2, ord("b") + 3, 0, 0])
  assert tok.decode(ids) == "ab"
  assert tok.num_bytes(ids) == 2


def test_invalid_utf8_is_replaced_but_bytes_round_trip():
  tok = ByteTokenizer()
  raw = b"caf\xe9 \xff"
  ids = tok.encode(raw)
  assert tok.decode_bytes(ids) == raw
  assert tok.decode(ids) == "caf\ufffd \ufffd"


def test_numpy_scalar_input():
  tok = ByteTokenizer()
  np.testing.assert_array_equal(tok.encode(np.array(b"xy", dtype=object)), [ord("x") + 3, ord("y") + 3])


def test_bad_inputs_raise():
  tok = ByteTokenizer()
  with pytest.raises(ValueError, match="str or bytes"):
    tok.encode(123)
  with pytest.raises(ValueError, match="one document"):
    tok.encode(np.array([b"a", b"b"]))
  with pytest.raises(ValueError, match=r"\[0, 259\)"):
    tok.decode([5, 300])
