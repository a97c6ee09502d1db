"""Greedy and beam search for both encoder-decoders (`seqjax.decode.seq2seq`).

Oracles from each model's teacher-forced (uncached, parallel for the Transformer) forward in float64, sharing no
code with the decoding loops:
  - greedy: the argmax of the forward, one token at a time, the whole target re-run each time;
  - exhaustive search: with a 4-token vocabulary, 3 new tokens and 16 beams (no prefix is ever dropped), the K best
    hypotheses are the K best of all continuations, enumerated and scored as log p / ((5 + n) / 6) ** alpha;
  - num_beams=1 is greedy (`decode` runs the greedy loop; beam search with one beam takes the same path and differs
    only where it keeps an earlier EOS hypothesis that scores higher than greedy's whole continuation).
"""

import functools
import itertools

import jax
import numpy as np
import pytest

from seqjax.config import Seq2SeqConfig
from seqjax.decode import seq2seq as sd
from seqjax.models.seq2seq_lstm import Seq2SeqLSTM
from seqjax.models.seq2seq_transformer import Seq2SeqTransformer

BOS, EOS = 1, 2
SRC = np.asarray([[3, 2, 3, 1], [2, 3, 0, 0]], np.int32)
SRC_LEN = np.asarray([4, 2], np.int32)


@functools.lru_cache(maxsize=None)
def _model(arch, vocab, seed=0):
  if arch == "transformer":
    cfg = Seq2SeqConfig(arch="transformer", src_vocab=vocab, tgt_vocab=vocab, hidden=16, num_heads=2, mlp_dim=16,
                        encoder_layers=1, decoder_layers=2, max_len=16)
    model = Seq2SeqTransformer(cfg)
  else:
    cfg = Seq2SeqConfig(src_vocab=vocab, tgt_vocab=vocab, embed_dim=8, hidden=16, attention_dim=8)
    model = Seq2SeqLSTM(cfg)
  params = model.init(jax.random.PRNGKey(seed), SRC, SRC_LEN, np.ones((2, 1), np.int32))["params"]
  return model, params, jax.jit(lambda p, s, sl, t: model.apply({"params": p}, s, sl, t))


WIDTH = 8  # every oracle forward runs over targets padded to this width (one compilation)


def _log_probs(arch, vocab, b, targets):
  """float64 log-softmax [n, WIDTH, V] of the forward over BOS + each target (all from source row b)."""
  model, params, forward = _model(arch, vocab)
  n, width = len(targets), WIDTH
  tgt_in = np.zeros((n, width), np.int32)
  for i, t in enumerate(targets):
    tgt_in[i, :len(t)] = (BOS,) + tuple(t[:-1])
  logits = np.asarray(forward(params, np.repeat(SRC[b:b + 1], n, 0), np.repeat(SRC_LEN[b:b + 1], n), tgt_in),
                      np.float64)
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)


