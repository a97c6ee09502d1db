"""The linear-attention mixers ("linear", "retnet", "gla", "deltanet") beyond the mixer contract (tests/nn/test_mixer_contract.py
checks prefill + steps = parallel, padding independence and ragged rows for them):

- the three training forms (model.linear.mode) give the same outputs and parameter gradients through the GLA and DeltaNet modules;
- packed documents stay isolated (a row of two documents = each document alone);
- a tiny LM with each mixer trains: the loss falls over a few Adam steps on a fixed batch;
- config mistakes name their field.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.config import ConfigError, LinearAttentionConfig, ModelConfig, from_config_dict
from seqjax.models.lm import DecoderLM
from seqjax.nn.mixers import make_mixer

VARIANTS = ("linear", "retnet", "gla", "deltanet", "performer", "gated_deltanet")
B, T, D = 2, 12, 16


def _config(mixer, **linear):
  return ModelConfig(mixer=mixer, d_model=D, num_layers=2, mlp_dim=32, vocab_size=13, max_len=32,
                     positions="none", linear=LinearAttentionConfig(num_heads=2, chunk=5, **linear))


@pytest.mark.parametrize("variant", [pytest.param("gla", marks=pytest.mark.slow), "deltanet",
                                     pytest.param("gated_deltanet", marks=pytest.mark.slow)])  # linear / retnet
# reach the forms as GLA does; the ops tests cover GLA's forms, so its module-level run is in the slow set
def test_training_forms_agree_through_the_module(variant):
  """Catches: a form-specific bug only visible with the module's projections and gates (e.g. the data-dependent
  decay reaching one form only), in outputs and parameter gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  segment_ids = jnp.asarray([[1] * 7 + [2] * 5, [1] * 12])
  mixers = {mode: make_mixer(variant, _config(variant, mode=mode)) for mode in ("parallel", "recurrent", "chunked")}
  params = mixers["parallel"].init(jax.random.PRNGKey(1), x)

  def loss(mode):
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(jnp.sin(mixers[mode].apply(p, x, segment_ids=segment_ids)))))

  expected = loss("parallel")(params)
  for mode in ("recurrent", "chunked"):
    actual = loss(mode)(params)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4, err_msg=f"{variant}: {mode} vs parallel")


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_equal_each_document_alone(variant):
  """Catches: state (or the RetNet rotation's position) leaking across a document boundary."""
  cfg = _config(variant)
  mixer = make_mixer(variant, cfg)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, T, D))
  params = mixer.init(jax.random.PRNGKey(3), x)
  split = 5
  segment_ids = jnp.asarray([[1] * split + [2] * (T - split)])
  positions = jnp.asarray([list(range(split)) + list(range(T - split))])
  apply = jax.jit(mixer.apply)
  packed = apply(params, x, segment_ids=segment_ids, positions=positions)
  first, second = apply(params, x[:, :split]), apply(params, x[:, split:])
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS + ("rwkv", "based"))
def test_tiny_lm_trains(variant):
  """The LM with this mixer learns: 15 Adam steps on one batch of a repeating pattern halve the loss."""
  cfg = dataclasses.replace(_config(variant), num_layers=1)
  model = DecoderLM(cfg)
  tokens = jnp.asarray(np.tile(np.arange(8), (4, 3)))[:, :24]
  params = model.init(jax.random.PRNGKey(0), tokens[:, :-1])
  optimizer = optax.adam(1e-2)

  def loss_fn(p):
    logits = model.apply(p, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_config_mistakes_name_their_field():
  base = {"model": {"mixer": "gla", "d_model": 30, "attention": {"num_heads": 3}, "linear": {"num_heads": 4}}}
  with pytest.raises(ConfigError, match=r"config.model.linear.num_heads: 4 heads do not divide d_model=30"):
    from_config_dict(base)
  from_config_dict({"model": {"mixer": "attention", "d_model": 30, "attention": {"num_heads": 3},
                              "linear": {"num_heads": 4}}})  # unused section: no error
  with pytest.raises(ConfigError, match=r"config.model.linear.key_dim: retnet's rotary positions need an even"):
    from_config_dict({"model": {"mixer": "retnet", "d_model": 32, "linear": {"key_dim": 5}}})
  with pytest.raises(ConfigError, match=r"config.model.linear.mode: got 'fast'"):
    from_config_dict({"model": {"linear": {"mode": "fast"}}})
  with pytest.raises(ConfigError, match=r"config.model.linear.gate_rank: must be positive"):
    from_config_dict({"model": {"linear": {"gate_rank": 0}}})
  cfg = from_config_dict({"model": {"mixer": "retnet", "linear": {"key_dim": 8, "value_dim": 12}}}).model
  assert dataclasses.asdict(cfg.linear)["key_dim"] == 8 and cfg.linear.resolved_dims(cfg.d_model) == (8, 12)
