"""MultiHeadAttention: parameters and logical axes, math against the kernel, GQA, cross-attention, KV cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.attention import MultiHeadAttention
from seqjax.ops import attention
from seqjax.ops.attention import masks, positions

D = 16


def _x(B=2, T=7, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


def test_params_names_shapes_and_logical_axes():
  mod = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, use_bias=True)
  variables = mod.init(jax.random.key(0), _x())
  params = variables["params"]
  assert set(params) == {"query", "key", "value", "out", "query_norm", "key_norm"}
  assert params["query"]["kernel"].names == ("embed", "heads", "head_dim")
  assert params["key"]["kernel"].names == ("embed", "kv", "head_dim")
  assert params["out"]["kernel"].names == ("heads", "head_dim", "embed")
  assert params["query"]["bias"].names == ("heads", "head_dim")
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(params))
  assert shapes["query"]["kernel"] == (D, 4, 8) and shapes["value"]["kernel"] == (D, 2, 8)
  assert shapes["out"]["kernel"] == (4, 8, D)


def test_forward_equals_projections_plus_kernel():
  mod = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, implementation="reference", rope=True)
  x = _x()
  params = nn.meta.unbox(mod.init(jax.random.key(0), x)["params"])
  q = jnp.einsum("btd,dnh->btnh", x, params["query"]["kernel"])
  k = jnp.einsum("btd,dnh->btnh", x, params["key"]["kernel"])
  v = jnp.einsum("btd,dnh->btnh", x, params["value"]["kernel"])
  pos = jnp.arange(7)[None]
  q, k = positions.apply_rope(q, pos), positions.apply_rope(k, pos)
  out = attention.reference_attention(q, k, v, causal=True)
  want = jnp.einsum("btnh,nhd->btd", out, params["out"]["kernel"])
  got = mod.apply({"params": params}, x, mask=masks.Causal())
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cross_attention_shapes_and_out_features():
  mod = MultiHeadAttention(num_heads=2, num_kv_heads=1, head_dim=4, implementation="reference", out_features=5)
  x_q, x_kv = _x(T=3), jax.random.normal(jax.random.key(1), (2, 9, 12))
  variables = mod.init(jax.random.key(0), x_q, x_kv)
  assert mod.apply(variables, x_q, x_kv).shape == (2, 3, 5)


def test_causal_by_gradients_through_module():
  mod = MultiHeadAttention(num_heads=2, head_dim=8, implementation="reference", alibi=True)
  x = _x(B=1, T=6)
  variables = mod.init(jax.random.key(0), x)
  t = 3
  grad = jax.jit(jax.grad(lambda x: mod.apply(variables, x, mask=masks.Causal())[0, t].sum()))(x)
  assert np.abs(np.asarray(grad[0, t + 1:])).max() == 0.0
  assert np.abs(np.asarray(grad[0, :t + 1])).max() > 0.0


@pytest.mark.parametrize("implementation,rope,alibi", [("blockwise", True, False), ("reference", False, True)])
def test_prefill_then_decode_equals_full_forward(implementation, rope, alibi):
  if implementation not in attention.available_attentions():
    pytest.skip(f"{implementation} not registered")
  T, prefill = 9, 4
  mod = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, implementation=implementation, rope=rope,
                           alibi=alibi, qk_norm=True)
  x = _x(T=T)
  params = mod.init(jax.random.key(0), x)["params"]
  full = mod.apply({"params": params}, x, mask=masks.Causal())

  decoder = mod.clone(decode=True)
  cache = decoder.init(jax.random.key(0), x)["cache"]  # sizes the cache to T
  assert cache["cached_key"].shape == (2, T, 2, 8)

  @jax.jit
  def step(cache, x_chunk):
    out, updated = decoder.apply({"params": params, "cache": cache}, x_chunk, mask=masks.Causal(),
                                 mutable=["cache"])
    return out, updated["cache"]

  outs = []
  out, cache = step(cache, x[:, :prefill])
  outs.append(out)
  for t in range(prefill, T):
    out, cache = step(cache, x[:, t:t + 1])
    outs.append(out)
  assert int(cache["cache_index"]) == T
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)


def test_bad_configuration_raises():
  x = _x()
  with pytest.raises(ValueError, match="multiple"):
    MultiHeadAttention(num_heads=4, num_kv_heads=3, head_dim=8).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown attention"):
    MultiHeadAttention(num_heads=4, head_dim=8, implementation="nope").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="even"):
    MultiHeadAttention(num_heads=4, head_dim=5, rope=True).init(jax.random.key(0), x)
