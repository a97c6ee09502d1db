"""Text metrics: exact match, sacrebleu corpus BLEU, and ROUGE-L (rouge-score) on hand-computed examples."""
import pytest
import sacrebleu

from seqjax.evals import text_metrics as tm


def test_exact_match():
  assert tm.exact_match(["a b", "c ", "d"], ["a b", "c", "e"]) == pytest.approx(2 / 3)
  assert tm.exact_match(["c "], ["c"], strip=False) == 0.0


def test_rouge_l_hand_computed():
  # hyp: "the cat was found under the bed" (7), ref: "the cat was under the bed" (6)
  # LCS = "the cat was under the bed" = 6 -> P = 6/7, R = 1, F = 2 * (6/7) / (1 + 6/7) = 12/13
  s = tm.rouge_l_sentence("the cat was found under the bed", "the cat was under the bed")
  assert s["precision"] == pytest.approx(6 / 7)
  assert s["recall"] == pytest.approx(1.0)
  assert s["f"] == pytest.approx(12 / 13)
  # "police killed the gunman" vs "police kill the gunman": LCS 3 of 4 -> F = 0.75
  assert tm.rouge_l_sentence("police kill the gunman", "police killed the gunman")["f"] == 0.75
  # Order matters: reversed words share an LCS of 1 out of 3.
  assert tm.rouge_l_sentence("c b a", "a b c")["f"] == pytest.approx(1 / 3)
  assert tm.rouge_l_sentence("", "a")["f"] == 0.0
  assert tm.rouge_l_sentence("", "")["f"] == 0.0  # rouge-score: an empty side scores 0
  assert tm.rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


def test_rouge_l_tokenizes_like_rouge_score():
  """rouge-score lower-cases and splits on anything but [a-z0-9]: "Twenty-One" is the two tokens "twenty one".
  hyp "twenty-one thousand" (3 tokens) vs ref "Twenty one" (2): LCS 2, P = 2/3, R = 1, F = 4/5."""
  s = tm.rouge_l_sentence("twenty-one thousand", "Twenty one")
  assert (s["precision"], s["recall"], s["f"]) == pytest.approx((2 / 3, 1.0, 0.8))


def test_corpus_bleu_matches_sacrebleu_and_bounds():
  hyps = ["one thousand two hundred four", "twenty-one", "nine"]
  refs = ["one thousand two hundred four", "twenty-two", "nine"]
  expected = sacrebleu.corpus_bleu(hyps, [refs]).score
  assert tm.corpus_bleu(hyps, refs) == pytest.approx(expected)
  assert 0.0 < expected < 100.0
  assert tm.corpus_bleu(refs, refs) == pytest.approx(100.0)
  metrics = tm.text_metrics(hyps, refs)
  assert metrics["exact_match"] == pytest.approx(2 / 3)


def test_mismatched_lengths_raise():
  with pytest.raises(ValueError, match="one reference per hypothesis"):
    tm.rouge_l(["a"], ["a", "b"])
  with pytest.raises(ValueError, match="no hypotheses"):
    tm.exact_match([], [])
