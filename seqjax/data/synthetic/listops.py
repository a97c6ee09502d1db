"""listops — the Long Range Arena's ListOps (Tay et al., 2021; after Nangia & Bowman, 2018), generated as by LRA's
`listops.py`: nested lists of operations over the digits 0-9, to be evaluated; a 10-way sequence classification.

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

Operators: MIN, MAX, MED (the median, rounded down as int(np.median)), SM (sum modulo 10). The generator is LRA's:
a node at depth d < max_depth is an operator with probability 1 - value_p = 0.25 (else a uniform digit; at
max_depth always a digit); an operator takes a uniform number of arguments in [2, max_args], each a node one level
deeper. Trees are drawn from the root (depth 1) until `num_train + num_validation + num_test` distinct token
sequences whose length L (operators, digits and closing brackets) satisfies min_length < L < max_length have been
found; the first go to train, the next to validation, the rest to test (so the splits are disjoint). LRA's text
also has round brackets around every node; LRA's and S4's loaders drop them, and so does this builder (they carry
no information).

Tokens: 0 pad, 1 + d for the digit d, then [MIN [MAX [MED [SM and ] (VOCAB_SIZE = 16). Examples are
{"inputs": int32 [L] (each its own length), "label": the value, 0-9}.

Settings: "len500_2000" is LRA's (96,000 / 2,000 / 2,000 examples); "len100_500" and "len20_100" are the reduced
lengths a CPU trains on (depth <= 10 and <= 10 arguments kept).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import statistics

import numpy as np

from seqjax.data.synthetic import base

NAME = "listops"
KIND = "classify"
NUM_CLASSES = 10

PAD, DIGIT0 = 0, 1
MIN, MAX, MED, SM, END = 11, 12, 13, 14, 15
OPERATORS = (MIN, MAX, MED, SM)
VOCAB_SIZE = 16
_NAMES = {MIN: "[MIN", MAX: "[MAX", MED: "[MED", SM: "[SM", END: "]", PAD: "<pad>"}


@dataclasses.dataclass(frozen=True)
class ListOpsSetting(base.Setting):
  min_length: int = 500  # Lengths L kept: min_length < L < max_length (LRA's strict bounds).
  max_length: int = 2000
  max_depth: int = 10
  max_args: int = 10
  value_p: float = 0.25  # Below max_depth a node is a digit unless a uniform draw is <= value_p (LRA's VALUE_P).
  num_train: int = 96_000
  num_validation: int = 2_000
  num_test: int = 2_000

  def check(self) -> None:
    super().check()
    if not 1 <= self.min_length < self.max_length - 1:
      raise ValueError(f"listops needs 1 <= min_length < max_length - 1, got min_length={self.min_length}, "
                       f"max_length={self.max_length}")
    if self.max_depth < 2 or self.max_args < 2:
      raise ValueError(f"listops needs max_depth >= 2 and max_args >= 2, got {self.max_depth}, {self.max_args}")
    if not 0 < self.value_p < 1:
      raise ValueError(f"value_p must be in (0, 1), got {self.value_p}")


SETTINGS = {
    "len500_2000": ListOpsSetting(),
    "len100_500": ListOpsSetting(min_length=100, max_length=500, num_train=20_000, num_validation=1_000,
                                 num_test=1_000),
    "len20_100": ListOpsSetting(min_length=20, max_length=100, num_train=20_000, num_validation=1_000,
                                num_test=1_000),
    # For tests and smoke runs.
    "small": ListOpsSetting(min_length=10, max_length=64, num_train=1024, num_validation=128, num_test=128),
}
DEFAULT = "len100_500"


def split_lengths(setting: ListOpsSetting) -> dict[str, int]:
  return {split: setting.max_length - 1 for split in base.SPLITS}


class _TooLong(Exception):
  """A tree being drawn already has max_length tokens: it will be rejected, so its drawing stops."""


def _tree(r: random.Random, depth: int, s: ListOpsSetting, budget: list[int]) -> tuple[list[int], int]:
  """(tokens, value) of one node, drawn as LRA's generate_tree draws it. `budget[0]` counts down the tokens a tree
  may still have; past it the tree is abandoned (_TooLong) — it would fail the length filter anyway, so the trees
  kept have LRA's distribution, at a fraction of the cost of drawing the huge ones to the end."""
  budget[0] -= 1
  if budget[0] < 0:
    raise _TooLong
  if depth >= s.max_depth or r.random() > s.value_p:
    digit = r.choice(range(10))
    return [DIGIT0 + digit], digit
  budget[0] -= 1  # The closing bracket.
  args = [_tree(r, depth + 1, s, budget) for _ in range(r.randint(2, s.max_args))]
  op = r.choice(OPERATORS)
  values = [v for _, v in args]
  if op == MIN:
    value = min(values)
  elif op == MAX:
    value = max(values)
  elif op == MED:
    value = int(statistics.median(values))  # = LRA's int(np.median(values)), faster
  else:
    value = sum(values) % 10
  return [op] + [tok for toks, _ in args for tok in toks] + [END], value


