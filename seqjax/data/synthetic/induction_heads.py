"""induction_heads — the Mamba paper's length-extrapolation task (Gu & Dao, 2023, section 4.1.2 and Table 2):
recall the token that followed a special token, when the special token comes again at the end.

One example of length T, vocabulary V (special token V - 1, ordinary tokens [0, V - 2]):

    x x x x S a x x x x x x ... x x S
              ^ the token to recall    ^ last position: target a (loss_mask 1 only here)

Every other token is uniform over the ordinary tokens; S occurs exactly twice, at a uniform place p in [0, T - 3]
and at T - 1. The model is trained at one length and evaluated at longer ones: splits "train", "validation" and
"test" have the training length; "test_len{L}" the longer evaluation lengths L (num_test examples each). A model
that has learned the induction mechanism (find the previous S, copy what followed) answers at any length; one that
learned positions does not.

The paper trains at T = 256 with V = 16 and evaluates from 2^6 to 2^20; the settings here train at 256 (or 64) and
evaluate up to 16x the training length (4096; or 1024).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax.data.synthetic import base

NAME = "induction_heads"
KIND = "lm"
EXACT_LENGTHS = True  # Every example fills its split's length (base.py).


@dataclasses.dataclass(frozen=True)
class InductionHeadsSetting(base.Setting):
  seq_len: int = 256  # Training (and validation / test) length.
  eval_lengths: tuple[int, ...] = (512, 1024, 2048, 4096)  # Extra splits "test_len{L}".
  vocab_size: int = 16  # V: special token V - 1, ordinary tokens [0, V - 2].
  num_train: int = 50_000
  num_validation: int = 1_000
  num_test: int = 500

  def check(self) -> None:
    super().check()
    if self.vocab_size < 3:
      raise ValueError(f"induction_heads needs vocab_size >= 3, got {self.vocab_size}")
    for t in (self.seq_len,) + tuple(self.eval_lengths):
      if t < 3:
        raise ValueError(f"induction_heads needs lengths >= 3 (S, the token, the final S), got {t}")

  @property
  def special(self) -> int:
    return self.vocab_size - 1


SETTINGS = {
    "len256": InductionHeadsSetting(),
    "len64": InductionHeadsSetting(seq_len=64, eval_lengths=(128, 256, 512, 1024)),
    # For tests and smoke runs.
    "small": InductionHeadsSetting(seq_len=32, eval_lengths=(64, 128), num_train=2048, num_validation=256,
                                   num_test=256),
}
DEFAULT = "len256"


def answers_per_example(setting: InductionHeadsSetting) -> int:
  del setting
  return 1  # The token after the first special token, asked at the last position.


def split_lengths(setting: InductionHeadsSetting) -> dict[str, int]:
  lengths = {split: setting.seq_len for split in base.SPLITS}
  lengths.update({f"test_len{t}": t for t in setting.eval_lengths})
  return lengths


def generate(setting: InductionHeadsSetting, split: str, rng: np.random.Generator,
             count: int) -> list[dict[str, np.ndarray]]:
  t = split_lengths(setting)[split]
  special = setting.special
  inputs_BT = rng.integers(0, special, size=(count, t))
  place_B = rng.integers(0, t - 2, size=count)
  rows = np.arange(count)
  inputs_BT[rows, place_B] = special
  inputs_BT[:, t - 1] = special
  targets_BT = np.zeros((count, t), np.int64)
  targets_BT[:, t - 1] = inputs_BT[rows, place_B + 1]
  mask_BT = np.zeros((count, t), np.int64)
  mask_BT[:, t - 1] = 1
  return base.lm_examples(inputs_BT, targets_BT, mask_BT)


def check(setting: InductionHeadsSetting, example: dict[str, np.ndarray]) -> dict[int, int]:
  """{last position: answer} from the inputs alone: the token after the first of the two special tokens."""
  inputs = [int(x) for x in example["inputs"]]
  where = [t for t, x in enumerate(inputs) if x == setting.special]
  if len(where) != 2 or where[1] != len(inputs) - 1:
    raise AssertionError(f"expected the special token twice, the second time last; found it at {where}")
  return {len(inputs) - 1: inputs[where[0] + 1]}
