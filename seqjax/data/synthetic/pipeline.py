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

Every process runs the same pipeline over the global batch and keeps its rows (as the LM pipeline does).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import grain
import numpy as np

from seqjax.data import synthetic
from seqjax.data.pipeline import load_builder
from seqjax.data.synthetic import builders  # noqa: F401  (registers the builders with TFDS)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _ToRow(grain.transforms.Map):
  """One example -> its row, padded to `length` (top-level so it pickles into grain workers)."""

  kind: str
  length: int
  segments: bool = True  # False: every example fills the row (no padding), so no segment_ids.

  def map(self, ex: Mapping[str, Any]) -> Batch:
    n = len(ex["inputs"])
    pad = lambda x: np.pad(np.asarray(x, np.int32), (0, self.length - n))  # noqa: E731
    row = {"inputs": pad(ex["inputs"]), "positions": pad(np.arange(n))}
    if self.segments:
      row["segment_ids"] = pad(np.ones(n))
    if self.kind == "lm":
      row.update(targets=pad(ex["targets"]), weights=pad(ex["loss_mask"]).astype(np.float32),
                 target_bytes=np.zeros(self.length, np.int32))
    else:
      row.update(label=np.int32(ex["label"]), weights=np.float32(1.0))
    return row


@dataclasses.dataclass(frozen=True)
class _Rows(grain.transforms.Map):
  """A global batch -> this process's rows [start, stop), padded with rows of weight 0 to `global_rows`."""

  global_rows: int
  start: int
  stop: int

  def map(self, batch: Mapping[str, np.ndarray]) -> Batch:
    out = {}
    for k, x in batch.items():
      if x.shape[0] < self.global_rows:
        x = np.concatenate([x, np.zeros((self.global_rows - x.shape[0],) + x.shape[1:], x.dtype)])
      out[k] = x[self.start:self.stop]
    return out


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """Train and eval streams of a synthetic task (see the module docstring).

  Attributes: `name` ("TASK/SETTING"), `kind` ("lm" or "classify"), `setting`, `vocab_size`, `num_classes`
  (classify), `answers_per_row` (lm: the most weighted positions a row has, in every split; 0 for classify),
  `seq_len` (training rows' length), `eval_len` (evaluation rows' length), `train_segments` / `eval_segments`
  (whether those rows carry segment_ids: False where no row can be padded).
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
  train_source: Any
  eval_source: Any

  def _rows(self) -> _Rows:
    start = self.process_index * self.local_batch_size
    return _Rows(self.global_batch_size, start, start + self.local_batch_size)

  def train_iterator(self) -> grain.DatasetIterator:
    """Rows of the training split, reshuffled every epoch from `seed`, forever; `get_state` is JSON-able."""
    ds = grain.MapDataset.source(self.train_source).shuffle(seed=self.seed).repeat()
    ds = ds.map(_ToRow(self.kind, self.seq_len, self.train_segments))
    ds = ds.batch(self.global_batch_size, drop_remainder=True)
    return iter(ds.map(self._rows()).to_iter_dataset())

  def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
    """The evaluation split in file order (a fixed sample: examples are drawn i.i.d.), the last batch padded with
    rows of weight 0."""
    ds = grain.MapDataset.source(self.eval_source).map(_ToRow(self.kind, self.eval_len, self.eval_segments))
    ds = ds.batch(self.global_batch_size, drop_remainder=False).map(self._rows())
    for i in range(len(ds) if max_batches is None else min(max_batches, len(ds))):
      yield ds[i]


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
  builder = load_builder(full_name, None if data_dir is None else os.path.expanduser(os.fspath(data_dir)))
  return SyntheticData(
      name=full_name, kind=module.KIND, setting=setting, vocab_size=vocab_size_of(module, setting),
      num_classes=getattr(module, "NUM_CLASSES", 0),
      answers_per_row=module.answers_per_example(setting) if module.KIND == "lm" else 0,
      seq_len=seq_len, eval_len=eval_len, train_segments=not (exact and seq_len == lengths[train_split]),
      eval_segments=not (exact and eval_len == lengths[eval_split]),
      global_batch_size=batch_size, local_batch_size=batch_size // process_count, process_index=int(process_index),
      seed=int(seed), train_source=builder.as_data_source(split=train_split),
      eval_source=builder.as_data_source(split=eval_split))
