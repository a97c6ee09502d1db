"""The "based" mixer (seqjax.nn.based.Based) beyond the mixer contract and the conformance harness:

- the whole mixer against float64 NumPy from its own parameters: Taylor linear attention (1 + z + z^2 / 2,
  normalised, over the document so far) plus causal softmax attention over the last W keys of the document, summed;
- its decode state does not grow with the context (the window's ring buffer, the linear state);
- packed documents = each document alone; config mistakes name their field (a tiny LM trains with it:
  tests/nn/test_linear_attention.py::test_tiny_lm_trains).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import AttentionConfig, ConfigError, LinearAttentionConfig, ModelConfig, from_config_dict
from seqjax.nn.mixers import make_mixer

B, T, D, N, P, W = 2, 11, 16, 2, 3, 4


def _config(**kw):
  return ModelConfig(mixer="based", d_model=D, num_layers=1, mlp_dim=32, vocab_size=13, max_len=32,
                     positions="none", attention=AttentionConfig(num_heads=N),
                     linear=LinearAttentionConfig(num_heads=N, chunk=4, based_feature_dim=P, based_window=W), **kw)


def based_oracle(p, x, seg):
  """float64 NumPy: Taylor linear attention + sliding-window softmax attention (window W, the query's own key
  included), both within the document."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(p))
  x = np.asarray(x, np.float64)
  lin, att = p["linear"], p["window"]["attention"]
  b, t, _ = x.shape
  q, k = ((x @ lin[name]["kernel"]).reshape(b, t, N, P) for name in ("q_proj", "k_proj"))
  v = (x @ lin["v_proj"]["kernel"]).reshape(b, t, N, -1)
  qa, ka, va = (np.einsum("btd,dnh->btnh", x, att[name]["kernel"]) for name in ("query", "key", "value"))
  y_lin, y_att = np.zeros(v.shape), np.zeros(qa.shape)
  for bi in range(b):
    for ti in range(t):
      same = [s for s in range(ti + 1) if seg[bi, s] == seg[bi, ti]]
      recent = [s for s in same if ti - s < W]
      for n in range(N):
        z = np.array([q[bi, ti, n] @ k[bi, s, n] for s in same]) / np.sqrt(P)
        w = 1 + z + z ** 2 / 2
        y_lin[bi, ti, n] = (w[:, None] * v[bi, same, n]).sum(0) / (w.sum() + 1e-6)
        scores = np.array([qa[bi, ti, n] @ ka[bi, s, n] for s in recent]) / np.sqrt(qa.shape[-1])
        a = np.exp(scores - scores.max())
        y_att[bi, ti, n] = (a[:, None] * va[bi, recent, n]).sum(0) / a.sum()
  return (y_lin.reshape(b, t, -1) @ lin["out_proj"]["kernel"]
          + np.einsum("btnh,nhd->btd", y_att, att["out"]["kernel"]))


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_mixer_matches_numpy_taylor_plus_window_attention(mode):
  """Catches: a window of the wrong size (e.g. W + 1 keys) or none, the Taylor map's terms mis-scaled, the
  normaliser dropped, a branch missing from the sum, a document boundary crossed by either branch."""
  cfg = dataclasses.replace(_config(), linear=dataclasses.replace(_config().linear, mode=mode))
  mixer = make_mixer("based", cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  seg = np.array([[1] * 7 + [2] * 4, [1] * 11], np.int32)
  params = mixer.init(jax.random.PRNGKey(1), x)
  y = jax.jit(mixer.apply)(params, x, segment_ids=jnp.asarray(seg))
  expected = based_oracle(params["params"], x, seg)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_decode_state_is_constant_in_the_context():
  """The window's KV ring buffer has W slots and the linear state [N, 1 + P + P^2, H + 1], whatever max_len."""
  mixer = make_mixer("based", _config())
  for max_len in (16, 4096):
    state = mixer.init_state(B, max_len)
    assert state["window"].key.shape == (B, N, W, D // N)
    assert state["linear"]["kv"].shape == (B, N, 1 + P + P * P, D // N + 1)


def test_packed_documents_equal_each_document_alone():
  mixer = make_mixer("based", _config())
  x = jax.random.normal(jax.random.PRNGKey(2), (1, T, D))
  params = mixer.init(jax.random.PRNGKey(3), x)
  split = 5
  apply = jax.jit(mixer.apply)
  packed = apply(params, x, segment_ids=jnp.asarray([[1] * split + [2] * (T - split)]),
                 positions=jnp.asarray([list(range(split)) + list(range(T - split))]))
  alone = jnp.concatenate([apply(params, x[:, :split]), apply(params, x[:, split:])], axis=1)
  np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_config_mistakes_name_their_field():
  with pytest.raises(ConfigError, match=r"config.model.linear.based_window: must be positive"):
    from_config_dict({"model": {"mixer": "based", "linear": {"based_window": 0}}})
  with pytest.raises(ConfigError, match=r"config.model.linear.based_feature_dim: must be positive"):
    from_config_dict({"model": {"mixer": "based", "linear": {"based_feature_dim": 0}}})
