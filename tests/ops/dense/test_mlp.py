"""The MLP op: validation, the JAX path where the CPU kernel does not apply, activations equal to Flax's.

The fused CPU kernel against this JAX code, and the linen Mlp's use of it: tests/cpu_kernels/test_mlp.py.
"""

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import backend
from seqjax.ops.dense.mlp import ACTIVATIONS, mlp, reference_mlp


def _operands(B, T, D, F, seed=0):
  kx, k1, k2, kd = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kx, (B, T, D)), jax.random.normal(k1, (D, F)) / np.sqrt(D),
          jax.random.normal(k2, (F, D)) / np.sqrt(F), jax.random.normal(kd, (B, T, D)))


def test_falls_back_and_validates():
  x, w1, w2, _ = _operands(2, 5, 24, 40)  # D = 24: not a multiple of 16
  assert "seqjax_mlp" not in jax.jit(lambda x, w1, w2: mlp(x, w1, w2)).lower(x, w1, w2).as_text()
  np.testing.assert_allclose(mlp(x, w1, w2), reference_mlp(x, w1, w2), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown activation"):
    mlp(x, w1, w2, "tanh")
  with pytest.raises(ValueError, match="W2"):
    mlp(x, w1, w1)


def test_cpu_kernels_off_runs_the_jax_code():
  x, w1, w2, _ = _operands(2, 5, 32, 48)
  with backend.cpu_kernels_mode("off"):
    text = jax.jit(lambda x, w1, w2: mlp(x, w1, w2)).lower(x, w1, w2).as_text()
  assert "seqjax_mlp" not in text and "seqjax_dense" not in text


class ActivationsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("gelu", "gelu", nn.gelu), ("relu", "relu", nn.relu), ("silu", "silu", nn.silu))
  def test_activations_equal_flax_linen(self, name, flax_fn):
    """The activations are jax.nn's (no Flax in seqjax.ops) and equal flax.linen's bit for bit, jitted or not."""
    x = jax.random.normal(jax.random.key(0), (4, 257)) * 4.0
    value_and_grad = lambda f: self.variant(lambda x: (f(x), jax.grad(lambda x: f(x).sum())(x)))(x)  # noqa: E731
    chex.assert_trees_all_equal(value_and_grad(ACTIVATIONS[name]), value_and_grad(flax_fn))
