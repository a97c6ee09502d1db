"""LayerNorm: the JAX path where the CPU kernel does not apply, errors, and the linen norm's parameters and dtypes.

The CPU kernel against flax.linen.LayerNorm: tests/cpu_kernels/test_layer_norm.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.layers import make_norm
from seqjax.ops.dense.norms import layer_norm, reference_layer_norm


def _operands(shape, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], shape) * 3.0 + 1.5  # a non-zero mean and a non-unit spread
  return x, jax.random.normal(ks[1], shape[-1:]), jax.random.normal(ks[2], shape[-1:]), jax.random.normal(ks[3], shape)


def test_fallbacks_and_errors():
  x, s, b, _ = _operands((2, 5, 24))  # D = 24: not a multiple of 16 -> JAX
  assert "seqjax_layer_norm" not in jax.jit(lambda x: layer_norm(x, s, b)).lower(x).as_text()
  np.testing.assert_allclose(layer_norm(x, s, b), reference_layer_norm(x, s, b), rtol=1e-6)
  with pytest.raises(ValueError, match=r"\[D\]"):
    layer_norm(x, s[:3], b)


def test_make_norm_keeps_flax_parameters_and_bfloat16_output():
  x = jax.random.normal(jax.random.key(1), (2, 4, 32))
  layer = make_norm("layernorm", jnp.bfloat16, "norm")
  params = layer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, nn.meta.unbox(params)) == {"params": {"scale": (32,), "bias": (32,)}}
  out = layer.apply(params, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  want = nn.LayerNorm(dtype=jnp.bfloat16).apply(nn.meta.unbox(params), x.astype(jnp.bfloat16))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=2e-2)
