"""Grain pipeline for byte-level language modelling: TFDS source -> tokens -> packed rows -> batches.

The single entry the trainer calls is :func:`make_lm_data`. Per document ``d`` (bytes), the token
stream is ``t = [BOS] + bytes(d) + [EOS]`` and its (input, target) pairs are
``inputs = t[:-1], targets = t[1:]`` — built *before* packing, so a target never belongs to another
document, every byte of ``d`` is predicted exactly once, and ``EOS`` is predicted after the last
byte. The pairs are packed by grain's concat-then-split packer into rows of ``seq_len``: a document
longer than the rest of a row continues in the next row as a new segment, so rows carry no padding
except at the very end of a finite (eval) stream.

Batch format (every array numpy, shape [B_local, T] with T = ``seq_len``):

  ============  =======  ========================================================================
  key           dtype    meaning
  ============  =======  ========================================================================
  inputs        int32    token ids fed to the model (0 = PAD on padding)
  targets       int32    next-token ids (the target of ``inputs[b, t]``)
  segment_ids   int32    1, 2, 3 ... per packed document piece in the row; 0 = padding
  positions     int32    position within the piece, restarting at 0 at every piece start
  weights       float32  1 where the target is a real token, 0 on padding
  target_bytes  int32    UTF-8 bytes the target stands for: 1 for byte tokens, 0 for specials/pad
  ============  =======  ========================================================================

Bits per byte = ``sum(weights * nll) / ln 2 / sum(target_bytes)``.

Process sharding: every process runs the same deterministic pipeline over the *global* batch of
``batch_size`` rows and keeps rows ``[p * B_local, (p + 1) * B_local)``. The data order is thus
independent of the number of processes (a run can resume on a different topology) and the local
slices of all processes, concatenated in process order, are exactly the global batch — the layout
``jax.make_array_from_process_local_data`` expects. The price is that each host reads and packs
the whole stream (cheap for byte tokens; revisit for huge hosts counts).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import socket
import threading
from typing import Any, Iterator, Mapping

from absl import logging
import grain
import numpy as np
import tensorflow_datasets as tfds

from seqjax.data import python_source  # noqa: F401  (registers the `python_source` builder)
from seqjax.data.tokenizer import ByteTokenizer

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights", "target_bytes")
EVAL_ORDER_SEED = 20261122  # Fixed order of evaluation documents (see LMData.eval_dataset).

# Hosts probed before downloading a remote TFDS dataset. TFDS and most of its datasets are served
# from Google Cloud Storage; when it cannot be reached the machine is taken to be offline.
NETWORK_PROBE_HOSTS: tuple[tuple[str, int], ...] = (("storage.googleapis.com", 443),)
NETWORK_PROBE_TIMEOUT_S = 10.0
SKIP_NETWORK_CHECK_ENV = "SEQJAX_SKIP_NETWORK_CHECK"


class DataUnavailableError(RuntimeError):
  """A dataset is not prepared locally and cannot be downloaded (e.g. the machine is offline)."""


# ------------------------------------------------------------------------------------------------
# Grain transforms (top-level classes so they pickle into multiprocessing workers).


@dataclasses.dataclass(frozen=True)
class _TokenizeDocument(grain.transforms.Map):
  """{text_key: bytes} -> {"inputs": t[:-1], "targets": t[1:]} with t = [BOS] + bytes + [EOS]."""

  text_key: str
  tokenizer: ByteTokenizer

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    tokens = self.tokenizer.encode(element[self.text_key], add_bos=True, add_eos=True)
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


@dataclasses.dataclass(frozen=True)
class _FinalizeBatch(grain.transforms.Map):
  """Packed global batch -> this process's rows in the public batch format (see module doc)."""

  global_batch_size: int
  row_start: int
  row_stop: int
  byte_offset: int

  def map(self, packed: Mapping[str, np.ndarray]) -> Batch:
    rows = slice(self.row_start, self.row_stop)
    inputs_BT = _pad_rows(packed["inputs"], self.global_batch_size)[rows]
    targets_BT = _pad_rows(packed["targets"], self.global_batch_size)[rows]
    segment_ids_BT = _pad_rows(packed["inputs_segment_ids"], self.global_batch_size)[rows]
    positions_BT = _pad_rows(packed["inputs_positions"], self.global_batch_size)[rows]
    real_BT = segment_ids_BT > 0
    return {
        "inputs": inputs_BT.astype(np.int32),
        "targets": targets_BT.astype(np.int32),
        "segment_ids": segment_ids_BT.astype(np.int32),
        "positions": positions_BT.astype(np.int32),
        "weights": real_BT.astype(np.float32),
        "target_bytes": (real_BT & (targets_BT >= self.byte_offset)).astype(np.int32),
    }


