"""numbers_to_words: integers written as digits -> the same number in English words.

    "1204" -> "one thousand two hundred four"

A seq2seq task built offline as a TFDS builder (array_record, no TensorFlow needed). Target length
grows with the number of digits, so a length curriculum (short numbers first) is natural.

Examples are drawn per digit count d = 1..max_digits (uniform numbers with exactly d digits, no
leading zeros, sampled without repetition), so every length is represented. Splits are disjoint
by construction: a number belongs to train / validation / test by a fixed hash of its value
(90 / 5 / 5 %), and each split only samples numbers of its own bucket. Everything is seeded, so
two builds give identical files.

Also here: `number_to_words`, a character vocabulary shared by source and target
(`CharVocab`), and `padded_batches`, which yields padded numpy batches honouring a
max-target-length function of the step (a `seqjax.train.schedules.LengthCurriculum`).

Usage:
    builder = numbers.make_builder(data_dir="/tmp/tfds", config="small")
    builder.download_and_prepare()
    pairs = numbers.load_pairs(builder, "train")
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10 ** 12, "trillion"), (10 ** 9, "billion"), (10 ** 6, "million"), (1000, "thousand"))
MAX_NUMBER = 10 ** 15 - 1


def _below_thousand(n: int) -> list[str]:
  words = []
  if n >= 100:
    words += [_ONES[n // 100], "hundred"]
    n %= 100
  if n >= 20:
    words.append(_TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else ""))
  elif n:
    words.append(_ONES[n])
  return words


def number_to_words(n: int) -> str:
  """Non-negative integer -> American English words without "and", hyphenated tens:
  0 -> "zero", 21 -> "twenty-one", 1204 -> "one thousand two hundred four"."""
  n = int(n)
  if not 0 <= n <= MAX_NUMBER:
    raise ValueError(f"number_to_words supports 0 <= n <= {MAX_NUMBER}, got {n}.")
  if n == 0:
    return "zero"
  words = []
  for value, name in _SCALES:
    if n >= value:
      words += _below_thousand(n // value) + [name]
      n %= value
  words += _below_thousand(n)
  return " ".join(words)


# ------------------------------------------------------------------------------------------------
# Character vocabulary.
# ------------------------------------------------------------------------------------------------
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz -"


class CharVocab:
  """Character-level vocabulary for digits and number words: 4 specials, then characters."""

  def __init__(self, chars: str = _CHARS):
    self.tokens = _SPECIALS + tuple(chars)
    self._ids = {c: i for i, c in enumerate(self.tokens)}

  @property
  def size(self) -> int:
    return len(self.tokens)

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(c, UNK_ID) for c in text]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Characters up to the first EOS; PAD and BOS are skipped."""
    out = []
    for i in np.asarray(ids).tolist():
      if i == EOS_ID:
        break
      if i in (PAD_ID, BOS_ID):
        continue
      out.append(self.tokens[i] if 0 <= i < len(self.tokens) else "?")
    return "".join(out)


VOCAB = CharVocab()


# ------------------------------------------------------------------------------------------------
# The TFDS builder.
# ------------------------------------------------------------------------------------------------
_SPLIT_FRACTIONS = (("train", 90), ("validation", 5), ("test", 5))


def split_of(n: int) -> str:
  """The split a number belongs to: a fixed multiplicative hash of its value, 90/5/5 %."""
  bucket = ((int(n) * 2654435761 + 97) % 4294967296) * 100 // 4294967296
  for name, frac in _SPLIT_FRACTIONS:
    if bucket < frac:
      return name
    bucket -= frac
  raise AssertionError("unreachable")


def sample_numbers(split: str, num_digits: int, count: int, seed: int) -> list[int]:
  """Up to `count` distinct numbers with exactly `num_digits` digits in `split`, seeded."""
  names = [name for name, _ in _SPLIT_FRACTIONS]
  if split not in names or num_digits < 1 or count < 0:
    raise ValueError(f"need split in {names}, num_digits >= 1, count >= 0; got {split!r}, "
                     f"{num_digits}, {count}.")
  lo, hi = (0 if num_digits == 1 else 10 ** (num_digits - 1)), 10 ** num_digits
  rng = np.random.default_rng([seed, num_digits, names.index(split)])
  if hi - lo <= 40 * max(count, 1):  # small range: enumerate the split's whole bucket
    pool = np.array([n for n in range(lo, hi) if split_of(n) == split], np.int64)
    return sorted(rng.permutation(pool)[:count].tolist())
  chosen: set[int] = set()
  while len(chosen) < count:
    for n in rng.integers(lo, hi, size=2 * count).tolist():
      if split_of(n) == split and len(chosen) < count:
        chosen.add(n)
  return sorted(chosen)


@dataclasses.dataclass
class NumbersConfig(tfds.core.BuilderConfig):
  max_digits: int = 9
  train_per_digits: int = 20000
  eval_per_digits: int = 500
  seed: int = 0


class NumbersToWords(tfds.core.GeneratorBasedBuilder):
  """Digits -> English number words (see the module docstring)."""

  BUILT_LOCALLY = True
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      NumbersConfig(name="standard", description="1-9 digits, <= 20000 train numbers per length.",
                    max_digits=9, train_per_digits=20000, eval_per_digits=500),
      NumbersConfig(name="small", description="1-6 digits, <= 300 train numbers per length.",
                    max_digits=6, train_per_digits=300, eval_per_digits=40),
  ]
  DEFAULT_CONFIG_NAME = "standard"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Integers written as digits and the same number in English words, e.g. "
                     "'1204' -> 'one thousand two hundred four'. Disjoint splits by a hash of "
                     "the number (90/5/5%); numbers sampled uniformly per digit count."),
        features=tfds.features.FeaturesDict({
            "src": tfds.features.Text(doc="The number in digits."),
            "tgt": tfds.features.Text(doc="The number in English words."),
            "num_digits": tfds.features.Scalar(dtype=np.int32, doc="Digits in the number."),
        }),
        disable_shuffling=True,
        homepage="https://github.com/seqjax",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated locally
    return {name: self._generate_examples(name) for name, _ in _SPLIT_FRACTIONS}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    count = cfg.train_per_digits if split == "train" else cfg.eval_per_digits
    for d in range(1, cfg.max_digits + 1):
      for n in sample_numbers(split, d, count, cfg.seed):
        yield f"{d:02d}-{n}", {"src": str(n), "tgt": number_to_words(n), "num_digits": d}


