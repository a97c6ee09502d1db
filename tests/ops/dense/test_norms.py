"""LayerNorm: the native CPU kernel equals flax.linen.LayerNorm (forward and gradients); the LM's norm uses it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.nn.layers import make_norm
from seqjax.ops import native
from seqjax.ops.norms import layer_norm, reference_layer_norm

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: "
                                  f"{native.unavailable_reason()}")


def _operands(shape, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], shape) * 3.0 + 1.5  # a non-zero mean and a non-unit spread
  return x, jax.random.normal(ks[1], shape[-1:]), jax.random.normal(ks[2], shape[-1:]), jax.random.normal(ks[3], shape)


def _value_and_grads(fn, x, s, b, dy):
  return jax.jit(lambda x, s, b: (fn(x, s, b), *jax.grad(lambda x, s, b: jnp.sum(fn(x, s, b) * dy),
                                                          argnums=(0, 1, 2))(x, s, b)))(x, s, b)


@needs_native
@pytest.mark.parametrize("shape", [(2, 37, 32), (3, 700, 128)])  # one row block; several parts of the sums
def test_native_equals_flax_layernorm(shape):
  x, s, b, dy = _operands(shape)
  native_fn = lambda x, s, b: layer_norm(x, s, b, native=True)  # noqa: E731
  assert "seqjax_layer_norm_fwd" in jax.jit(native_fn).lower(x, s, b).as_text()
  flax_fn = lambda x, s, b: nn.LayerNorm().apply({"params": {"scale": s, "bias": b}}, x)  # noqa: E731
  for name, got, want in zip(("y", "dx", "dscale", "dbias"), _value_and_grads(native_fn, x, s, b, dy),
                             _value_and_grads(flax_fn, x, s, b, dy)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(want)))),
                               err_msg=name)


def test_fallbacks_and_errors():
  x, s, b, _ = _operands((2, 5, 24))  # D = 24: not a multiple of 16 -> JAX
  assert "seqjax_layer_norm" not in jax.jit(lambda x: layer_norm(x, s, b)).lower(x).as_text()
  np.testing.assert_allclose(layer_norm(x, s, b), reference_layer_norm(x, s, b), rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of 16"):
    layer_norm(x, s, b, native=True)
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
