"""MultiHeadAttention: parameters and logical axes, math against the kernel, GQA, cross-attention, KV cache
(full and ring buffer)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.attention import KVCache, MultiHeadAttention
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


@pytest.mark.parametrize("implementation,rope,alibi,window", [("blockwise", True, False, 0),
                                                             ("reference", False, True, 0),
                                                             ("reference", True, True, 3)])
def test_prefill_then_cached_steps_equal_full_forward(implementation, rope, alibi, window):
  """return_kv + KVCache.from_sequence + one cached step per token = the full forward; a cache of `window` slots
  (a ring buffer, smaller than the sequence) = the sliding-window forward."""
  if implementation not in attention.available_attentions():
    pytest.skip(f"{implementation} not registered")
  T, prefill = 9, 4
  mod = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, implementation=implementation, rope=rope,
                           alibi=alibi, qk_norm=True)
  mask = masks.SlidingWindow(window - 1, 0) if window else masks.Causal()
  x = _x(T=T)
  params = mod.init(jax.random.key(0), x)["params"]
  full = mod.apply({"params": params}, x, mask=mask)

  out, (k, v) = mod.apply({"params": params}, x[:, :prefill], mask=mask, return_kv=True)
  lengths = jnp.full((2,), prefill, jnp.int32)
  cache = KVCache.from_sequence(k, v, lengths, lengths, size=window or T)
  assert cache.key.shape == (2, 2, window or T, 8)
  step = jax.jit(lambda cache, x_t: mod.apply({"params": params}, x_t, cache=cache))
  outs = [out]
  for t in range(prefill, T):
    out, cache = step(cache, x[:, t:t + 1])
    outs.append(out)
  np.testing.assert_array_equal(cache.index, [T, T])
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)


def test_kv_cache_ring_slots():
  k = jnp.arange(1, 6, dtype=jnp.float32).reshape(1, 5, 1, 1) * jnp.ones((2, 1, 1, 1))
  cache = KVCache.from_sequence(k, k, jnp.asarray([5, 2]), jnp.asarray([5, 2]), size=3)
  # Row 0 saw tokens 1..5: token a sits in slot a % 3 (numbering from 0); row 1 saw two tokens, slot 2 is empty.
  np.testing.assert_array_equal(cache.key[:, 0, :, 0], [[4, 5, 3], [1, 2, 0]])
  cache = cache.append(jnp.full((2, 1, 1), 9.0), jnp.full((2, 1, 1), 9.0))
  np.testing.assert_array_equal(cache.key[:, 0, :, 0], [[4, 5, 9], [1, 2, 9]])
  np.testing.assert_array_equal(cache.index, [6, 3])


def test_cache_misuse_raises():
  mod = MultiHeadAttention(num_heads=2, head_dim=4, implementation="reference")
  x = _x(T=3)
  variables = mod.init(jax.random.key(0), x)
  cache = KVCache.empty(2, 4, 2, 4, jnp.float32)
  # Several tokens with a cache are an extension (tests/nn/test_extend.py): their keys and values come back
  # uncommitted, the cache is not returned.
  out, (k_new, v_new) = mod.apply(variables, x, cache=cache)
  assert out.shape == x.shape and k_new.shape == v_new.shape == (2, 3, 2, 4)
  with pytest.raises(ValueError, match="self-attention"):
    mod.apply(variables, x[:, :1], x, cache=cache)


def test_bad_configuration_raises():
  x = _x()
  with pytest.raises(ValueError, match="multiple"):
    MultiHeadAttention(num_heads=4, num_kv_heads=3, head_dim=8).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown attention"):
    MultiHeadAttention(num_heads=4, head_dim=8, implementation="nope").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="even"):
    MultiHeadAttention(num_heads=4, head_dim=5, rope=True).init(jax.random.key(0), x)
