"""flat_dot_general equals lax.dot_general (forward and gradients) and is used where it applies; its CPU kernel is
tested in tests/cpu_kernels/test_dense.py."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops.dense.dot import flat_dot_general, matmul


class FlatDotGeneralTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      ((2, 5, 8), (8, 3), (((2,), (0,)), ((), ()))),  # Dense
      ((2, 5, 8), (8, 4, 6), (((2,), (0,)), ((), ()))),  # DenseGeneral to heads
      ((2, 5, 4, 6), (4, 6, 8), (((2, 3), (0, 1)), ((), ()))),  # heads back to width
      ((2, 5, 8), (3, 8), (((2,), (1,)), ((), ()))),  # not leading on the kernel: falls through
      ((4, 5, 8), (4, 8, 3), (((2,), (1,)), ((0,), (0,)))),  # batched: falls through
  )
  def test_equals_dot_general_forward_and_grad(self, lhs_shape, rhs_shape, dims):
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x, w = jax.random.normal(kx, lhs_shape), jax.random.normal(ky, rhs_shape)

    def value_and_grads(dot):
      def f(x, w):
        return jnp.sum(jnp.sin(dot(x, w, dims)))
      return dot(x, w, dims), jax.grad(f, argnums=(0, 1))(x, w)

    ours = self.variant(lambda x, w: value_and_grads(lambda x, w, d: flat_dot_general(x, w, d)))(x, w)
    ref = value_and_grads(jax.lax.dot_general)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, ref)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_flattens_to_one_rank_2_matmul():
  x, w = jnp.ones((2, 5, 8)), jnp.ones((8, 4, 6))
  hlo = jax.jit(lambda x, w: flat_dot_general(x, w, (((2,), (0,)), ((), ())))).lower(x, w).as_text()
  assert "10x8" in hlo.replace(",", "x").replace("[", "").replace("]", "") or "tensor<10x8xf32>" in hlo


def test_cpu_matmul_falls_back_where_it_does_not_apply():
  x = jnp.ones((4, 24))
  for w, kw in ((jnp.ones((24, 16)), {}), (jnp.ones((24, 16)), dict(preferred_element_type=jnp.bfloat16))):
    text = jax.jit(lambda x, w: flat_dot_general(x, w, (((1,), (0,)), ((), ())), **kw)).lower(x, w).as_text()
    assert "seqjax_dense" not in text  # K = 24 is not a multiple of 16 / a non-float32 result type
  np.testing.assert_allclose(matmul(x, jnp.ones((24, 8))), x @ jnp.ones((24, 8)))
