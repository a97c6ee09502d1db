"""Corpus BLEU and ROUGE-L against values worked out by hand in this file (not against sacrebleu itself).

BLEU (Papineni et al. 2002): p_n = clipped n-gram matches / hypothesis n-grams, summed over the corpus before
dividing; BP = exp(1 - r / c) if the hypotheses are shorter than the references (c < r), else 1;
BLEU = 100 * BP * (p_1 p_2 p_3 p_4)^(1/4). Zero-match orders use sacrebleu's default "exp" smoothing, documented as
p_n = 1 / (2^k * hypothesis n-grams) for the k-th order without a match.
"""

import math

import pytest

from seqjax.evals import text_metrics as tm

HYP_1, REF_1 = "the cat sat on the mat", "the cat sat on a red mat"
HYP_2, REF_2 = "there is a dog in the garden", "there is a big dog in the garden"


def test_corpus_bleu_two_sentences_by_hand():
  """Catches (each planted once by rewriting seqjax.evals.text_metrics.corpus_bleu): hypotheses and references
  swapped, the score returned in [0, 1], each reference given as its own reference stream ([[r] for r in refs]),
  the mean of sentence BLEUs instead of corpus BLEU, lowercasing turned on with a cased reference (third case)."""
  # Sentence 1, hyp (6 tokens) vs ref (7 tokens):
  #   1-grams: the x2 (clipped to 1), cat, sat, on, mat              -> 5 / 6
  #   2-grams: the cat, cat sat, sat on | on the, the mat             -> 3 / 5
  #   3-grams: the cat sat, cat sat on | sat on the, on the mat       -> 2 / 4
  #   4-grams: the cat sat on | cat sat on the, sat on the mat        -> 1 / 3
  # Sentence 2, hyp (7 tokens) vs ref (8 tokens, "big" inserted):
  #   1-grams: all 7 match                                            -> 7 / 7
  #   2-grams: there is, is a, dog in, in the, the garden | a dog     -> 5 / 6
  #   3-grams: there is a, dog in the, in the garden | is a dog, a dog in -> 3 / 5
  #   4-grams: dog in the garden | 3 others                           -> 1 / 4
  # Corpus: p = 12/13, 8/11, 5/9, 2/7; c = 13, r = 15, BP = exp(1 - 15/13) = exp(-2/13).
  # BLEU = 100 * exp(-2/13) * (960 / 9009)^(1/4) = 48.987...
  expected = 100 * math.exp(-2 / 13) * ((12 / 13) * (8 / 11) * (5 / 9) * (2 / 7)) ** 0.25
  assert expected == pytest.approx(48.9874, abs=1e-4)
  assert tm.corpus_bleu([HYP_1, HYP_2], [REF_1, REF_2]) == pytest.approx(expected, rel=1e-9)
  assert tm.text_metrics([HYP_1, HYP_2], [REF_1, REF_2])["bleu"] == pytest.approx(expected, rel=1e-9)
  # Case matters by default: "The" no longer matches "the" in sentence 1 (1-grams 4/6, 2-grams 2/5, 3-grams 1/4,
  # 4-grams 0/3), so the score drops.
  assert tm.corpus_bleu([HYP_1, HYP_2], ["The cat sat on a red mat", REF_2]) < expected - 5


def test_sentence_bleu_known_values():
  """One sentence by hand; Papineni's "the the the ..." example for clipping, with and without smoothing.

  Catches (each planted once): smoothing kwargs not passed through to sacrebleu (corpus_bleu rewritten); and, to show
  the hand values pin the formula itself, a missing clip of the n-gram counts (7/7 instead of 2/7), a brevity
  penalty computed as exp(1 - c / r), no brevity penalty (the last three by monkeypatching sacrebleu's BLEU
  statistics; both BLEU tests failed)."""
  # Sentence 1 alone: p = 5/6, 3/5, 2/4, 1/3 (product 1/12), c = 6, r = 7, BP = exp(-1/6).
  assert tm.corpus_bleu([HYP_1], [REF_1]) == pytest.approx(100 * math.exp(-1 / 6) * (1 / 12) ** 0.25, rel=1e-9)
  # "the" x 7 against "the cat is on the mat": clipped unigram precision 2/7 (the reference has "the" twice);
  # no 2-, 3-, 4-gram matches, so smoothing gives 1/(2*6), 1/(4*5), 1/(8*4); c = 7 > r = 6, BP = 1.
  hyp, ref = "the the the the the the the", "the cat is on the mat"
  smoothed = 100 * ((2 / 7) * (1 / 12) * (1 / 20) * (1 / 32)) ** 0.25
  assert smoothed == pytest.approx(7.8098, abs=1e-4)
  assert tm.corpus_bleu([hyp], [ref]) == pytest.approx(smoothed, rel=1e-9)
  assert tm.corpus_bleu([hyp], [ref], smooth_method="none") == 0.0
  assert tm.corpus_bleu([REF_1, REF_2], [REF_1, REF_2]) == pytest.approx(100.0)


def test_rouge_l_by_hand():
  """The rouge-score package against LCS lengths counted by hand. Catches: a greedy left-to-right matcher instead
  of the LCS (1 instead of 3 on the first pair), a contiguous longest common substring (2 instead of 3 on the second
  pair), precision and recall swapped (second pair)."""
  # "x a b c" vs "a b c x": greedy matching takes x first and then nothing; the LCS is "a b c" = 3.
  # P = 3/4, R = 3/4, F = 3/4.
  s = tm.rouge_l_sentence("x a b c", "a b c x")
  assert (s["precision"], s["recall"], s["f"]) == pytest.approx((0.75, 0.75, 0.75))
  # "a b c d e f" (6) vs "a x c y e z w" (7): LCS "a c e" = 3 (no two of them adjacent in either).
  # P = 3/6, R = 3/7, F = 2 P R / (P + R) = (3/7) / (13/14) = 6/13.
  s = tm.rouge_l_sentence("a b c d e f", "a x c y e z w")
  assert s["precision"] == pytest.approx(1 / 2)
  assert s["recall"] == pytest.approx(3 / 7)
  assert s["f"] == pytest.approx(6 / 13)
  # The corpus score is the mean of the sentence F's: (3/4 + 6/13) / 2 = 63/104.
  assert tm.rouge_l(["x a b c", "a b c d e f"], ["a b c x", "a x c y e z w"]) == pytest.approx(63 / 104)
