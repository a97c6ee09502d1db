"""The Performer's feature-redraw hook (`seqjax.nn.linear_attention.set_feature_draw`,
`seqjax.ops.linear.feature_draw_key`): features redrawn every N steps, derived from (feature_seed, step // N).

- the LM's outputs stay fixed for steps inside one draw and change at every multiple of N (every layer's draw);
- the draw is reproducible from the step (the same step twice gives the same outputs, under jit with a traced
  step), and without redraws there is no "performer" collection;
- the draws are distinct random projections: FAVOR+ features of two draws differ, each still estimates softmax
  attention (the projection is a function of the key, tested in tests/ops/linear/test_numpy_oracle.py);
- bad use is a clear error.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import LinearAttentionConfig, ModelConfig
from seqjax.models.lm import DecoderLM
from seqjax.nn.linear_attention import set_feature_draw
from seqjax.ops import linear

EVERY = 3


def _model():
  cfg = ModelConfig(mixer="performer", d_model=16, num_layers=2, mlp_dim=32, vocab_size=13, max_len=32,
                    positions="none", linear=LinearAttentionConfig(num_heads=2, num_features=8, redraw_every=EVERY))
  return DecoderLM(cfg)


def test_outputs_change_at_each_redraw_and_stay_fixed_between():
  """Catches: a redraw every step (or never), a draw not derived from step // N, a layer left out of the redraw."""
  model = _model()
  tokens = jnp.arange(24).reshape(2, 12) % 13
  variables = model.init(jax.random.PRNGKey(0), tokens)
  assert set(variables) == {"params", "performer"}
  logits_at = jax.jit(lambda v, step: model.apply(set_feature_draw(v, step, EVERY), tokens))
  outs = [np.asarray(logits_at(variables, step)) for step in range(3 * EVERY)]
  for step in range(3 * EVERY):
    same_draw = outs[step - step % EVERY]
    np.testing.assert_array_equal(outs[step], same_draw, err_msg=f"step {step} differs inside its draw")
  for draw in range(1, 3):
    assert np.max(np.abs(outs[draw * EVERY] - outs[(draw - 1) * EVERY])) > 1e-3, f"draw {draw} changed nothing"
  np.testing.assert_array_equal(np.asarray(logits_at(variables, 4)), outs[4])  # reproducible from the step
  plain = DecoderLM(dataclasses.replace(model.cfg, linear=dataclasses.replace(model.cfg.linear, redraw_every=0)))
  assert set(jax.eval_shape(plain.init, jax.random.PRNGKey(0), tokens)) == {"params"}  # no redraw: no collection
  # every layer is redrawn: with only layer_1's draw advanced the outputs differ from both draws
  partial = jax.tree.map(lambda d: d, variables)
  partial["performer"] = {"layer_0": variables["performer"]["layer_0"],
                          "layer_1": jax.tree.map(lambda d: d + 1, variables["performer"]["layer_1"])}
  mixed = np.asarray(jax.jit(model.apply)(partial, tokens))
  assert np.max(np.abs(mixed - outs[0])) > 1e-3 and np.max(np.abs(mixed - outs[EVERY])) > 1e-3


def test_feature_draw_key_is_step_floor_divided():
  w = lambda step: linear.orthogonal_random_features(linear.feature_draw_key(5, step, 10), 8, 4)  # noqa: E731
  np.testing.assert_array_equal(w(0), w(9))
  np.testing.assert_array_equal(w(10), w(19))
  assert float(jnp.max(jnp.abs(w(10) - w(9)))) > 1e-2


def test_bad_use_is_a_clear_error():
  with pytest.raises(ValueError, match="every must be a positive number of steps"):
    linear.feature_draw_key(0, 1, 0)
  with pytest.raises(ValueError, match="every must be a positive number of steps"):
    set_feature_draw({"params": {}, "performer": {}}, 1, 0)
  with pytest.raises(ValueError, match="variables hold no 'performer' collection"):
    set_feature_draw({"params": {}}, 1, 10)
