"""The decoder LM: causality, packed documents stay separate, layer scan / remat equal the plain stack."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.models.lm import DecoderLM
from seqjax.nn.mixers import AttentionMixer
from tests.train.helpers import synthetic_batch, tiny_config


def _init(config, batch):
  model = DecoderLM(config.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"])
  return model, params


def _logits(model, params, batch):
  return model.apply({"params": params}, jnp.asarray(batch["inputs"]),
                     segment_ids=jnp.asarray(batch["segment_ids"]), positions=jnp.asarray(batch["positions"]))


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi", "none"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_causal_and_documents_separate(positions, norm_position):
  """Changing a token changes no logit before it, and nothing in another packed document."""
  config = tiny_config(model={"positions": positions, "norm_position": norm_position,
                              "norm": "rmsnorm" if norm_position == "post" else "layernorm"})
  batch = synthetic_batch(batch_size=2)
  model, params = _init(config, batch)
  base = _logits(model, params, batch)
  assert base.shape == (2, 16, 259) and base.dtype == jnp.float32
  changed = {k: v.copy() for k, v in batch.items()}
  changed["inputs"][:, 5] = (changed["inputs"][:, 5] + 1) % 259
  out = _logits(model, params, changed)
  np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(base[:, :5]))  # the past
  np.testing.assert_array_equal(np.asarray(out[:, 8:]), np.asarray(base[:, 8:]))  # the next document
  assert not np.allclose(out[:, 5:8], base[:, 5:8])


def test_mixer_gradient_does_not_cross_documents():
  """d y[t] / d x[s] is zero for s > t (causal) and for s in another document (packing)."""
  config = tiny_config()
  seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * 5])
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 32))
  mixer = AttentionMixer(config.model)
  params = mixer.init(jax.random.PRNGKey(0), x, segment_ids=seg)
  jac = jax.jacrev(lambda x: mixer.apply(params, x, segment_ids=seg))(x)  # [1,16,32,1,16,32]
  dep = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 5))  # [t, s]
  allowed = np.zeros((16, 16), bool)
  for t in range(16):
    for s in range(16):
      allowed[t, s] = s <= t and seg[0, t] == seg[0, s] and seg[0, t] != 0
  assert np.all(dep[~allowed] == 0.0)
  assert np.all(dep[allowed & (np.arange(16)[:, None] < 11)] > 0.0)


def _stack_scanned(params, num_layers):
  layers = [jax.tree.map(lambda x, i=i: x[i], params["layers"]) for i in range(num_layers)]
  out = {k: v for k, v in params.items() if k != "layers"}
  out.update({f"layer_{i}": p for i, p in enumerate(layers)})
  return out


def test_scan_and_remat_equal_plain_stack():
  batch = synthetic_batch(batch_size=2)
  plain = tiny_config()
  model, params = _init(plain, batch)
  ref = _logits(model, params, batch)
  scanned_model, scanned_params = _init(tiny_config(model={"scan_layers": True, "remat": "full"}), batch)
  assert scanned_params["layers"]["mlp"]["wi"]["kernel"].shape[0] == 2
  np.testing.assert_allclose(_logits(model, _stack_scanned(scanned_params, 2), batch),
                             _logits(scanned_model, scanned_params, batch), rtol=1e-5, atol=1e-5)
  remat_model = DecoderLM(tiny_config(model={"remat": "dots"}).model)
  np.testing.assert_allclose(_logits(remat_model, params, batch), ref, rtol=1e-6, atol=1e-6)
  g_ref = jax.grad(lambda p: _logits(model, p, batch).sum())(params)
  g_remat = jax.grad(lambda p: _logits(remat_model, p, batch).sum())(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_ref, g_remat)


def test_untied_gated_bf16_runs():
  config = tiny_config(model={"tie_embeddings": False, "mlp": "gated", "activation": "silu", "dtype": "bfloat16",
                              "attention": {"num_kv_heads": 1}})
  batch = synthetic_batch(batch_size=2)
  model, params = _init(config, batch)
  assert params["head"]["kernel"].dtype == jnp.float32
  logits = _logits(model, params, batch)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("mixer, mlp", [("lstm", "none"), ("gru", "mlp"), ("attention,lstm", "gated")])
def test_recurrent_and_hybrid_mixers_are_causal_and_packed(mixer, mlp):
  config = tiny_config(model={"mixer": mixer, "mlp": mlp, "num_layers": 2})
  batch = synthetic_batch(batch_size=2)
  model, params = _init(config, batch)
  base = _logits(model, params, batch)
  changed = {k: v.copy() for k, v in batch.items()}
  changed["inputs"][:, 3] = (changed["inputs"][:, 3] + 1) % 259
  out = _logits(model, params, changed)
  np.testing.assert_allclose(np.asarray(out[:, :3]), np.asarray(base[:, :3]), rtol=0, atol=0)
  np.testing.assert_allclose(np.asarray(out[:, 8:]), np.asarray(base[:, 8:]), rtol=0, atol=0)
  assert not np.allclose(out[:, 3:8], base[:, 3:8])


@pytest.mark.parametrize("mixer", ["mamba", "mamba2", "s4d", "s5", "mamba,attention"])
def test_ssm_and_hybrid_mixers_are_causal_and_packed(mixer):
  config = tiny_config(model={"mixer": mixer, "num_layers": 2, "ssm": {"head_dim": 16, "state": 8}})
  batch = synthetic_batch(batch_size=2)
  model, params = _init(config, batch)
  base = _logits(model, params, batch)
  changed = {k: v.copy() for k, v in batch.items()}
  changed["inputs"][:, 3] = (changed["inputs"][:, 3] + 1) % 259
  out = _logits(model, params, changed)
  np.testing.assert_allclose(np.asarray(out[:, :3]), np.asarray(base[:, :3]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out[:, 8:]), np.asarray(base[:, 8:]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(out[:, 3:8], base[:, 3:8])


def test_decoding_in_bfloat16_keeps_the_cache_dtypes():
  """Compute in bfloat16: KV cache and conv window in bfloat16, recurrent states in float32, one structure and dtype
  per leaf from `init_cache`, `prefill` and `step` (so one compiled step serves them all). Shapes only: nothing is
  compiled."""
  config = tiny_config(model={"mixer": "attention,mamba,gru", "num_layers": 3, "dtype": "bfloat16",
                              "ssm": {"state": 4, "head_dim": 16}})
  model = DecoderLM(config.model)
  tokens = jax.ShapeDtypeStruct((2, 9), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(1), tokens)
  logits, prefilled = jax.eval_shape(lambda v, t: model.apply(v, t, method="prefill"), variables, tokens)
  stepped_logits, stepped = jax.eval_shape(lambda v, c: model.apply(v, jnp.zeros((2,), jnp.int32), c, method="step"),
                                           variables, prefilled)
  layout = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
  assert layout(model.init_cache(2)) == layout(prefilled) == layout(stepped)
  assert logits.dtype == stepped_logits.dtype == jnp.float32 and stepped_logits.shape == (2, 259)
  attention, mamba, gru = prefilled["layers"]
  assert attention.key.dtype == attention.value.dtype == jnp.bfloat16 and mamba["conv"].dtype == jnp.bfloat16
  assert mamba["ssm"].dtype == gru[0].dtype == jnp.float32
