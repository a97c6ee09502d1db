"""The cached sampler (prefill + steps): greedy = argmax of the full forward, top-k=1 = greedy, context errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.decode.sampling import filter_logits, sample_tokens
from seqjax.models.lm import DecoderLM
from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def lm():
  config = tiny_config()
  model = DecoderLM(config.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params, config.model.max_len


def test_greedy_follows_the_argmax_of_the_full_forward(lm):
  model, params, max_len = lm
  prompt = jnp.asarray([[1, 40, 50], [1, 60, 70]], jnp.int32)
  out = sample_tokens(model, params, prompt, num_tokens=6, max_len=max_len, rng=jax.random.PRNGKey(0),
                      temperature=0.0)
  assert out.shape == (2, 9)
  np.testing.assert_array_equal(out[:, :3], prompt)
  logits = model.apply({"params": params}, out)
  np.testing.assert_array_equal(np.asarray(out[:, 3:]), np.asarray(jnp.argmax(logits[:, 2:-1], -1)))


def test_greedy_with_a_hybrid_of_mixers():
  config = tiny_config(model={"mixer": "gru,attention", "num_layers": 2})
  model = DecoderLM(config.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  prompt = jnp.asarray([[1, 40, 50, 7]], jnp.int32)
  out = sample_tokens(model, params, prompt, num_tokens=5, max_len=config.model.max_len, rng=jax.random.PRNGKey(0),
                      temperature=0.0)
  logits = model.apply({"params": params}, out)
  np.testing.assert_array_equal(np.asarray(out[:, 4:]), np.asarray(jnp.argmax(logits[:, 3:-1], -1)))


def test_top_k_one_is_greedy_and_sampling_is_seeded(lm):
  model, params, max_len = lm
  prompt = jnp.asarray([[1, 40, 50]], jnp.int32)
  kw = dict(num_tokens=5, max_len=max_len)
  greedy = sample_tokens(model, params, prompt, rng=jax.random.PRNGKey(0), temperature=0.0, **kw)
  top1 = sample_tokens(model, params, prompt, rng=jax.random.PRNGKey(1), temperature=1.0, top_k=1, **kw)
  np.testing.assert_array_equal(greedy, top1)
  a = sample_tokens(model, params, prompt, rng=jax.random.PRNGKey(3), temperature=1.5, **kw)
  b = sample_tokens(model, params, prompt, rng=jax.random.PRNGKey(3), temperature=1.5, **kw)
  np.testing.assert_array_equal(a, b)


def test_filter_logits_keeps_top_k():
  logits = jnp.asarray([[1.0, 5.0, 3.0, 4.0]])
  out = filter_logits(logits, temperature=2.0, top_k=2)
  np.testing.assert_allclose(out, [[-np.inf, 2.5, -np.inf, 2.0]])


def test_too_long_prompt_is_a_clear_error(lm):
  model, params, max_len = lm
  with pytest.raises(ValueError, match="exceeds the model's context"):
    sample_tokens(model, params, jnp.ones((1, max_len - 2), jnp.int32), num_tokens=5, max_len=max_len,
                  rng=jax.random.PRNGKey(0))
