"""What every synthetic task shares: its settings, its seeded random streams, sampling without replacement.

A synthetic task is a module of `seqjax.data.synthetic` (NumPy only; the TFDS builders live in `builders.py`) with

    NAME: str                                   # the TFDS builder name, e.g. "mqar"
    KIND: "lm" | "classify"                     # per-position answers, or one class label per example
    SETTINGS: dict[str, Setting]                # the builder configs, by name ("len64_pairs4", ...)
    DEFAULT: str                                # the setting a bare name ("mqar") means
    def split_lengths(setting) -> {split: longest example}   # every split it writes, with its longest example
    def generate(setting, split, rng, count) -> list[dict]   # `count` examples of `split` from `rng`
    def check(setting, example) -> answers      # recomputes the answers from the inputs alone (the tests' oracle)
    def answers_per_example(setting) -> int     # "lm" only: the most loss_mask positions an example has
    EXACT_LENGTHS: bool                         # optional (default False): every example of a split is exactly
                                                # split_lengths(setting)[split] tokens long, so rows of that
                                                # length are never padded and carry no segment_ids

Examples of an "lm" task are {"inputs", "targets", "loss_mask"} (int32 [T] each): the model reads `inputs`, and at
every position t with loss_mask[t] = 1 it must predict targets[t]; elsewhere targets is 0 and nothing is scored.
Examples of a "classify" task are {"inputs" int32 [T] (its own length), "label" int32}.

Everything is a function of the setting's `seed`: split `s` draws from `split_rng(seed, task, s)`, so two builds
are identical, another seed gives other data, and one split's size does not change another's examples.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Setting:
  """Fields every task's setting has: split sizes and the seed (a task's own dataclass adds its parameters)."""

  num_train: int = 10_000
  num_validation: int = 1_000
  num_test: int = 1_000
  seed: int = 0

  def count(self, split: str) -> int:
    """Examples in `split` (an extra evaluation split, e.g. "test_len1024", has num_test)."""
    if split == "train":
      return self.num_train
    return self.num_validation if split == "validation" else self.num_test

  def check(self) -> None:
    """Raises ValueError naming the field if the setting cannot be generated."""
    for name in ("num_train", "num_validation", "num_test"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


def split_rng(seed: int, task: str, split: str) -> np.random.Generator:
  """The random stream of one split of one task: a function of (seed, task, split) only (crc32 of the names)."""
  return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])


def sample_without_replacement(rng: np.random.Generator, count: int, k: int, log_weights: np.ndarray,
                               chunk_rows: int = 1024) -> np.ndarray:
  """`count` rows of `k` distinct indices into `log_weights` [n], drawn one after another without replacement with
  probabilities proportional to exp(log_weights) among those left; int64 [count, k] in drawing order.

  The Gumbel top-k trick: adding independent Gumbel noise to the log weights and taking the k largest, in decreasing
  order, has exactly the distribution of k successive weighted draws without replacement. Uniform weights (zeros)
  give a uniformly random ordered k-subset.
  """
  n = log_weights.shape[0]
  if not 0 < k <= n:
    raise ValueError(f"cannot draw {k} distinct items out of {n}")
  if k * k <= n and not np.any(log_weights):  # Uniform and few collisions: cheaper by rejection.
    return _uniform_distinct(rng, count, k, n)
  out = np.empty((count, k), np.int64)
  for start in range(0, count, chunk_rows):
    rows = min(chunk_rows, count - start)
    keys = log_weights[None, :] + rng.gumbel(size=(rows, n))
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
    out[start:start + rows] = np.take_along_axis(top, order, axis=1)
  return out


def _uniform_distinct(rng: np.random.Generator, count: int, k: int, n: int) -> np.ndarray:
  """Uniform ordered k-subsets of range(n): k independent uniform draws per row, rows with a repeat drawn again
  (what is kept is uniform over the ordered k-tuples of distinct items)."""
  out = rng.integers(0, n, size=(count, k))
  while True:
    s = np.sort(out, axis=1)
    bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
    if not len(bad):
      return out
    out[bad] = rng.integers(0, n, size=(len(bad), k))


def lm_examples(inputs: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> list[dict[str, np.ndarray]]:
  """Rows of [count, T] arrays -> one {"inputs", "targets", "loss_mask"} dict (int32 [T] each) per example."""
  inputs, targets, loss_mask = (np.asarray(a, np.int32) for a in (inputs, targets, loss_mask))
  return [{"inputs": i, "targets": t, "loss_mask": m} for i, t, m in zip(inputs, targets, loss_mask)]
