"""Linen recurrent layers and mixers: step == full sequence, bidirectional, init, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn import recurrent as rnn_nn
from seqjax.ops import recurrent as ops

B, T, I, H = 2, 6, 5, 4
KEY = jax.random.PRNGKey(0)
X = jax.random.normal(jax.random.PRNGKey(1), (B, T, I))
LENGTHS = jnp.array([6, 4])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_step_by_step_equals_full_layer(cell):
  layer = rnn_nn.Recurrent(hidden=H, cell=cell, num_layers=2, chunk=4)
  params = layer.init(KEY, X)
  ys, finals = layer.apply(params, X)
  state = layer.init_state(B)
  outs = []
  for t in range(T):
    y, state = layer.apply(params, X[:, t], state, method="step")
    outs.append(y)
  np.testing.assert_allclose(jnp.stack(outs, 1), ys, atol=1e-5)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(finals)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("merge", ["concat", "sum"])
def test_bidirectional_is_forward_and_reverse_op(merge):
  layer = rnn_nn.LSTM(hidden=H, bidirectional=True, merge=merge)
  params = layer.init(KEY, X)
  ys, finals = layer.apply(params, X, lengths=LENGTHS)
  assert ys.shape == (B, T, 2 * H if merge == "concat" else H)
  p = params["params"]
  w = lambda d: [p[d][k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
  z = jnp.zeros((B, H))
  yf, _ = ops.lstm(X, z, z, *w("l0_fwd"), lengths=LENGTHS)
  yb, (hb, _) = ops.lstm(X, z, z, *w("l0_bwd"), lengths=LENGTHS, reverse=True)
  expected = jnp.concatenate([yf, yb], -1) if merge == "concat" else yf + yb
  np.testing.assert_allclose(ys, expected, atol=1e-6)
  # The reverse direction's final state is the one after each sequence's first step.
  np.testing.assert_allclose(finals[1][0], yb[:, 0], atol=1e-6)
  with pytest.raises(ValueError, match="bidirectional"):
    layer.apply(params, X[:, 0], layer.init_state(B), method="step")


def test_init_forget_bias_and_orthogonal_recurrent_blocks():
  params = rnn_nn.LSTM(hidden=H).init(KEY, X)["params"]["l0_fwd"]
  assert params["w_ih"].shape == (4 * H, I) and params["w_hh"].shape == (4 * H, H)
  np.testing.assert_array_equal(params["b_ih"], np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])
  np.testing.assert_array_equal(params["b_hh"], 0.0)
  for g in range(4):
    block = params["w_hh"][g * H:(g + 1) * H]
    np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)


def test_dropout_only_between_layers_and_only_when_training():
  layer = rnn_nn.GRU(hidden=H, num_layers=2, dropout=0.5)
  params = layer.init(KEY, X)
  eval_a, _ = layer.apply(params, X)
  eval_b, _ = layer.apply(params, X, deterministic=True)
  np.testing.assert_array_equal(eval_a, eval_b)
  train, _ = layer.apply(params, X, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(train, eval_a)
  single = rnn_nn.GRU(hidden=H, num_layers=1, dropout=0.5)
  p1 = single.init(KEY, X)
  a, _ = single.apply(p1, X, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(a, single.apply(p1, X)[0])  # no dropout after the last layer


def test_bad_options_raise():
  with pytest.raises(ValueError, match="merge"):
    rnn_nn.LSTM(hidden=H, bidirectional=True, merge="mean").init(KEY, X)
  with pytest.raises(ValueError, match="cell"):
    rnn_nn.Recurrent(hidden=H, cell="transformer").init(KEY, X)


@pytest.mark.parametrize("mixer_cls", [rnn_nn.LSTMMixer, rnn_nn.GRUMixer, rnn_nn.RNNMixer])
def test_mixer_step_equals_full_forward(mixer_cls):
  d = 6
  mixer = mixer_cls(d_model=d, hidden=5)
  x = jax.random.normal(KEY, (B, T, d))
  params = mixer.init(KEY, x)
  y = mixer.apply(params, x)
  assert y.shape == (B, T, d)
  state = mixer.init_state(B)
  outs = []
  for t in range(T):
    y_t, state = mixer.apply(params, x[:, t], state, method="step")
    outs.append(y_t)
  np.testing.assert_allclose(jnp.stack(outs, 1), y, atol=1e-5)


def test_mixer_packed_segments_equal_separate_documents():
  d = 6
  mixer = rnn_nn.LSTMMixer(d_model=d)
  x = jax.random.normal(KEY, (1, T, d))
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])  # two documents and one padding token
  params = mixer.init(KEY, x)
  y = mixer.apply(params, x, segment_ids=seg)
  np.testing.assert_allclose(y[:, :3], mixer.apply(params, x[:, :3]), atol=1e-6)
  np.testing.assert_allclose(y[:, 3:5], mixer.apply(params, x[:, 3:5]), atol=1e-6)
  # Without segment ids the second document would see the first.
  assert not np.allclose(mixer.apply(params, x)[:, 3:5], y[:, 3:5])
  with pytest.raises(ValueError, match="expects x"):
    mixer.apply(params, x[..., :5])
