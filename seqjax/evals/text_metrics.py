"""Text metrics for generated sequences: exact match, corpus BLEU (sacrebleu), ROUGE-L.

All take parallel lists of hypothesis and reference strings (one reference per hypothesis).
ROUGE-L is implemented here: the longest common subsequence of whitespace tokens,
P = LCS / |hyp|, R = LCS / |ref|, F = (1 + b^2) P R / (R + b^2 P) (b = 1 -> F1), averaged over
sentences (an empty hypothesis or reference scores 0, two empty strings score 1).
"""
from __future__ import annotations

from typing import Sequence

import sacrebleu


def _check(hyps: Sequence[str], refs: Sequence[str]):
  if len(hyps) != len(refs):
    raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} references; pass one reference "
                     "per hypothesis.")
  if not hyps:
    raise ValueError("no hypotheses given.")


def exact_match(hyps: Sequence[str], refs: Sequence[str], *, strip: bool = True) -> float:
  """Fraction of hypotheses equal to their reference (after stripping outer whitespace)."""
  _check(hyps, refs)
  norm = (lambda s: s.strip()) if strip else (lambda s: s)
  return sum(norm(h) == norm(r) for h, r in zip(hyps, refs)) / len(hyps)


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], **kwargs) -> float:
  """sacrebleu corpus BLEU in [0, 100] (default 13a tokenisation; kwargs go to sacrebleu)."""
  _check(hyps, refs)
  return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], **kwargs).score)


def lcs_length(a: Sequence, b: Sequence) -> int:
  """Length of the longest common subsequence (O(|a| |b|) time, O(|b|) memory)."""
  if len(a) < len(b):
    a, b = b, a
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l_sentence(hyp: str, ref: str, beta: float = 1.0) -> dict[str, float]:
  """ROUGE-L precision, recall and F for one pair of whitespace-tokenised strings."""
  h, r = hyp.split(), ref.split()
  if not h and not r:
    return {"precision": 1.0, "recall": 1.0, "f": 1.0}
  if not h or not r:
    return {"precision": 0.0, "recall": 0.0, "f": 0.0}
  lcs = lcs_length(h, r)
  p, rec = lcs / len(h), lcs / len(r)
  f = 0.0 if lcs == 0 else (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p)
  return {"precision": p, "recall": rec, "f": f}


def rouge_l(hyps: Sequence[str], refs: Sequence[str], beta: float = 1.0) -> float:
  """Mean sentence ROUGE-L F over the corpus, in [0, 1]."""
  _check(hyps, refs)
  return sum(rouge_l_sentence(h, r, beta)["f"] for h, r in zip(hyps, refs)) / len(hyps)


def text_metrics(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """All three: {"exact_match", "bleu", "rouge_l"}."""
  return {"exact_match": exact_match(hyps, refs), "bleu": corpus_bleu(hyps, refs),
          "rouge_l": rouge_l(hyps, refs)}