def _pad_rows(x: np.ndarray, num_rows: int) -> np.ndarray:
  """Pads axis 0 of ``x`` with zeros up to ``num_rows`` (a final, partial eval batch)."""
  if x.shape[0] == num_rows:
    return x
  pad = np.zeros((num_rows - x.shape[0],) + x.shape[1:], dtype=x.dtype)
  return np.concatenate([x, pad], axis=0)


class _JsonStateIterator(grain.DatasetIterator):
  """Delegating iterator whose ``set_state`` accepts states that went through JSON.

  Grain's concat-then-split packer keeps ``(start, stop)`` tuples in its state and compares them
  with a tuple sentinel; JSON (grain's orbax checkpoint handler) turns them into lists, after
  which a restore would silently drop a document. Normalising them back makes a state saved to
  disk resume exactly like an in-memory one.
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_tuplify_slices(state))

  def close(self) -> None:
    close = getattr(self._parent, "close", None)
    if close is not None:
      close()


class _JsonStateIterDataset(grain.IterDataset):
  """Wraps a pipeline so its iterators are :class:`_JsonStateIterator`."""

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonStateIterator(self._parent.__iter__())


def _tuplify_slices(state: Any) -> Any:
  """Recursively turns the lists under every ``remainder_slices`` key back into tuples."""
  if isinstance(state, dict):
    out = {}
    for key, value in state.items():
      if key == "remainder_slices" and isinstance(value, dict):
        out[key] = {k: tuple(v) for k, v in value.items()}
      else:
        out[key] = _tuplify_slices(value)
    return out
  if isinstance(state, list):
    return [_tuplify_slices(v) for v in state]
  return state


def pack_documents(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Concat-then-split packing of {"inputs", "targets"} pairs into rows of ``seq_len``.

  Adds ``inputs_segment_ids``/``inputs_positions`` (and the same for targets); both features are
  split at the same points, so inputs and targets stay aligned.
  """
  return grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len})


# ------------------------------------------------------------------------------------------------
# The public object.


@dataclasses.dataclass(frozen=True)
class LMData:
  """Train and eval streams of packed language-modelling batches (see the module docstring).

  Attributes:
    tokenizer: the byte tokenizer used for every document.
    vocab_size: ``tokenizer.vocab_size`` (259).
    seq_len: T, the row length.
    global_batch_size: rows per global batch (all processes).
    local_batch_size: rows this process gets per batch.
    process_index, process_count: this process's slice of every global batch.
  """

  tokenizer: ByteTokenizer
  seq_len: int
  global_batch_size: int
  local_batch_size: int
  process_index: int
  process_count: int
  seed: int
  num_workers: int
  train_source: Any
  eval_source: Any
  text_key: str
  train_split: str
  eval_split: str

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _finalize(self) -> _FinalizeBatch:
    start = self.process_index * self.local_batch_size
    return _FinalizeBatch(global_batch_size=self.global_batch_size, row_start=start,
                          row_stop=start + self.local_batch_size,
                          byte_offset=self.tokenizer.byte_offset)

  def train_dataset(self) -> grain.IterDataset:
    """The infinite training IterDataset (epochs reshuffled from ``seed``, repeated forever)."""
    ds = grain.MapDataset.source(self.train_source).shuffle(seed=self.seed).repeat()
    ds = ds.map(_TokenizeDocument(self.text_key, self.tokenizer))
    ids = pack_documents(ds.to_iter_dataset(), self.seq_len)
    ids = ids.batch(self.global_batch_size, drop_remainder=True).map(self._finalize())
    if self.num_workers > 0:
      ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
    return _JsonStateIterDataset(ids)

  def train_iterator(self) -> grain.DatasetIterator:
    """A fresh iterator over :meth:`train_dataset`; ``get_state``/``set_state`` resume exactly.

    Every ``next()`` returns this process's [B_local, T] batch dict. The state is a JSON-able
    dict (save it with ``grain.checkpoint.CheckpointSave(it)`` in an orbax Composite); it also
    resumes exactly after a JSON round trip.
    """
    return iter(self.train_dataset())

  def eval_dataset(self) -> grain.IterDataset:
    """The finite eval IterDataset: documents in a fixed shuffled order, packed, last batch padded.

    The order is a fixed permutation (independent of the run's seed), so the first few batches — what a partial
    evaluation (`max_batches`) sees — are a sample of the whole split rather than its first files.
    """
    ds = grain.MapDataset.source(self.eval_source).shuffle(seed=EVAL_ORDER_SEED)
    ds = ds.map(_TokenizeDocument(self.text_key, self.tokenizer))
    ids = pack_documents(ds.to_iter_dataset(), self.seq_len)
    return ids.batch(self.global_batch_size, drop_remainder=False).map(self._finalize())

  def eval_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
    """Deterministic eval batches: the same sequence on every call, every process in lock-step.

    The final batch is padded with rows of weight 0 (so no token is dropped). Every process
    yields the same number of batches (some may be all padding for it).

    Args:
      max_batches: stop after this many batches (None: the whole eval split).
    """
    if max_batches is not None and max_batches < 1:
      raise ValueError(f"eval_batches: max_batches must be >= 1 or None, got {max_batches}.")
    for i, batch in enumerate(self.eval_dataset()):
      if max_batches is not None and i >= max_batches:
        return
      yield batch


