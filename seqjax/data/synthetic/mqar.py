"""mqar — multi-query associative recall, as generated in Zoology (Arora et al., 2023, "Zoology: Measuring and
Improving Recall in Efficient Language Models", its `multiquery_ar`).

One example of length T with P key-value pairs, vocabulary V:

    k1 v1 k2 v2 ... kP vP | x x k3 x x x k1 x ... k2 x ...
    \\____ 2P tokens ____/   \\____ T - 2P tokens: the P keys again as queries, in random order ____/

* keys are P distinct tokens of the lower half of the vocabulary [1, V/2), values P distinct tokens of the upper
  half [V/2, V);
* query i is the key of pair i, placed at position 2P + 2 g_i, where the gaps g_i are P distinct draws from
  {0, ..., (T - 2P)/2 - 1} with probability proportional to (g + 1)^(a - 1), a = 0.01 — the paper's power law, so
  most queries come soon after the pairs and a few far away;
* every other position after the pairs holds a token drawn uniformly from the whole vocabulary (the paper's
  `random_non_queries`; such a token may equal a key or a value, and is never scored);
* at each query position the target is the value that followed that key among the pairs; only those P positions
  have loss_mask = 1 (accuracy over them is the figure Zoology reports).

Settings (T, P): (64, 4), (128, 8), (256, 16) at V = 8192 — the paper's; 100,000 training and 3,000 evaluation
examples per split, as in Zoology.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqjax.data.synthetic import base

NAME = "mqar"
KIND = "lm"
EXACT_LENGTHS = True  # Every example fills its split's length (base.py).


@dataclasses.dataclass(frozen=True)
class MqarSetting(base.Setting):
  seq_len: int = 64  # T, the input length.
  num_pairs: int = 4  # P, key-value pairs (and queries) per example.
  vocab_size: int = 8192  # V: keys in [1, V/2), values in [V/2, V).
  power_a: float = 0.01  # The gaps' power law: p(g) ~ (g + 1)^(a - 1).
  num_train: int = 100_000
  num_validation: int = 3_000
  num_test: int = 3_000

  def check(self) -> None:
    super().check()
    t, p, v = self.seq_len, self.num_pairs, self.vocab_size
    if p < 1 or t % 2 or 4 * p > t:
      raise ValueError(f"mqar needs an even seq_len >= 4 * num_pairs (room for the pairs and the queries' gaps), "
                       f"got seq_len={t}, num_pairs={p}")
    if v <= t or v // 2 - 1 < p:
      raise ValueError(f"mqar needs vocab_size > seq_len and at least num_pairs keys in [1, vocab_size/2), got "
                       f"vocab_size={v}, seq_len={t}, num_pairs={p}")
    if not 0 < self.power_a <= 1:
      raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


PUBLISHED = ((64, 4), (128, 8), (256, 16))  # Zoology's (length, pairs) settings.
SETTINGS = {f"len{t}_pairs{p}": MqarSetting(seq_len=t, num_pairs=p) for t, p in PUBLISHED}
# The same with a 512-token vocabulary (keys in [1, 256), values in [256, 512)): what a CPU can train in minutes
# (experiments/reproduce.py mqar --scale=cpu); with 8,192 tokens each key is seen too rarely in a short run.
SETTINGS.update({f"len{t}_pairs{p}_v512": MqarSetting(seq_len=t, num_pairs=p, vocab_size=512) for t, p in PUBLISHED})
# "small": the first setting with few examples, for tests and smoke runs.
SETTINGS["small"] = MqarSetting(seq_len=64, num_pairs=4, num_train=2048, num_validation=256, num_test=256)
DEFAULT = "len64_pairs4"


def answers_per_example(setting: MqarSetting) -> int:
  return setting.num_pairs  # One query per pair.


def split_lengths(setting: MqarSetting) -> dict[str, int]:
  return {split: setting.seq_len for split in base.SPLITS}


def generate(setting: MqarSetting, split: str, rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
  del split  # Every split has the same distribution.
  t, p, v = setting.seq_len, setting.num_pairs, setting.vocab_size
  context = 2 * p
  keys_BP = 1 + base.sample_without_replacement(rng, count, p, np.zeros(v // 2 - 1))
  values_BP = v // 2 + base.sample_without_replacement(rng, count, p, np.zeros(v - v // 2))
  space = (t - context) // 2
  log_w = (setting.power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
  gaps_BP = base.sample_without_replacement(rng, count, p, log_w)

  inputs_BT = rng.integers(0, v, size=(count, t))  # The fillers; pairs and queries overwrite their places.
  inputs_BT[:, 0:context:2] = keys_BP
  inputs_BT[:, 1:context:2] = values_BP
  query_pos_BP = context + 2 * gaps_BP
  np.put_along_axis(inputs_BT, query_pos_BP, keys_BP, axis=1)
  targets_BT = np.zeros((count, t), np.int64)
  np.put_along_axis(targets_BT, query_pos_BP, values_BP, axis=1)
  mask_BT = np.zeros((count, t), np.int64)
  np.put_along_axis(mask_BT, query_pos_BP, 1, axis=1)
  return base.lm_examples(inputs_BT, targets_BT, mask_BT)


def check(setting: MqarSetting, example: dict[str, np.ndarray]) -> dict[int, int]:
  """{position: answer} recomputed from the inputs alone: at a query position t (a key of the lower half seen
  before, at an even place among the first tokens), the token right after that key's first occurrence."""
  del setting
  inputs = [int(x) for x in example["inputs"]]
  answers = {}
  for t in np.flatnonzero(example["loss_mask"]):
    first = inputs.index(inputs[t])
    if first >= t:
      raise AssertionError(f"query at {t} asks for a key that did not occur before")
    answers[int(t)] = inputs[first + 1]
  return answers