def _greedy_oracle(arch, vocab, b, max_new):
  new = []
  for _ in range(max_new):
    logp = _log_probs(arch, vocab, b, [tuple(new) + (0,)])
    new.append(int(np.argmax(logp[0, len(new)])))
    if new[-1] == EOS:
      break
  return new


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_greedy_equals_argmax_of_the_uncached_forward_and_one_beam(arch):
  """Catches: a decoder step that does not carry its state (KV cache, (h, c)) or the encoder memory correctly, a
  wrong stop (tokens after EOS not padded, lengths off by one), one-beam search that leaves the greedy path."""
  vocab, max_new = 13, 6
  model, params, _ = _model(arch, vocab)
  greedy = sd.decode(model, params, SRC, SRC_LEN, max_new_tokens=max_new, bos_id=BOS, eos_id=EOS)
  one_beam = sd.beam_search(model, params, SRC, SRC_LEN, num_beams=1, max_new_tokens=max_new, bos_id=BOS,
                            eos_id=EOS, length_penalty=0.0)
  for b in range(2):
    expected = _greedy_oracle(arch, vocab, b, max_new)
    n = len(expected)
    assert int(greedy.lengths[b]) == n
    np.testing.assert_array_equal(greedy.tokens[b], expected + [0] * (max_new - n))
  for b in range(2):
    # One beam follows the greedy path; it may instead return greedy's first n - 1 tokens + EOS when that scores
    # higher (log p with alpha = 0) than greedy's whole continuation.
    n, g = int(one_beam.lengths[b]), int(greedy.lengths[b])
    if n == g and np.array_equal(one_beam.tokens[b], greedy.tokens[b]):
      np.testing.assert_allclose(one_beam.scores[b], greedy.scores[b], rtol=1e-5, atol=1e-5)
    else:
      assert n < g and int(one_beam.tokens[b, n - 1]) == EOS, (b, one_beam.tokens[b], greedy.tokens[b])
      np.testing.assert_array_equal(one_beam.tokens[b, :n - 1], greedy.tokens[b, :n - 1])
      assert float(one_beam.scores[b]) > float(greedy.scores[b])


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_beam_search_equals_exhaustive_search(arch):
  """Catches: a beam whose state is not reordered to its parent (memory or decoder state of another beam), lost
  finished hypotheses, a wrong length penalty."""
  vocab, max_new, alpha, k = 4, 3, 0.6, 16
  model, params, _ = _model(arch, vocab)
  out = sd.beam_search(model, params, SRC, SRC_LEN, num_beams=k, max_new_tokens=max_new, bos_id=BOS, eos_id=EOS,
                       length_penalty=alpha)
  seqs = [s for n in range(1, max_new + 1) for s in itertools.product(range(vocab), repeat=n)
          if EOS not in s[:-1] and (s[-1] == EOS or n == max_new)]
  for b in range(2):
    logp = _log_probs(arch, vocab, b, seqs)
    scored = [sum(logp[i, j, t] for j, t in enumerate(s)) / ((5.0 + len(s)) / 6.0) ** alpha
              for i, s in enumerate(seqs)]
    ranked = sorted(zip(scored, seqs), key=lambda x: -x[0])[:k]
    np.testing.assert_allclose(out.beam_scores[b], [s for s, _ in ranked], rtol=1e-4, atol=1e-4)
    for i, (score, s) in enumerate(ranked):
      if all(abs(score - other) > 1e-4 for j, (other, _) in enumerate(ranked) if j != i):  # ties in any order
        n = int(out.beam_lengths[b, i])
        assert tuple(np.asarray(out.beam_tokens[b, i, :n])) == s, (b, i)
        assert np.all(np.asarray(out.beam_tokens[b, i, n:]) == 0)
    np.testing.assert_array_equal(out.tokens[b], out.beam_tokens[b, 0])


def test_bad_arguments_fail_before_compiling():
  model, params, _ = _model("transformer", 13)
  ok = dict(max_new_tokens=4, bos_id=BOS, eos_id=EOS)
  with pytest.raises(ValueError, match=r"src_lengths must be in \[1, 4\]"):
    sd.decode(model, params, SRC, np.asarray([5, 1]), **ok)
  with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
    sd.decode(model, params, SRC, SRC_LEN, num_beams=0, **ok)
  with pytest.raises(ValueError, match="exceeds the transformer's seq2seq.max_len=16"):
    sd.decode(model, params, SRC, SRC_LEN, max_new_tokens=16, bos_id=BOS, eos_id=EOS)
  with pytest.raises(ValueError, match="eos_id=13 is outside the target vocabulary"):
    sd.decode(model, params, SRC, SRC_LEN, max_new_tokens=4, bos_id=BOS, eos_id=13)
  with pytest.raises(ValueError, match="for a DecoderLM use seqjax.decode.generate"):
    sd.decode(object(), params, SRC, SRC_LEN, **ok)