def make_builder(data_dir: str | os.PathLike | None = None,
                 config: str = "standard") -> NumbersToWords:
  """A `NumbersToWords` builder in array_record format (`data_dir` None -> TFDS default)."""
  names = {c.name for c in NumbersToWords.BUILDER_CONFIGS}
  if config not in names:
    raise ValueError(f"numbers_to_words: unknown config {config!r}; use one of {sorted(names)}.")
  return NumbersToWords(config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
                        file_format="array_record")


def load_pairs(builder: NumbersToWords, split: str) -> list[tuple[str, str]]:
  """All (digits, words) pairs of a prepared split, in file order."""
  source = builder.as_data_source(split=split)
  dec = lambda v: v.decode() if isinstance(v, bytes) else str(v)
  examples = source.__getitems__(list(range(len(source))))  # One batched read (~7x faster than one by one).
  return [(dec(ex["src"]), dec(ex["tgt"])) for ex in examples]


# ------------------------------------------------------------------------------------------------
# Padded batches with a length curriculum.
# ------------------------------------------------------------------------------------------------
def encode_pairs(pairs: Sequence[tuple[str, str]], vocab: CharVocab = VOCAB):
  """-> (src id lists, tgt id lists)."""
  return [vocab.encode(s) for s, _ in pairs], [vocab.encode(t) for _, t in pairs]


def pad_batch(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], src_len: int,
              tgt_len: int) -> dict[str, np.ndarray]:
  """Pad one batch: src [B, src_len]; tgt_in = BOS + tgt and tgt_out = tgt + EOS, [B, tgt_len]."""
  b = len(src)
  out = {"src": np.full((b, src_len), PAD_ID, np.int32), "src_lengths": np.zeros(b, np.int32),
         "tgt_in": np.full((b, tgt_len), PAD_ID, np.int32),
         "tgt_out": np.full((b, tgt_len), PAD_ID, np.int32), "tgt_lengths": np.zeros(b, np.int32)}
  for i, (s, t) in enumerate(zip(src, tgt)):
    if len(s) > src_len or len(t) + 1 > tgt_len:
      raise ValueError(f"example {i} (src {len(s)}, tgt {len(t)} + EOS) does not fit "
                       f"src_len={src_len}, tgt_len={tgt_len}.")
    out["src"][i, :len(s)] = s
    out["src_lengths"][i] = len(s)
    out["tgt_in"][i, :len(t) + 1] = [BOS_ID] + list(t)
    out["tgt_out"][i, :len(t) + 1] = list(t) + [EOS_ID]
    out["tgt_lengths"][i] = len(t) + 1
  return out


def padded_batches(pairs: Sequence[tuple[str, str]], batch_size: int, *,
                   max_target_length: Callable[[int], int] | int, seed: int = 0,
                   start_step: int = 0, num_steps: int | None = None,
                   vocab: CharVocab = VOCAB) -> Iterator[dict[str, np.ndarray]]:
  """Yield training batches forever (or `num_steps`), step by step from `start_step`.

  At step s only examples whose target plus EOS fits `max_target_length(s)` are drawn (a
  `LengthCurriculum`, or an int for a fixed cap), and targets are padded to exactly that length
  (so shapes only change when the curriculum grows); sources are padded to the longest source.
  The batch of step s depends only on (seed, s): resuming at `start_step` is exact.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  limit = max_target_length if callable(max_target_length) else (lambda step: max_target_length)
  src, tgt = encode_pairs(pairs, vocab)
  tgt_lens = np.array([len(t) + 1 for t in tgt])
  src_len = max(len(s) for s in src)
  order = np.argsort(tgt_lens, kind="stable")
  sorted_lens = tgt_lens[order]
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    max_len = int(limit(step))
    n_allowed = int(np.searchsorted(sorted_lens, max_len, side="right"))
    if n_allowed == 0:
      raise ValueError(f"no example has a target of <= {max_len} tokens (incl. EOS) at step "
                       f"{step}; the shortest has {sorted_lens[0]}.")
    rng = np.random.default_rng([seed, step])
    pick = order[rng.integers(0, n_allowed, size=batch_size)]
    yield pad_batch([src[i] for i in pick], [tgt[i] for i in pick], src_len, max_len)
    step += 1


def eval_batches(pairs: Sequence[tuple[str, str]], batch_size: int,
                 vocab: CharVocab = VOCAB) -> Iterator[dict[str, np.ndarray]]:
  """All examples once, in order, padded to the split's longest source / target (last batch is
  padded with copies of the first example; `num_valid` says how many rows are real)."""
  src, tgt = encode_pairs(pairs, vocab)
  src_len = max(len(s) for s in src)
  tgt_len = max(len(t) for t in tgt) + 1
  for start in range(0, len(src), batch_size):
    idx = list(range(start, min(start + batch_size, len(src))))
    valid = len(idx)
    idx += [0] * (batch_size - valid)
    batch = pad_batch([src[i] for i in idx], [tgt[i] for i in idx], src_len, tgt_len)
    batch["num_valid"] = np.int32(valid)
    yield batch
