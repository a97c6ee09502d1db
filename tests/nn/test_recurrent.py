"""Linen recurrent layers and mixers: step == full sequence, bidirectional, init, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn import recurrent as rnn_nn
from seqjax.ops import recurrent as ops

B, T, I, H = 2, 6, 5, 4
KEY = jax.random.PRNGKey(0)


def jitted(module, method="__call__", **static):
  """A jitted `module.apply` (eager applies recompile every scan on every call)."""
  return jax.jit(lambda params, *args: module.apply(params, *args, method=method, **static))
X = jax.random.normal(jax.random.PRNGKey(1), (B, T, I))
LENGTHS = jnp.array([6, 4])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_step_by_step_equals_full_layer(cell):
  layer = rnn_nn.Recurrent(hidden=H, cell=cell, num_layers=2, chunk=4)
  params = jax.jit(layer.init)(KEY, X)
  ys, finals = jitted(layer)(params, X)
  state = layer.init_state(B)
  outs = []
  step = jitted(layer, "step")
  for t in range(T):
    y, state = step(params, X[:, t], state)
    outs.append(y)
  np.testing.assert_allclose(jnp.stack(outs, 1), ys, atol=1e-5)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(finals)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bidirectional_is_forward_and_reverse_op():
  concat = rnn_nn.LSTM(hidden=H, bidirectional=True, merge="concat")
  summed = rnn_nn.LSTM(hidden=H, bidirectional=True, merge="sum")
  params = jax.jit(concat.init)(KEY, X)  # both merges have the same parameters
  run = lambda m: jax.jit(lambda p, x, n: m.apply(p, x, lengths=n))(params, X, LENGTHS)
  (ys_cat, finals), (ys_sum, _) = run(concat), run(summed)
  assert ys_cat.shape == (B, T, 2 * H) and ys_sum.shape == (B, T, H)
  p = params["params"]
  w = lambda d: [p[d][k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
  z = jnp.zeros((B, H))
  yf, _ = jax.jit(lambda *a: ops.lstm(*a, lengths=LENGTHS))(X, z, z, *w("l0_fwd"))
  yb, _ = jax.jit(lambda *a: ops.lstm(*a, lengths=LENGTHS, reverse=True))(X, z, z, *w("l0_bwd"))
  np.testing.assert_allclose(ys_cat, jnp.concatenate([yf, yb], -1), atol=1e-6)
  np.testing.assert_allclose(ys_sum, yf + yb, atol=1e-6)
  # The reverse direction's final state is the one after each sequence's first step.
  np.testing.assert_allclose(finals[1][0], yb[:, 0], atol=1e-6)
  with pytest.raises(ValueError, match="bidirectional"):
    concat.apply(params, X[:, 0], concat.init_state(B), method="step")


def test_init_forget_bias_and_orthogonal_recurrent_blocks():
  params = rnn_nn.LSTM(hidden=H).init(KEY, X)["params"]["l0_fwd"]
  assert params["w_ih"].shape == (4 * H, I) and params["w_hh"].shape == (4 * H, H)
  np.testing.assert_array_equal(params["b_ih"], np.r_[np.zeros(H), np.ones(H), np.zeros(2 * H)])
  np.testing.assert_array_equal(params["b_hh"], 0.0)
  for g in range(4):
    block = params["w_hh"][g * H:(g + 1) * H]
    np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)


def test_dropout_only_between_layers_and_only_when_training():
  def run(layer, params, deterministic):
    fn = jax.jit(lambda p, x, r: layer.apply(p, x, deterministic=deterministic,
                                             rngs={"dropout": r}))
    return fn(params, X, jax.random.PRNGKey(3))[0]

  layer = rnn_nn.GRU(hidden=H, num_layers=2, dropout=0.5)
  params = jax.jit(layer.init)(KEY, X)
  evaluated = run(layer, params, True)
  assert not np.allclose(run(layer, params, False), evaluated)
  single = rnn_nn.GRU(hidden=H, num_layers=1, dropout=0.5)
  p1 = jax.jit(single.init)(KEY, X)
  # No dropout after the last layer.
  np.testing.assert_array_equal(run(single, p1, False), run(single, p1, True))


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
  params = jax.jit(mixer.init)(KEY, x)
  y = jitted(mixer)(params, x)
  assert y.shape == (B, T, d)
  state = mixer.init_state(B)
  outs = []
  step = jitted(mixer, "step")
  for t in range(T):
    y_t, state = step(params, x[:, t], state)
    outs.append(y_t)
  np.testing.assert_allclose(jnp.stack(outs, 1), y, atol=1e-5)


def test_mixer_packed_segments_equal_separate_documents():
  d = 6
  mixer = rnn_nn.LSTMMixer(d_model=d)
  x = jax.random.normal(KEY, (1, T, d))
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])  # two documents and one padding token
  params = jax.jit(mixer.init)(KEY, x)
  y = jax.jit(lambda p, x, s: mixer.apply(p, x, segment_ids=s))(params, x, seg)
  full = jitted(mixer)
  np.testing.assert_allclose(y[:, :3], full(params, x[:, :3]), atol=1e-6)
  np.testing.assert_allclose(y[:, 3:5], full(params, x[:, 3:5]), atol=1e-6)
  # Without segment ids the second document would see the first.
  assert not np.allclose(full(params, x)[:, 3:5], y[:, 3:5])
  with pytest.raises(ValueError, match="expects x"):
    mixer.apply(params, x[..., :5])
