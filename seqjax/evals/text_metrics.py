"""Text metrics for generated sequences: exact match, corpus BLEU (sacrebleu), ROUGE-L.

All take parallel lists of hypothesis and reference strings (one reference per hypothesis).
ROUGE-L comes from Google's `rouge-score` package (the figures papers report): both strings are lower-cased and
split into runs of [a-z0-9] (so "twenty-one" is two tokens), no stemming; with LCS the longest common subsequence of
the token lists, P = LCS / |hyp|, R = LCS / |ref|, F1 = 2 P R / (P + R), averaged over sentences (a pair with an
empty side scores 0).
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


def _rouge_l_scorer():
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel  (imports nltk: ~0.5 s)
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_sentence(hyp: str, ref: str) -> dict[str, float]:
  """ROUGE-L precision, recall and F1 of one hypothesis against one reference (`rouge-score`, tokens as above)."""
  score = _rouge_l_scorer().score(ref, hyp)["rougeL"]
  return {"precision": float(score.precision), "recall": float(score.recall), "f": float(score.fmeasure)}


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Mean sentence ROUGE-L F1 over the corpus, in [0, 1] (`rouge-score`'s "rougeL", no stemming)."""
  _check(hyps, refs)
  scorer = _rouge_l_scorer()
  return sum(float(scorer.score(r, h)["rougeL"].fmeasure) for h, r in zip(hyps, refs)) / len(hyps)


def text_metrics(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """All three: {"exact_match", "bleu", "rouge_l"}."""
  return {"exact_match": exact_match(hyps, refs), "bleu": corpus_bleu(hyps, refs),
          "rouge_l": rouge_l(hyps, refs)}
