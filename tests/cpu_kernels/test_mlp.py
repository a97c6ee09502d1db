"""The fused MLP CPU kernel (`seqjax.cpu_kernels.mlp`) equals the JAX MLP (forward and gradients); the linen Mlp
uses it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import cpu_kernels
from seqjax.cpu_kernels import mlp as cpu_mlp
from seqjax.nn.layers import Mlp
from seqjax.ops.dense.mlp import mlp, reference_mlp

pytestmark = pytest.mark.skipif(not cpu_kernels.available("mlp"), reason="the mlp CPU kernel is unavailable")


def _operands(B, T, D, F, seed=0):
  kx, k1, k2, kd = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kx, (B, T, D)), jax.random.normal(k1, (D, F)) / np.sqrt(D),
          jax.random.normal(k2, (F, D)) / np.sqrt(F), jax.random.normal(kd, (B, T, D)))


def _value_and_grads(fn, x, w1, w2, dy):
  def run(x, w1, w2):
    y, pullback = jax.vjp(fn, x, w1, w2)
    return (y, *pullback(dy))
  return jax.jit(run)(x, w1, w2)


@pytest.mark.parametrize("activation", sorted(cpu_mlp.ACTIVATIONS))
@pytest.mark.parametrize("B,T,D,F", [(2, 37, 32, 48), (1, 300, 64, 256)])
def test_kernel_equals_reference_forward_and_grads(activation, B, T, D, F):
  """Ragged row blocks (74 and 300 rows), several threads' weight-gradient accumulators, every activation."""
  x, w1, w2, dy = _operands(B, T, D, F)
  fn = lambda x, w1, w2: cpu_mlp.mlp(x, w1, w2, activation)  # noqa: E731
  assert "seqjax_mlp_fwd" in jax.jit(fn).lower(x, w1, w2).as_text()
  assert "seqjax_mlp_fwd" in jax.jit(lambda x, w1, w2: mlp(x, w1, w2, activation)).lower(x, w1, w2).as_text()
  got = _value_and_grads(fn, x, w1, w2, dy)
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(lambda x, w1, w2: reference_mlp(x, w1, w2, activation), x, w1, w2, dy)
  for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, want):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=1e-4, err_msg=name)


def test_binding_raises_where_it_does_not_apply():
  x, w1, w2, _ = _operands(2, 5, 24, 40)  # D = 24: not a multiple of 16
  with pytest.raises(ValueError, match="multiples of 16"):
    cpu_mlp.mlp(x, w1, w2)


def test_linen_mlp_keeps_its_parameters_and_uses_the_kernel():
  """Same parameter tree and values as the DenseGeneral layers it replaces; the kernel only without active dropout."""
  x = jax.random.normal(jax.random.key(3), (2, 8, 32))
  layer = Mlp(hidden=64, dropout=0.1)
  params = layer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, nn.meta.unbox(params)) == {
      "params": {"wi": {"kernel": (32, 64)}, "wo": {"kernel": (64, 32)}}}
  p = nn.meta.unbox(params)["params"]
  want = reference_mlp(x, p["wi"]["kernel"], p["wo"]["kernel"])
  np.testing.assert_allclose(layer.apply(params, x), want, rtol=2e-5, atol=2e-5)
  text = jax.jit(lambda v, x: layer.apply(v, x)).lower(params, x).as_text()
  assert "seqjax_mlp_fwd" in text
  train = jax.jit(lambda v, x: layer.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
  assert "seqjax_mlp_fwd" not in train.lower(params, x).as_text()  # dropout inside: the JAX path
