"""The Transformer encoder-decoder: cached decoding = the teacher-forced parallel forward, encoder padding and target
causality, a float64 NumPy forward of the published architecture, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import Seq2SeqConfig
from seqjax.models.seq2seq_transformer import Seq2SeqTransformer

SRC = np.asarray([[3, 4, 5, 6, 7], [7, 8, 9, 0, 0], [9, 0, 0, 0, 0]], np.int32)
SRC_LEN = np.asarray([5, 3, 1], np.int32)
TGT = np.asarray([[1, 5, 6, 7, 8, 9, 4], [1, 3, 4, 9, 10, 6, 5], [1, 6, 3, 3, 8, 7, 5]], np.int32)


def _cfg(**kw):
  base = dict(arch="transformer", src_vocab=11, tgt_vocab=11, hidden=16, num_heads=2, mlp_dim=24, encoder_layers=2,
              decoder_layers=2, max_len=12)
  return Seq2SeqConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def _model(seed=0, **kw):
  model = Seq2SeqTransformer(_cfg(**kw))
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), SRC, SRC_LEN, TGT)["params"]
  return model, params


@functools.lru_cache(maxsize=None)
def _jitted_forward(model):
  return jax.jit(lambda p, s, sl, t: model.apply({"params": p}, s, sl, t))


def _forward(model, params, src=SRC, src_len=SRC_LEN, tgt=TGT):
  return np.asarray(_jitted_forward(model)(params, src, src_len, tgt))


@pytest.mark.parametrize("norm_position, positions", [("pre", "sinusoidal"), ("post", "learned")])
def test_cached_decoding_equals_the_parallel_forward(norm_position, positions):
  """Prefill of a ragged target prefix (BOS alone for row 0) then one cached step per token = the teacher-forced
  forward. Catches: cross-attention keys/values recomputed wrongly or from the wrong rows in the step, a KV cache
  that is not appended to, a step position that does not advance (positions are added to the embeddings)."""
  model, params = _model(norm_position=norm_position, positions=positions)
  full_BTV = _forward(model, params)
  prefix_B = np.asarray([1, 3, 2], np.int32)
  apply = jax.jit(model.apply, static_argnames="method")
  logits_BTV, cache = apply({"params": params}, SRC, SRC_LEN, TGT[:, :3], tgt_lengths=prefix_B, method="prefill")
  for b in range(3):
    np.testing.assert_allclose(logits_BTV[b, :prefix_B[b]], full_BTV[b, :prefix_B[b]], atol=2e-5)
  # Step every row from its own prefix: row b feeds TGT[b, prefix_B[b] + i] at iteration i.
  for i in range(TGT.shape[1] - 3):
    tokens_B = TGT[np.arange(3), prefix_B + i]
    logits_BV, cache = apply({"params": params}, tokens_B, cache, method="step")
    np.testing.assert_allclose(logits_BV, full_BTV[np.arange(3), prefix_B + i], atol=2e-5)


def test_encoder_padding_changes_nothing_of_the_real_positions():
  """Other pad tokens and more padding columns after each source leave the logits unchanged. Catches: an encoder or
  cross-attention that sees padded source keys."""
  model, params = _model()
  base = _forward(model, params)
  noisy = SRC.copy()
  noisy[SRC == 0] = 5
  wider = np.concatenate([noisy, np.full((3, 3), 7, np.int32)], axis=1)
  np.testing.assert_allclose(_forward(model, params, src=wider), base, atol=2e-5)


def test_decoder_is_causal():
  """Changing target token t changes no logits before t. Catches a causal leak in the decoder's self-attention."""
  model, params = _model()
  base = _forward(model, params)
  for t in (2, 5):
    changed = TGT.copy()
    changed[:, t] = (changed[:, t] + 3) % 11
    out = _forward(model, params, tgt=changed)
    np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6)
    assert not np.allclose(out[:, t:], base[:, t:], atol=1e-4)


