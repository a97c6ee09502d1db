"""Batches of a synthetic task for the trainer: one example per row, padded, with the loss only on answer positions.

    data = make_synthetic_data(name="mqar/len64_pairs4", data_dir=None, seq_len=64, batch_size=32, seed=0)
    it = data.train_iterator()            # infinite, shuffled by seed; it.get_state() / set_state() resume exactly
    batch = next(it)
    for b in data.eval_batches(max_batches=8): ...   # the evaluation split in file order, the same every call

Batch format of an "lm" task (numpy, [B_local, T]; T = data.seq_len, or a longer evaluation split's length):

  inputs int32, targets int32 (the answer where weights is 1, else 0), segment_ids int32 (1 on the example, 0 on
  padding), positions int32 (0, 1, ...), weights float32 (the example's loss_mask: 1 on answer positions only),
  target_bytes int32 (0: no bits per byte for these tokens)

— without segment_ids where no row can hold padding (a task whose examples all fill the row: EXACT_LENGTHS in its
module, read at its own length), so the mixers take their unsegmented forms (S4D its FFT convolution, 2x faster
than the resettable chunked form at MQAR's shapes); the rows that pad the last evaluation batch have weight 0.

— the keys of the packed LM batches (`seqjax.data.pipeline`), so the LM task trains on either. Of a "classify" task:
inputs, segment_ids, positions [B_local, T], label int32 [B_local] and weights float32 [B_local] (0 on the rows that
pad the last evaluation batch).

Every process draws the same global batch and reads only its own rows. The splits are read as memory-mapped
columns written once next to the TFDS files (`seqjax.data.synthetic.columns`): a batch costs ~0.1 ms instead of the
~30 ms of CPU that reading 64 ArrayRecord examples one at a time took, more than a small model's whole step.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Mapping

import grain
import numpy as np

from seqjax.data import synthetic
from seqjax.data.pipeline import build_lock, load_builder
from seqjax.data.synthetic import builders  # noqa: F401  (registers the builders with TFDS)
from seqjax.data.synthetic.columns import split_columns

Batch = dict[str, np.ndarray]
# The training stream computes the next batches in one background thread while a step runs: a batch is a few
# fancy indexes into memory-mapped columns, so more threads (grain's default is 16, with 500 elements of
# prefetch) only take cores from the step.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def _rows(columns: Mapping[str, np.ndarray], idx: np.ndarray, kind: str, length: int, segments: bool,
          num_rows: int) -> Batch:
  """Rows of the examples `idx`, padded to `length` positions and then with rows of weight 0 to `num_rows`."""
  idx = np.asarray(idx, np.int64)
  n_B = np.zeros(num_rows, np.int32)
  n_B[:len(idx)] = columns["length"][idx]
  real_BT = np.arange(length) < n_B[:, None]

  def seq(key, dtype):
    out = np.zeros((num_rows, length), dtype)
    x = columns[key][idx]
    out[:len(idx), :x.shape[1]] = x
    return out

  row = {"inputs": seq("inputs", np.int32), "positions": np.where(real_BT, np.arange(length), 0).astype(np.int32)}
  if segments:
    row["segment_ids"] = real_BT.astype(np.int32)
  if kind == "lm":
    row.update(targets=seq("targets", np.int32), weights=seq("loss_mask", np.float32),
               target_bytes=np.zeros((num_rows, length), np.int32))
  else:
    label = np.zeros(num_rows, np.int32)
    label[:len(idx)] = columns["label"][idx]
    row.update(label=label, weights=(np.arange(num_rows) < len(idx)).astype(np.float32))
  return row


@functools.lru_cache(maxsize=4)  # an iterator's current epoch and the next (a batch may straddle the boundary)
def _epoch_order(seed: int, num_examples: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Global batch k -> this process's rows: batch j of epoch e (k = e * batches_per_epoch + j) holds the examples
  order(e)[j B : (j + 1) B], order(e) a permutation of the split drawn from (seed, e). The last partial batch of
  an epoch is dropped."""

  columns: Mapping[str, np.ndarray]
  kind: str
  length: int
  segments: bool
  global_rows: int
  start: int
  stop: int
  seed: int

  @property
  def num_examples(self) -> int:
    return self.columns["length"].shape[0]

  def order(self, epoch: int) -> np.ndarray:
    return _epoch_order(self.seed, self.num_examples, epoch)

  def __call__(self, k: int) -> Batch:
    epoch, j = divmod(int(k), self.num_examples // self.global_rows)
    first = j * self.global_rows
    idx = self.order(epoch)[first + self.start:first + self.stop]
    return _rows(self.columns, idx, self.kind, self.length, self.segments, self.stop - self.start)


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """Train and eval streams of a synthetic task (see the module docstring).

  Attributes: `name` ("TASK/SETTING"), `kind` ("lm" or "classify"), `setting`, `vocab_size`, `num_classes`
  (classify), `answers_per_row` (lm: the most weighted positions a row has, in every split; 0 for classify),
  `seq_len` (training rows' length), `eval_len` (evaluation rows' length), `train_segments` / `eval_segments`
  (whether those rows carry segment_ids: False where no row can be padded), `train_columns` / `eval_columns`
  (the splits as memory-mapped arrays, `seqjax.data.synthetic.columns`).
  """

  name: str
  kind: str
  setting: Any
  vocab_size: int
  num_classes: int
  answers_per_row: int
  seq_len: int
  eval_len: int
  train_segments: bool
  eval_segments: bool
  global_batch_size: int
  local_batch_size: int
  process_index: int
  seed: int
  train_columns: Mapping[str, np.ndarray]
  eval_columns: Mapping[str, np.ndarray]

  @property
  def _start(self) -> int:
    return self.process_index * self.local_batch_size

  def train_iterator(self) -> grain.DatasetIterator:
    """Rows of the training split, reshuffled every epoch from `seed`, forever; `get_state` is JSON-able
    ({"next_index": batches taken})."""
    batch = _TrainBatch(self.train_columns, self.kind, self.seq_len, self.train_segments, self.global_batch_size,
                        self._start, self._start + self.local_batch_size, self.seed)
    return iter(grain.MapDataset.range(2 ** 62).map(batch).to_iter_dataset(READ_OPTIONS))

  def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
    """The evaluation split in file order (a fixed sample: examples are drawn i.i.d.), the last batch padded with
    rows of weight 0."""
    n = self.eval_columns["length"].shape[0]
    num_batches = -(-n // self.global_batch_size)
    for i in range(num_batches if max_batches is None else min(max_batches, num_batches)):
      first = i * self.global_batch_size + self._start
      idx = np.arange(first, min(first + self.local_batch_size, n))
      yield _rows(self.eval_columns, idx, self.kind, self.eval_len, self.eval_segments, self.local_batch_size)


def vocab_size_of(module, setting) -> int:
  return getattr(setting, "vocab_size", None) or module.VOCAB_SIZE


def make_synthetic_data(*, name: str, data_dir: str | None, seq_len: int, batch_size: int, seed: int,
                        train_split: str = "train", eval_split: str = "validation", process_index: int | None = None,
                        process_count: int | None = None) -> SyntheticData:
  """Builds (on first use, under a file lock) and opens a synthetic dataset "TASK/SETTING".

  `seq_len` is the length of the training rows: at least the longest training example (shorter ones are padded);
  evaluation rows are as long as the longer of `seq_len` and the evaluation split's examples (induction_heads'
  test_len{L}). `batch_size` is the global batch. ValueError (unknown name or split, seq_len too short, a batch
  larger than the training split) says what to change.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel  (keeps the data layer importable alone)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  module, setting_name, setting = synthetic.resolve(name)
  lengths = module.split_lengths(setting)
  for split in (train_split, eval_split):
    if split not in lengths:
      raise ValueError(f"{name} has no split {split!r}; splits: {', '.join(lengths)}")
  if seq_len < lengths[train_split]:
    raise ValueError(f"data.seq_len={seq_len} is shorter than the {train_split!r} examples of {name} (up to "
                     f"{lengths[train_split]} tokens); set data.seq_len={lengths[train_split]}")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (global) is not divisible by process_count={process_count}")
  if batch_size > setting.count(train_split):
    raise ValueError(f"batch_size={batch_size} exceeds the {setting.count(train_split)} examples of {name}'s "
                     f"{train_split!r} split")
  full_name = f"{module.NAME}/{setting_name}"
  eval_len = max(seq_len, lengths[eval_split])
  exact = getattr(module, "EXACT_LENGTHS", False)
  data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
  builder = load_builder(full_name, data_dir)
  columns = lambda split: split_columns(  # noqa: E731
      builder, builder.as_data_source(split=split), split, lengths[split],
      lock=functools.partial(build_lock, data_dir, f"{full_name}/columns"))
  return SyntheticData(
      name=full_name, kind=module.KIND, setting=setting, vocab_size=vocab_size_of(module, setting),
      num_classes=getattr(module, "NUM_CLASSES", 0),
      answers_per_row=module.answers_per_example(setting) if module.KIND == "lm" else 0,
      seq_len=seq_len, eval_len=eval_len, train_segments=not (exact and seq_len == lengths[train_split]),
      eval_segments=not (exact and eval_len == lengths[eval_split]),
      global_batch_size=batch_size, local_batch_size=batch_size // process_count, process_index=int(process_index),
      seed=int(seed), train_columns=columns(train_split), eval_columns=columns(eval_split))
