"""selective_copying — the Mamba paper's task (Gu & Dao, 2023, section 4.1.1 and its Table 1; the generator is the
"variable" copying task of the H3 / S4 synthetics).

One example of length T with M tokens to copy, vocabulary V (token 0 = noise, V - 1 = the marker, data tokens in
[1, V - 2]):

    0 0 d1 0 0 0 d2 d3 0 ... 0 dM 0 0 | * * ... *
    \\______ T - M tokens: M data tokens at random places ______/   \\_ M markers _/

At the i-th marker the target is d_i: the data tokens in their order of appearance, ignoring the noise. Only the M
marker positions have loss_mask = 1. Because the data tokens sit at random places, a model must select what to
remember by content — what a time-invariant convolution (S4) cannot do and a selective SSM (Mamba) can.

The paper: V = 16, M = 16, length 4096 (the copied region), 99.8% for Mamba against 18.3% for S4. The settings
here keep V = 16 and M = 16 at CPU lengths T = 128, 256, 1024 and 4096 (the model's input length, markers included).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax.data.synthetic import base

NAME = "selective_copying"
KIND = "lm"
EXACT_LENGTHS = True  # Every example fills its split's length (base.py).


@dataclasses.dataclass(frozen=True)
class SelectiveCopyingSetting(base.Setting):
  seq_len: int = 256  # T, the input length: T - M noise/data positions, then M markers.
  num_tokens: int = 16  # M, the data tokens to copy.
  vocab_size: int = 16  # V: 0 noise, V - 1 marker, data in [1, V - 2].
  num_train: int = 50_000
  num_validation: int = 1_000
  num_test: int = 1_000

  def check(self) -> None:
    super().check()
    if self.vocab_size < 4:
      raise ValueError(f"selective_copying needs vocab_size >= 4 (noise, marker, >= 2 data tokens), got "
                       f"{self.vocab_size}")
    if self.num_tokens < 1 or self.seq_len < 2 * self.num_tokens:
      raise ValueError(f"selective_copying needs seq_len >= 2 * num_tokens (the data region and the markers), got "
                       f"seq_len={self.seq_len}, num_tokens={self.num_tokens}")

  @property
  def marker(self) -> int:
    return self.vocab_size - 1


SETTINGS = {f"len{t}": SelectiveCopyingSetting(seq_len=t) for t in (128, 256, 1024, 4096)}
# "small": 8 tokens to copy in 64, few examples, for tests and smoke runs.
SETTINGS["small"] = SelectiveCopyingSetting(seq_len=64, num_tokens=8, num_train=2048, num_validation=256,
                                            num_test=256)
DEFAULT = "len256"


def answers_per_example(setting: SelectiveCopyingSetting) -> int:
  return setting.num_tokens  # One per marker.


def split_lengths(setting: SelectiveCopyingSetting) -> dict[str, int]:
  return {split: setting.seq_len for split in base.SPLITS}


def generate(setting: SelectiveCopyingSetting, split: str, rng: np.random.Generator,
             count: int) -> list[dict[str, np.ndarray]]:
  del split
  t, m, v = setting.seq_len, setting.num_tokens, setting.vocab_size
  region = t - m
  places_BM = np.sort(base.sample_without_replacement(rng, count, m, np.zeros(region)), axis=1)
  data_BM = rng.integers(1, v - 1, size=(count, m))
  inputs_BT = np.zeros((count, t), np.int64)
  np.put_along_axis(inputs_BT, places_BM, data_BM, axis=1)
  inputs_BT[:, region:] = setting.marker
  targets_BT = np.zeros((count, t), np.int64)
  targets_BT[:, region:] = data_BM
  mask_BT = np.zeros((count, t), np.int64)
  mask_BT[:, region:] = 1
  return base.lm_examples(inputs_BT, targets_BT, mask_BT)


def check(setting: SelectiveCopyingSetting, example: dict[str, np.ndarray]) -> dict[int, int]:
  """{position: answer} from the inputs alone: the tokens that are neither noise (0) nor the marker, in order, one
  per marker position."""
  marker = setting.marker
  inputs = [int(x) for x in example["inputs"]]
  data = [x for x in inputs if x not in (0, marker)]
  markers = [t for t, x in enumerate(inputs) if x == marker]
  if len(data) != len(markers):
    raise AssertionError(f"{len(data)} data tokens but {len(markers)} markers")
  return dict(zip(markers, data))