# ------------------------------------------------------------------------------------------------
# Sources.


def network_available(hosts: tuple[tuple[str, int], ...] | None = None,
                      timeout_s: float | None = None) -> bool:
  """Whether any of ``hosts`` accepts a TCP connection within ``timeout_s`` (DNS included)."""
  hosts = NETWORK_PROBE_HOSTS if hosts is None else hosts
  timeout_s = NETWORK_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
  ok = threading.Event()

  def probe(host: str, port: int) -> None:
    try:
      with socket.create_connection((host, port), timeout=timeout_s):
        ok.set()
    except OSError:
      pass

  # DNS lookups ignore socket timeouts, so probe in daemon threads and bound the wait ourselves.
  threads = [threading.Thread(target=probe, args=hp, daemon=True) for hp in hosts]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout_s)
    if ok.is_set():
      return True
  return ok.is_set()


@contextlib.contextmanager
def build_lock(data_dir: str | None, name: str):
  """An exclusive file lock so concurrent processes on one machine build a dataset only once."""
  root = pathlib.Path(data_dir if data_dir is not None else tfds.core.constants.DATA_DIR)
  root = root.expanduser()
  root.mkdir(parents=True, exist_ok=True)
  lock_path = root / f".{name.replace('/', '_')}.seqjax-build.lock"
  with open(lock_path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _offline_message(name: str, data_dir: str | None, builder: Any) -> str:
  where = builder.data_dir if builder is not None else data_dir
  return (
      f"TFDS dataset {name!r} is not prepared in {where} and cannot be downloaded: none of "
      f"{[h for h, _ in NETWORK_PROBE_HOSTS]} could be reached, so this machine seems offline. "
      "Either (1) on a machine with network, prepare it in array_record format, e.g. "
      f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
      "file_format='array_record').download_and_prepare()\"` (or `tfds build "
      f"{name} --file_format=array_record`), then copy the data dir here and pass it as "
      "data_dir (config.data.data_dir); or (2) use the offline corpus name='python_source'. "
      f"Set {SKIP_NETWORK_CHECK_ENV}=1 to skip this connectivity check.")


def load_builder(name: str, data_dir: str | None) -> Any:
  """Returns a prepared array_record TFDS builder for ``name``, building/downloading if needed.

  Builders that declare ``BUILT_LOCALLY = True`` (``python_source``) are built on first use under
  a file lock. For any other dataset that is not yet prepared, connectivity is probed first and
  :class:`DataUnavailableError` is raised within ~``NETWORK_PROBE_TIMEOUT_S`` when offline
  (instead of TFDS retrying for minutes).
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown TFDS dataset name {name!r} (config.data.name). Use 'python_source' or a "
        f"name from https://www.tensorflow.org/datasets/catalog. TFDS said: {e}") from e
  if _is_prepared(builder):
    return builder
  if not getattr(type(builder), "BUILT_LOCALLY", False):
    logging.info("TFDS dataset %s is not prepared in %s; checking the network.", name,
                 builder.data_dir)
    if not os.environ.get(SKIP_NETWORK_CHECK_ENV) and not network_available():
      raise DataUnavailableError(_offline_message(name, data_dir, builder))
  local = bool(getattr(type(builder), "BUILT_LOCALLY", False))
  with build_lock(data_dir, name):
    if _is_prepared(builder):  # another process built it while we waited for the lock
      return tfds.builder(name, data_dir=data_dir, file_format="array_record")
    logging.info("Preparing TFDS dataset %s in %s", name, builder.data_dir)
    with _progress_bars(enabled=not local):  # a local build takes a second: no bars
      builder.download_and_prepare()
  return builder


@contextlib.contextmanager
def _progress_bars(enabled: bool):
  """Temporarily shows or hides TFDS's tqdm progress bars."""
  tqdm_utils = tfds.core.utils.tqdm_utils
  before = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(enabled)
  try:
    yield
  finally:
    tfds.display_progress_bar(before)


def _is_prepared(builder: Any) -> bool:
  return builder.is_prepared() if hasattr(builder, "is_prepared") else builder.data_path.exists()


def _split_source(builder: Any, split: str, text_key: str) -> Any:
  """The array_record data source of ``split``, checked to be non-empty and to have text_key."""
  name = builder.info.full_name
  features = builder.info.features
  if text_key not in features:
    raise ValueError(
        f"Dataset {name} has no feature {text_key!r} (text_key); its features are "
        f"{sorted(features.keys())}.")
  try:
    source = builder.as_data_source(split=split)
  except (KeyError, ValueError) as e:
    raise ValueError(
        f"Dataset {name} has no split {split!r}; available splits: "
        f"{sorted(builder.info.splits.keys())}. ({e})") from e
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of dataset {name} is empty; choose another split.")
  return source


def _check_fills_one_batch(source: Any, split: str, text_key: str, tokens_needed: int) -> None:
  """Raises if one epoch of ``split`` holds fewer tokens than one global batch."""
  total = 0
  for i in range(len(source)):
    total += len(source[i][text_key]) + 1  # one pair per byte, plus the EOS target
    if total >= tokens_needed:
      return
  raise ValueError(
      f"Split {split!r} is too small: one epoch holds {total} target tokens, fewer than one global "
      f"batch of batch_size x seq_len = {tokens_needed}. Lower batch_size or seq_len, or use a "
      "larger split.")


# ------------------------------------------------------------------------------------------------
# Entry point.


def make_lm_data(*, name: str, data_dir: str | None, seq_len: int, batch_size: int, seed: int,
                 text_key: str = "text", train_split: str = "train",
                 eval_split: str = "validation", process_index: int | None = None,
                 process_count: int | None = None, num_workers: int = 0) -> LMData:
  """Builds (or reuses) a TFDS text dataset and returns its packed byte-level LM streams.

  Args:
    name: "python_source" (built locally on first use), "python_source/small", or any TFDS
      name such as "lm1b" (downloaded and prepared in array_record format when online).
    data_dir: TFDS data dir (None: TFDS default, ``~/tensorflow_datasets``).
    seq_len: T, tokens per row.
    batch_size: GLOBAL rows per batch; each process gets ``batch_size // process_count``.
    seed: shuffling seed in [0, 2**32).
    text_key: the feature holding each document's text.
    train_split, eval_split: TFDS split names (slicing such as "train[:10%]" works).
    process_index, process_count: this process and the total (default: from ``jax``).
    num_workers: grain worker processes for the train stream (0: in-process). Workers need absl
      flags parsed (run under ``absl.app.run``); the stream then depends on ``num_workers``.

  Returns:
    An :class:`LMData`.

  Raises:
    ValueError: bad arguments, unknown dataset/split/feature, or an empty or too-small split.
    DataUnavailableError: a remote dataset is not prepared and the machine seems offline.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (keeps the data layer importable alone)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_int("seq_len", seq_len, 1)
  _check_int("batch_size", batch_size, 1)
  _check_int("process_count", process_count, 1)
  _check_int("num_workers", num_workers, 0)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
  if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index must be in [0, process_count={process_count}), got {process_index!r}.")
  if batch_size % process_count:
    raise ValueError(
        f"batch_size={batch_size} (global) is not divisible by process_count={process_count}; "
        "use a multiple of the number of processes.")

  data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
  builder = load_builder(name, data_dir)
  train_source = _split_source(builder, train_split, text_key)
  eval_source = _split_source(builder, eval_split, text_key)
  _check_fills_one_batch(train_source, train_split, text_key, batch_size * seq_len)
  logging.info("Data %s (%s): %d train / %d eval documents (%s / %s), rows of %d tokens, "
               "global batch %d, process %d of %d.", name, builder.data_dir, len(train_source),
               len(eval_source), train_split, eval_split, seq_len, batch_size, process_index,
               process_count)
  return LMData(
      tokenizer=ByteTokenizer(), seq_len=seq_len, global_batch_size=batch_size,
      local_batch_size=batch_size // process_count, process_index=int(process_index),
      process_count=int(process_count), seed=int(seed), num_workers=num_workers,
      train_source=train_source, eval_source=eval_source, text_key=text_key,
      train_split=train_split, eval_split=eval_split)


def _check_int(field: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}.")
