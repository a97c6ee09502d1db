"""Beam search (`generate(..., num_beams=K)`) for every mixer family.

Oracles, all from the model's parallel (uncached) forward in float64, sharing no code with seqjax.decode.beam:
  - exhaustive search: with a 4-token vocabulary, 3 new tokens and enough beams that no prefix is ever dropped,
    the K best hypotheses are the K best of all continuations (enumerated);
  - a plain-Python beam search of the documented algorithm, each hypothesis scored as its own batch row: beam
    search with the cache reordered per beam (KV rows, (h, c), SSM states, conv windows, a scanned stack) must
    give the same hypotheses and scores;
  - num_beams=1 is greedy.
"""

import itertools

import numpy as np
import pytest

from seqjax.decode import beam, common, generate
from tests.decode.helpers import CASES, full_log_probs, make_lm, model_config

PROMPTS = np.asarray([[1, 3, 2, 3], [2, 0, 0, 0]], np.int32)
LENGTHS = np.asarray([4, 1], np.int32)


def _lp(n, alpha):
  return ((5.0 + n) / 6.0) ** alpha


def _score_rows(model, params, rows, width):
  """Sum of the log-probabilities of each row's new tokens: rows = [(prompt, new tokens)], one batch row each."""
  tokens = np.zeros((len(rows), width), np.int32)
  for i, (prompt, new) in enumerate(rows):
    tokens[i, :len(prompt) + len(new)] = list(prompt) + list(new)
  logp = full_log_probs(model, params, tokens)
  return [sum(logp[i, len(p) + j - 1, tok] for j, tok in enumerate(new)) for i, (p, new) in enumerate(rows)]


def _exhaustive(model, params, prompt, vocab, max_new, stop, alpha, k):
  """The k best of every continuation (ending at a stop token or after max_new tokens): [(score, tokens)]."""
  seqs = []
  for n in range(1, max_new + 1):
    for new in itertools.product(range(vocab), repeat=n):
      if all(t not in stop for t in new[:-1]) and (new[-1] in stop or n == max_new):
        seqs.append(new)
  logps = _score_rows(model, params, [(prompt, s) for s in seqs], len(prompt) + max_new)
  ranked = sorted(((lp / _lp(len(s), alpha), s) for lp, s in zip(logps, seqs)), key=lambda x: -x[0])
  return ranked[:k]


def _reference_beam(model, params, prompt, vocab, max_new, stop, alpha, k):
  """The documented algorithm in plain Python, every hypothesis scored by the full forward as its own row."""
  width = len(prompt) + max_new
  alive, finished = [((), 0.0)], []
  num_candidates = (1 + len(stop)) * k
  for t in range(max_new):
    rows = [(prompt, new) for new, _ in alive]
    tokens = np.zeros((k, width), np.int32)
    for i, (p, new) in enumerate(rows):
      tokens[i, :len(p) + len(new)] = list(p) + list(new)
    logp = full_log_probs(model, params, tokens)
    cands = [(logp_a + logp[i, len(prompt) + t - 1, tok], new + (tok,))
             for i, (new, logp_a) in enumerate(alive) for tok in range(vocab)]
    cands = sorted(cands, key=lambda c: -c[0])[:num_candidates]  # stable: ties keep (beam, token) order
    last = t + 1 == max_new
    finished += [(lp / _lp(t + 1, alpha), new) for lp, new in cands if new[-1] in stop or last]
    alive = [(new, lp) for lp, new in cands if new[-1] not in stop][:k]
  return sorted(finished, key=lambda x: -x[0])[:k]


