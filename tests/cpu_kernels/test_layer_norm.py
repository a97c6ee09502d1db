"""The LayerNorm CPU kernel (`seqjax.cpu_kernels.layer_norm`) equals flax.linen.LayerNorm (forward and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import cpu_kernels
from seqjax.cpu_kernels import layer_norm as cpu_layer_norm
from seqjax.ops.dense.norms import layer_norm
from tests.ops.dense.test_norms import _operands

pytestmark = pytest.mark.skipif(not cpu_kernels.available("norm"), reason="the norm CPU kernel is unavailable")


def _value_and_grads(fn, x, s, b, dy):
  return jax.jit(lambda x, s, b: (fn(x, s, b), *jax.grad(lambda x, s, b: jnp.sum(fn(x, s, b) * dy),
                                                          argnums=(0, 1, 2))(x, s, b)))(x, s, b)


@pytest.mark.parametrize("shape", [(2, 37, 32), (3, 700, 128)])  # one row block; several parts of the sums
def test_kernel_equals_flax_layernorm(shape):
  x, s, b, dy = _operands(shape)
  native_fn = lambda x, s, b: cpu_layer_norm.layer_norm(x, s, b)  # noqa: E731
  assert "seqjax_layer_norm_fwd" in jax.jit(native_fn).lower(x, s, b).as_text()
  assert "seqjax_layer_norm_fwd" in jax.jit(lambda x: layer_norm(x, s, b)).lower(x).as_text()
  flax_fn = lambda x, s, b: nn.LayerNorm().apply({"params": {"scale": s, "bias": b}}, x)  # noqa: E731
  for name, got, want in zip(("y", "dx", "dscale", "dbias"), _value_and_grads(native_fn, x, s, b, dy),
                             _value_and_grads(flax_fn, x, s, b, dy)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(want)))),
                               err_msg=name)


def test_binding_raises_where_it_does_not_apply():
  x, s, b, _ = _operands((2, 5, 24))  # D = 24: not a multiple of 16
  with pytest.raises(ValueError, match="multiple of 16"):
    cpu_layer_norm.layer_norm(x, s, b)
