"""`seqjax.decode.generate` for every registered mixer and a hybrid: cached greedy = the greedy of the uncached full
forward, ragged batches = each prompt alone, stop tokens and pad, seeded sampling, and argument errors.

The oracle is the parallel forward over the finished rows (teacher forcing): a greedy token must be the argmax of
the full forward's logits at the position before it. It runs each row from its own prompt, so passing it for a
ragged batch also proves that every row got what it gets alone.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.decode import generate
from tests.decode.helpers import CASES, full_log_probs, make_lm, model_config, tiered

PROMPTS = np.asarray([[1, 5, 7, 2, 9], [1, 3, 0, 0, 0], [1, 11, 4, 6, 0]], np.int32)
LENGTHS = np.asarray([5, 2, 4], np.int32)
NEW = 6


def _check_greedy_rows(model, params, out, lengths, new_counts):
  """Every row: prompt kept, continuation = greedy of the full forward, pad after, lengths right."""
  tokens = np.asarray(out.tokens)
  np.testing.assert_array_equal(np.asarray(out.lengths), lengths + new_counts)
  logp = full_log_probs(model, params, tokens)
  for b, (length, count) in enumerate(zip(lengths, new_counts)):
    np.testing.assert_array_equal(tokens[b, :length], PROMPTS[b, :length])
    for t in range(length, length + count):
      assert tokens[b, t] == np.argmax(logp[b, t - 1]), (b, t, tokens[b], logp[b, t - 1])
    assert np.all(tokens[b, length + count:] == 0), tokens[b]
    np.testing.assert_allclose(float(out.scores[b]),
                               sum(logp[b, t - 1, tokens[b, t]] for t in range(length, length + count)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", tiered(list(CASES)))
def test_ragged_cached_greedy_equals_the_uncached_greedy_of_each_row(case):
  model, params = make_lm(CASES[case])
  out = generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=NEW)
  assert out.tokens.shape == (3, 5 + NEW)
  _check_greedy_rows(model, params, out, LENGTHS, np.full(3, NEW))


@pytest.mark.parametrize("case", ["attention", pytest.param("hybrid_mamba_attention_lstm", marks=pytest.mark.slow)])
def test_a_ragged_row_equals_the_prompt_alone(case):
  model, params = make_lm(CASES[case])
  batch = generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=NEW)
  for b, length in enumerate(LENGTHS):
    alone = generate(model, params, PROMPTS[b:b + 1, :length], max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(batch.tokens[b, :length + NEW]), np.asarray(alone.tokens[0]))


def test_stop_tokens_end_rows_with_pad_after():
  model, params = make_lm(CASES["attention"])
  free = np.asarray(generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=NEW).tokens)
  stop = int(free[0, LENGTHS[0] + 2])  # row 0's third new token
  out = generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=NEW, stop_tokens=(stop,), pad_id=0)
  counts = []
  for b, length in enumerate(LENGTHS):
    new = list(free[b, length:length + NEW])
    counts.append(new.index(stop) + 1 if stop in new else NEW)
  assert counts[0] == 3 or stop in free[0, LENGTHS[0]:LENGTHS[0] + 2]
  _check_greedy_rows(model, params, out, LENGTHS, np.asarray(counts))
  # Per-row stop tokens: only row 0 stops on it.
  table = np.asarray([[stop], [-1], [-1]], np.int32)
  out = generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=NEW, stop_tokens=table)
  _check_greedy_rows(model, params, out, LENGTHS, np.asarray([counts[0], NEW, NEW]))


def test_sampling_is_seeded_and_top_k_one_is_greedy():
  model, params = make_lm(CASES["lstm"])
  kw = dict(prompt_lengths=LENGTHS, max_new_tokens=NEW)
  greedy = generate(model, params, PROMPTS, **kw)
  top1 = generate(model, params, PROMPTS, temperature=1.0, top_k=1, rng=jax.random.key(5), **kw)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  a = generate(model, params, PROMPTS, temperature=2.0, rng=jax.random.key(3), **kw)
  b = generate(model, params, PROMPTS, temperature=2.0, rng=jax.random.key(3), **kw)
  c = generate(model, params, PROMPTS, temperature=2.0, rng=jax.random.key(4), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # Sampled rows keep the layout: prompt, NEW tokens, pad; scores are the model's log-probs of the draws.
  logp = full_log_probs(model, params, np.asarray(a.tokens))
  for row, length in enumerate(LENGTHS):
    expected = sum(logp[row, t - 1, a.tokens[row, t]] for t in range(length, length + NEW))
    np.testing.assert_allclose(float(a.scores[row]), expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(a.tokens[row, length + NEW:]) == 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-1), "top_k must be"),
    (dict(top_k=14), "larger than the vocabulary"),
    (dict(min_p=1.0), "min_p must be in"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=1.0), "needs a seed"),
    (dict(max_new_tokens=20), "exceeds the model's context"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(prompt_lengths=np.asarray([5, 0, 4])), "prompt_lengths must be in"),
    (dict(prompt_lengths=np.asarray([5, 6, 4])), "prompt_lengths must be in"),
    (dict(prompt_lengths=np.asarray([5, 4])), "one entry per prompt row"),
    (dict(stop_tokens=(13,)), "stop_tokens must be ids"),
    (dict(num_beams=2, temperature=0.5, rng=jax.random.key(0)), "beam search"),
    (dict(num_beams=0), "num_beams must be"),
    (dict(draft=object()), "draft must be a pair"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
  model, params = make_lm(model_config("attention"))
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(ValueError, match=message):
    generate(model, params, PROMPTS, **kwargs)


def test_bad_prompts_are_clear_errors():
  model, params = make_lm(model_config("attention"))
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, params, np.zeros((2, 0), np.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match="model's vocabulary"):
    generate(model, params, np.asarray([[1, 13]]), max_new_tokens=2)
  with pytest.raises(ValueError, match="DecoderLM"):
    generate(object(), params, PROMPTS, max_new_tokens=2)


def test_jitted_generate_compiles_once_per_shape():
  """A second call with other prompts of the same shape reuses the program (no retrace)."""
  generate_module = importlib.import_module("seqjax.decode.generate")  # the package exports the function
  model, params = make_lm(model_config("gru"))
  generate(model, params, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=3, stop_tokens=(3,))
  size = generate_module._sample._cache_size()  # pylint: disable=protected-access
  generate(model, params, PROMPTS[::-1].copy(), prompt_lengths=LENGTHS[::-1].copy(), max_new_tokens=3,
           stop_tokens=(4,))
  assert generate_module._sample._cache_size() == size  # pylint: disable=protected-access