def _check_against(result, b, expected, *, max_new):
  scores = np.asarray(result.beam_scores[b])
  np.testing.assert_allclose(scores, [s for s, _ in expected], rtol=1e-4, atol=1e-4)
  tokens, lengths = np.asarray(result.beam_tokens[b]), np.asarray(result.beam_lengths[b])
  for i, (score, new) in enumerate(expected):
    # Equal scores may come in either order; otherwise the hypothesis is the same.
    if all(abs(score - s) > 1e-4 for j, (s, _) in enumerate(expected) if j != i):
      got = tokens[i, LENGTHS[b]:lengths[i]]
      assert tuple(got) == new, (b, i, got, new)
    np.testing.assert_array_equal(tokens[i, :LENGTHS[b]], PROMPTS[b, :LENGTHS[b]])
    assert np.all(tokens[i, lengths[i]:] == 0)
    assert lengths[i] - LENGTHS[b] <= max_new
  np.testing.assert_array_equal(result.tokens[b], tokens[0])
  assert float(result.scores[b]) == scores[0]


@pytest.mark.parametrize("case", ["attention", pytest.param("hybrid", marks=pytest.mark.slow)])
def test_beam_search_equals_exhaustive_search(case):
  vocab, max_new, stop, alpha, k = 4, 3, (1,), 0.6, 16
  mixer = "attention" if case == "attention" else "mamba2,attention"
  model, params = make_lm(model_config(mixer, vocab=vocab, num_layers=1 if case == "attention" else 2), seed=3)
  out = generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=max_new, num_beams=k,
                 stop_tokens=stop, length_penalty=alpha)
  for b in range(2):
    expected = _exhaustive(model, params, tuple(PROMPTS[b, :LENGTHS[b]]), vocab, max_new, stop, alpha, k)
    _check_against(out, b, expected, max_new=max_new)


FAMILIES = ["attention", "attention_window", "attention_scanned", "lstm", "mamba", "mamba2",
            "hybrid_mamba_attention_lstm"]


FAST = ("attention_scanned", "lstm", "hybrid_mamba_attention_lstm")


@pytest.mark.parametrize("case", [pytest.param(name, marks=() if name in FAST else pytest.mark.slow)
                                  for name in FAMILIES])
def test_beam_search_equals_the_reference_with_beams_as_separate_rows(case):
  vocab, max_new, stop, alpha, k = 13, 5, (4, 7), 0.8, 3
  model, params = make_lm(CASES[case], seed=1, embed_scale=1.0)  # flat enough that beams swap parents
  out = generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=max_new, num_beams=k,
                 stop_tokens=stop, length_penalty=alpha)
  for b in range(2):
    expected = _reference_beam(model, params, tuple(PROMPTS[b, :LENGTHS[b]]), vocab, max_new, stop, alpha, k)
    _check_against(out, b, expected, max_new=max_new)


@pytest.mark.parametrize("stop, alpha", [((), 1.0), ((5, 9), 0.0)])
def test_one_beam_is_greedy(stop, alpha):
  model, params = make_lm(CASES["mamba"])
  greedy = generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=6, stop_tokens=stop)
  prompts, lengths = common.check_prompts(PROMPTS, LENGTHS, max_new_tokens=6, max_len=24, vocab_size=13)
  one = beam.beam_search(model, params, prompts, lengths, common.stop_table(stop, 2, 13), num_beams=1,
                         max_new_tokens=6, length_penalty=alpha, pad_id=0)
  np.testing.assert_array_equal(one.tokens, greedy.tokens)
  np.testing.assert_array_equal(one.lengths, greedy.lengths)


def test_stops_early_once_no_beam_can_win():
  """The most likely first token is the stop token and alpha is 0: the best hypothesis is finished after one step,
  but the loop must go on until the K-th finished one beats every alive beam. The result is the full-length
  reference's, with K real hypotheses."""
  vocab, max_new, k = 13, 12, 3
  model, params = make_lm(CASES["gru"])
  logp = full_log_probs(model, params, PROMPTS)
  stop = tuple(int(t) for t in np.argsort(-logp[0, LENGTHS[0] - 1])[:1])
  out = generate(model, params, PROMPTS[:1], max_new_tokens=max_new, num_beams=k, stop_tokens=stop,
                 length_penalty=0.0)
  expected = _reference_beam(model, params, tuple(PROMPTS[0]), vocab, max_new, stop, 0.0, k)
  _check_against(out, 0, expected, max_new=max_new)
  assert np.all(np.isfinite(np.asarray(out.beam_scores)))