def _np_forward(p, src, src_len, tgt, cfg):
  """The published architecture in float64 NumPy (pre-norm, sinusoidal positions, ReLU MLP, tied read-out)."""
  f = lambda x: np.asarray(x, np.float64)  # noqa: E731
  d, n = cfg.hidden, cfg.num_heads
  emb = f(p["embed"]["embedding"])

  def positions(length):
    i = np.arange(d // 2)
    angle = np.arange(length)[:, None] / 10000.0 ** (2 * i / d)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)

  def norm(x, q):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * f(q["scale"]) + f(q["bias"])

  def attention(q_in, kv_in, q, visible):
    qh = np.einsum("td,dnh->nth", q_in, f(q["query"]["kernel"]))
    kh = np.einsum("sd,dnh->nsh", kv_in, f(q["key"]["kernel"]))
    vh = np.einsum("sd,dnh->nsh", kv_in, f(q["value"]["kernel"]))
    s = np.einsum("nth,nsh->nts", qh, kh) / np.sqrt(qh.shape[-1])
    s = np.where(visible[None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("nts,nsh,nhd->td", w, vh, f(q["out"]["kernel"]))

  def mlp(x, q):
    return np.maximum(x @ f(q["wi"]["kernel"]), 0) @ f(q["wo"]["kernel"])

  out = []
  for b in range(src.shape[0]):
    s_len, t_len = src.shape[1], tgt.shape[1]
    x = emb[src[b]] + positions(s_len)
    src_visible = np.broadcast_to(np.arange(s_len)[None] < src_len[b], (s_len, s_len))
    for i in range(cfg.encoder_layers):
      q = p[f"encoder_{i}"]
      x = x + attention(norm(x, q["norm_self_attention"]), norm(x, q["norm_self_attention"]), q["self_attention"],
                        src_visible)
      x = x + mlp(norm(x, q["norm_mlp"]), q["mlp"])
    memory = norm(x, p["encoder_norm"])
    y = emb[tgt[b]] + positions(t_len)
    causal = np.tril(np.ones((t_len, t_len), bool))
    cross_visible = np.broadcast_to(np.arange(s_len)[None] < src_len[b], (t_len, s_len))
    for i in range(cfg.decoder_layers):
      q = p[f"decoder_{i}"]
      h = norm(y, q["norm_self_attention"])
      y = y + attention(h, h, q["self_attention"], causal)
      y = y + attention(norm(y, q["norm_cross_attention"]), memory, q["cross_attention"], cross_visible)
      y = y + mlp(norm(y, q["norm_mlp"]), q["mlp"])
    out.append(norm(y, p["decoder_norm"]) @ emb.T / np.sqrt(d))
  return np.stack(out)


def test_forward_equals_a_float64_numpy_transformer():
  """The whole model against the architecture written from the paper in NumPy. Catches: a wrong mask (padding or
  causal), a missing residual or norm, an untied read-out, shifted positions."""
  model, params = _model()
  params = jax.tree.map(np.asarray, params)
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  plain = nn.unbox(params)
  expected = _np_forward(plain, SRC, SRC_LEN, TGT, model.cfg)
  np.testing.assert_allclose(_forward(model, params), expected, atol=1e-4, rtol=1e-4)


def test_errors():
  with pytest.raises(ValueError, match="src_vocab=11 and tgt_vocab=13 must be equal"):
    Seq2SeqTransformer(_cfg(tgt_vocab=13)).init(jax.random.PRNGKey(0), SRC, SRC_LEN, TGT)
  with pytest.raises(ValueError, match="exceeds seq2seq.max_len=6"):
    Seq2SeqTransformer(_cfg(max_len=6)).init(jax.random.PRNGKey(0), SRC, SRC_LEN, TGT)
  with pytest.raises(ValueError, match="need.* the vocabulary sizes"):
    Seq2SeqTransformer(_cfg(src_vocab=0)).init(jax.random.PRNGKey(0), SRC, SRC_LEN, TGT)
  # The model's mask arrays are not materialised for a cached cross-attention: kv= refuses an x_kv as well.
  with pytest.raises(ValueError, match="kv= holds precomputed"):
    from seqjax.nn.attention import MultiHeadAttention  # pylint: disable=import-outside-toplevel
    x = jnp.zeros((1, 2, 8))
    MultiHeadAttention(2).init(jax.random.PRNGKey(0), x, x, kv=(jnp.zeros((1, 3, 2, 4)),) * 2)