@functools.lru_cache(maxsize=4)
def _pool(setting: ListOpsSetting) -> tuple[tuple[tuple[int, ...], int], ...]:
  """All distinct (tokens, label) examples of every split, in drawing order (a function of the seed)."""
  r = random.Random(f"listops-{setting.seed}")
  need = setting.num_train + setting.num_validation + setting.num_test
  seen: dict[tuple[int, ...], int] = {}
  while len(seen) < need:
    try:
      tokens, value = _tree(r, 1, setting, [setting.max_length - 1])
    except _TooLong:
      continue
    if setting.min_length < len(tokens) < setting.max_length:
      seen.setdefault(tuple(tokens), value)
  return tuple(seen.items())


def generate(setting: ListOpsSetting, split: str, rng: np.random.Generator,
             count: int) -> list[dict[str, np.ndarray]]:
  """The examples of `split`: its slice of the seed's pool (`rng` is unused: the splits are drawn together so that
  they are disjoint; `count` must be the split's size)."""
  del rng
  if count != setting.count(split):
    raise ValueError(f"listops draws the splits together; {split!r} has {setting.count(split)} examples, "
                     f"not {count}")
  start = {"train": 0, "validation": setting.num_train,
           "test": setting.num_train + setting.num_validation}[split]
  return [{"inputs": np.asarray(tokens, np.int32), "label": np.int32(label)}
          for tokens, label in _pool(setting)[start:start + count]]


def check(setting: ListOpsSetting, example: dict[str, np.ndarray]) -> int:
  """The value of the expression, evaluated from its tokens with an explicit stack (no recursion)."""
  del setting
  stack: list[list[int]] = [[]]  # Open operators' [op, args...]; the bottom list collects the result.
  for tok in (int(x) for x in example["inputs"]):
    if tok in OPERATORS:
      stack.append([tok])
    elif tok == END:
      op, *args = stack.pop()
      ordered = sorted(args)
      mid = len(ordered) // 2
      result = {MIN: ordered[0], MAX: ordered[-1], SM: sum(args) % 10,
                MED: ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) // 2}[op]
      stack[-1].append(result)
    elif DIGIT0 <= tok < DIGIT0 + 10:
      stack[-1].append(tok - DIGIT0)
    else:
      raise AssertionError(f"unexpected token {tok}")
  if len(stack) != 1 or len(stack[0]) != 1:
    raise AssertionError("unbalanced expression")
  return stack[0][0]


def to_text(tokens) -> str:
  """Tokens -> "[MAX 4 3 [MIN 2 3 ] ]" (pads dropped)."""
  return " ".join(_NAMES.get(int(t), str(int(t) - DIGIT0)) for t in tokens if int(t) != PAD)
