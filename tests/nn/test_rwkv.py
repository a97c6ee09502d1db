"""The "rwkv" mixer (seqjax.nn.rwkv.Rwkv6) beyond the mixer contract and the conformance harness:

- the whole block against a float64 NumPy forward of RWKV-6 written from the paper (token shift, ddlerp LoRA,
  data-dependent decay, the bonus, per-head GroupNorm, the SiLU gate; channel mix with squared ReLU and the
  receptance gate; LN and residuals), from the module's own parameters, with and without the channel mix;
- packed documents = each document alone (token shifts and the wkv state do not cross);
- in the LM, the mixer owns the block with the channel mix (no MLP parameters) and not without (a tiny LM trains:
  tests/nn/test_linear_attention.py::test_tiny_lm_trains);
- config mistakes name their field.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import ConfigError, LinearAttentionConfig, ModelConfig, from_config_dict
from seqjax.models.lm import DecoderLM
from seqjax.nn.mixers import make_mixer

B, T, D, NH = 2, 11, 16, 2


def _config(channel_mix=True, **kw):
  return ModelConfig(mixer="rwkv", d_model=D, num_layers=2, mlp_dim=24, vocab_size=13, max_len=32,
                     positions="none", linear=LinearAttentionConfig(num_heads=NH, chunk=4,
                                                                    rwkv_channel_mix=channel_mix), **kw)


def _randomised(params, seed):
  """Every parameter drawn at random (the zero-initialised LoRA factors would hide their terms)."""
  leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def rwkv6_block_oracle(p, x, channel_mix):
  """RWKV-6 in float64 NumPy, one sequence per row, no state carried in: returns y [B, T, D]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
  shift = lambda z: np.concatenate([np.zeros_like(z[:, :1]), z[:, :-1]], axis=1)  # noqa: E731
  dense = lambda z, name: z @ p[name]["kernel"]  # noqa: E731
  a = _layer_norm(x, p["ln_time"]["scale"], p["ln_time"]["bias"]) if channel_mix else x
  dx = shift(a) - a
  xx = a + dx * p["mu_x"]
  rank = p["mix_b"].shape[1]
  lora = np.tanh(xx @ p["mix_a"])
  mixed = [a + dx * (p["mu"][i] + lora[..., i * rank:(i + 1) * rank] @ p["mix_b"][i]) for i in range(5)]
  x_w, x_k, x_v, x_r, x_g = mixed
  r, k, v = dense(x_r, "r_proj"), dense(x_k, "k_proj"), dense(x_v, "v_proj")
  gate = dense(x_g, "g_proj") * sig(dense(x_g, "g_proj"))
  w = np.exp(-np.exp(p["w0"] + np.tanh(x_w @ p["decay_a"]) @ p["decay_b"]))
  b, t, _ = x.shape
  hk, hv = r.shape[-1] // NH, v.shape[-1] // NH
  r, k, w = (z.reshape(b, t, NH, hk) for z in (r, k, w))
  v = v.reshape(b, t, NH, hv)
  y = np.zeros((b, t, NH, hv))
  for bi in range(b):
    for n in range(NH):
      s = np.zeros((hk, hv))
      for ti in range(t):
        kv = np.outer(k[bi, ti, n], v[bi, ti, n])
        y[bi, ti, n] = r[bi, ti, n] @ (s + p["bonus"][n][:, None] * kv)
        s = w[bi, ti, n][:, None] * s + kv
  y = y - y.mean(-1, keepdims=True)
  y = y / np.sqrt((y ** 2).mean(-1, keepdims=True) + 64e-5)
  y = y.reshape(b, t, NH * hv) * p["norm_scale"] + p["norm_bias"]
  out = dense(y * gate, "out_proj")
  if not channel_mix:
    return out
  h = x + out
  c = _layer_norm(h, p["ln_channel"]["scale"], p["ln_channel"]["bias"])
  dc = shift(c) - c
  hidden = np.maximum(dense(c + dc * p["cmu_k"], "ck_proj"), 0.0) ** 2
  return h + sig(dense(c + dc * p["cmu_r"], "cr_proj")) * dense(hidden, "cv_proj")


@pytest.mark.parametrize("channel_mix", [True, False], ids=["block", "time_mix"])
def test_block_matches_a_numpy_rwkv6(channel_mix):
  """Catches: a ddlerp target mixed from the wrong LoRA slice, the decay without its double exponential, the bonus
  or the gate missing, the GroupNorm over the wrong axis, the channel mix's ReLU not squared or its receptance
  reading the wrong shift, a residual missing."""
  cfg = _config(channel_mix)
  mixer = make_mixer("rwkv", cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  params = _randomised(mixer.init(jax.random.PRNGKey(1), x), 2)
  y = jax.jit(mixer.apply)(params, x)
  expected = rwkv6_block_oracle(params["params"], x, channel_mix)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


def test_packed_documents_equal_each_document_alone():
  """Catches: a token shift (time or channel mix) or the wkv state crossing a document boundary."""
  mixer = make_mixer("rwkv", _config())
  x = jax.random.normal(jax.random.PRNGKey(3), (1, T, D))
  params = _randomised(mixer.init(jax.random.PRNGKey(4), x), 5)
  split = 4
  apply = jax.jit(mixer.apply)
  packed = apply(params, x, segment_ids=jnp.asarray([[1] * split + [2] * (T - split)]))
  alone = jnp.concatenate([apply(params, x[:, :split]), apply(params, x[:, split:])], axis=1)
  np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


def test_in_the_lm_the_channel_mix_replaces_the_mlp():
  """With the channel mix the LM's blocks hold no MLP or block norms (the mixer is the RWKV block); without it the
  ordinary block's are there. (A tiny LM trains with it: tests/nn/test_linear_attention.py::test_tiny_lm_trains.)"""
  tokens = jnp.zeros((2, 8), jnp.int32)
  shapes = {cm: jax.eval_shape(DecoderLM(dataclasses.replace(_config(cm), num_layers=1)).init,
                               jax.random.PRNGKey(0), tokens)["params"]["layer_0"] for cm in (True, False)}
  assert set(shapes[True]) == {"Rwkv6_0"} and "ck_proj" in shapes[True]["Rwkv6_0"]
  assert "mlp" in shapes[False] and "ck_proj" not in shapes[False]["Rwkv6_0"]


def test_config_mistakes_name_their_field():
  with pytest.raises(ConfigError, match=r"config.model.norm_position: rwkv with model.linear.rwkv_channel_mix"):
    from_config_dict({"model": {"mixer": "rwkv", "norm_position": "post"}})
  from_config_dict({"model": {"mixer": "rwkv", "norm_position": "post", "linear": {"rwkv_channel_mix": False}}})
  with pytest.raises(ConfigError, match=r"config.model.linear.rwkv_mix_rank: must be positive"):
    from_config_dict({"model": {"mixer": "rwkv", "linear": {"rwkv_mix_rank": 0}}})
