"""LSTM encoder-decoder with additive attention: teacher forcing, scheduled sampling, greedy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.config import Seq2SeqConfig
from seqjax.decode import seq2seq as seq2seq_decode
from seqjax.models import seq2seq_lstm as s2s
from seqjax.nn.additive_attention import AdditiveAttention

CFG = Seq2SeqConfig(src_vocab=13, tgt_vocab=11, embed_dim=8, hidden=16, attention_dim=12,
                        decoder_layers=2)
SRC = jnp.array([[3, 4, 5, 6], [7, 8, 0, 0], [9, 0, 0, 0]])
SRC_LEN = jnp.array([4, 2, 1])
TGT_IN = jnp.array([[1, 5, 6, 7, 8], [1, 3, 4, 9, 0], [1, 6, 0, 0, 0]])
TGT_OUT = jnp.array([[5, 6, 7, 8, 2], [3, 4, 9, 2, 0], [6, 2, 0, 0, 0]])
TGT_LEN = jnp.array([5, 4, 2])


@pytest.fixture(scope="module")
def model_and_params():
  model = s2s.Seq2SeqLSTM(CFG)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), SRC, SRC_LEN, TGT_IN)


def forced_logits(model, params, src=SRC):
  return jax.jit(model.apply)(params, src, SRC_LEN, TGT_IN)


def test_scheduled_sampling_at_probability_one_is_teacher_forcing(model_and_params):
  model, params = model_and_params
  forced = forced_logits(model, params)
  # p = 1 given as a traced scalar with an rng still takes the gold token at every step.
  apply = jax.jit(lambda p, rng: model.apply(params, SRC, SRC_LEN, TGT_IN, teacher_forcing_prob=p,
                                             sampling_rng=rng))
  # (Same inputs at every step; only XLA fusion differences between the two programs remain.)
  np.testing.assert_allclose(apply(jnp.float32(1.0), jax.random.PRNGKey(5)), forced, atol=1e-6)
  assert np.all(jax.jit(s2s.scheduled_sampling_mask, static_argnums=1)(
      jax.random.PRNGKey(5), (64, 64), jnp.float32(1.0)))
  # p < 1 does change the inputs (and so the logits) somewhere.
  mixed = apply(jnp.float32(0.3), jax.random.PRNGKey(5))
  assert not np.allclose(mixed, forced)
  np.testing.assert_allclose(mixed[:, 0], forced[:, 0], atol=1e-6)  # BOS step is always gold


def test_teacher_forcing_prob_zero_is_greedy_decoding(model_and_params):
  model, params = model_and_params
  free = jax.jit(lambda p: model.apply(p, SRC, SRC_LEN, TGT_IN, teacher_forcing_prob=0.0,
                                       sampling_rng=jax.random.PRNGKey(0)))(params)
  out = seq2seq_decode.decode(model, params["params"], SRC, SRC_LEN, max_new_tokens=5, bos_id=1, eos_id=2)
  tokens, lengths = out.tokens, out.lengths
  expected, expected_len = s2s.stop_at_eos(jnp.argmax(free, -1), eos_id=2)
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_array_equal(lengths, expected_len)


def test_scheduled_sampling_mask_statistics():
  mask = s2s.scheduled_sampling_mask(jax.random.PRNGKey(0), (64, 200), 0.25)
  assert np.all(mask[:, 0])
  assert abs(float(mask[:, 1:].mean()) - 0.25) < 0.02
  with pytest.raises(ValueError, match="sampling_rng"):
    s2s.scheduled_sampling_mask(None, (2, 3), 0.5)
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    s2s.scheduled_sampling_mask(None, (2, 3), 1.5)


def test_padded_source_positions_are_ignored(model_and_params):
  model, params = model_and_params
  junk = SRC.at[1, 2:].set(12).at[2, 1:].set(11)
  np.testing.assert_allclose(forced_logits(model, params, junk), forced_logits(model, params),
                             atol=1e-6)


def test_stop_at_eos():
  tokens, lengths = s2s.stop_at_eos(jnp.array([[5, 2, 7, 2], [5, 6, 7, 8], [2, 3, 3, 3]]), 2)
  np.testing.assert_array_equal(tokens, [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
  np.testing.assert_array_equal(lengths, [2, 4, 1])


def test_loss_ignores_padding(model_and_params):
  model, params = model_and_params
  logits = forced_logits(model, params)
  loss, metrics = s2s.seq2seq_loss(logits, TGT_OUT, TGT_LEN)
  loss_junk, _ = s2s.seq2seq_loss(logits, TGT_OUT.at[2, 3:].set(7), TGT_LEN)
  assert float(loss) == pytest.approx(float(loss_junk))
  assert 0.0 <= float(metrics["token_accuracy"]) <= 1.0


def test_training_with_scheduled_sampling_reduces_loss():
  cfg = Seq2SeqConfig(src_vocab=13, tgt_vocab=11, embed_dim=8, hidden=16, attention_dim=8,
                          bidirectional_encoder=False)
  model = s2s.Seq2SeqLSTM(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), SRC, SRC_LEN, TGT_IN)

  opt = optax.adam(2e-2)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      logits = model.apply(p, SRC, SRC_LEN, TGT_IN, teacher_forcing_prob=0.9, sampling_rng=rng)
      return s2s.seq2seq_loss(logits, TGT_OUT, TGT_LEN)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  losses = []
  for i in range(25):
    params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert losses[-1] < 0.3 * losses[0]


def test_additive_attention_masking_and_weights():
  attn = AdditiveAttention(features=6)
  memory = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4))
  query = jax.random.normal(jax.random.PRNGKey(2), (2, 3))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  params = attn.init(jax.random.PRNGKey(0), query, memory, None, mask)
  context, weights = attn.apply(params, query, memory, None, mask)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(weights[0, 3:], 0.0)
  np.testing.assert_allclose(context, jnp.einsum("bs,bse->be", weights, memory), atol=1e-6)
  # Reference score: v . tanh(W_q q + W_k m + b).
  p = params["params"]
  scores = jnp.tanh((query @ p["query"]["kernel"])[:, None, :] + memory @ p["key"]["kernel"]
                    + p["key"]["bias"]) @ p["v"]
  np.testing.assert_allclose(weights[1], jax.nn.softmax(scores[1]), atol=1e-6)
  keys = attn.apply(params, memory, method="keys")
  np.testing.assert_allclose(attn.apply(params, query, memory, keys, mask)[0], context, atol=1e-6)
  with pytest.raises(ValueError, match="mask must be"):
    attn.apply(params, query, memory, None, mask[:, :4])
