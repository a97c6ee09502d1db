"""flat_dot_general equals lax.dot_general (forward and gradients) and is used where it applies; its native CPU
matmul equals XLA's dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import native
from seqjax.ops.linear import flat_dot_general, matmul


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims", [
    ((2, 5, 8), (8, 3), (((2,), (0,)), ((), ()))),  # Dense
    ((2, 5, 8), (8, 4, 6), (((2,), (0,)), ((), ()))),  # DenseGeneral to heads
    ((2, 5, 4, 6), (4, 6, 8), (((2, 3), (0, 1)), ((), ()))),  # heads back to width
    ((2, 5, 8), (3, 8), (((2,), (1,)), ((), ()))),  # not leading on the kernel: falls through
    ((4, 5, 8), (4, 8, 3), (((2,), (1,)), ((0,), (0,)))),  # batched: falls through
])
def test_equals_dot_general_forward_and_grad(lhs_shape, rhs_shape, dims):
  kx, ky = jax.random.split(jax.random.PRNGKey(0))
  x, w = jax.random.normal(kx, lhs_shape), jax.random.normal(ky, rhs_shape)
  ref = lambda x, w: jax.lax.dot_general(x, w, dims)  # noqa: E731
  ours = lambda x, w: flat_dot_general(x, w, dims)  # noqa: E731
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), argnums=(0, 1))(x, w)
  g_ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_flattens_to_one_rank_2_matmul():
  x, w = jnp.ones((2, 5, 8)), jnp.ones((8, 4, 6))
  hlo = jax.jit(lambda x, w: flat_dot_general(x, w, (((2,), (0,)), ((), ())))).lower(x, w).as_text()
  assert "10x8" in hlo.replace(",", "x").replace("[", "").replace("]", "") or "tensor<10x8xf32>" in hlo


@pytest.mark.parametrize("lhs_shape, rhs_shape", [
    ((2, 37, 32), (32, 48)),      # ragged row count (74 rows: one full and one partial block)
    ((3, 100, 64), (64, 4, 16)),  # to heads: N = 64
    ((1, 300, 128), (128, 128)),  # several backward row blocks, full register tiles
    ((2, 70, 32), (32, 259)),     # N not a multiple of 16 (a tied read-out over 259 bytes): padded columns
    ((1, 32, 256), (256, 1024)),  # few rows (a recurrent step): the forward splits the columns into panels
])
def test_native_matmul_equals_dot_general_forward_and_grad(lhs_shape, rhs_shape):
  """Float32 products with K a multiple of 16 take the native kernel on CPU; results match XLA's dot."""
  if not native.available():
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
  dims = (((len(lhs_shape) - 1,), (0,)), ((), ()))
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x, w = jax.random.normal(kx, lhs_shape), jax.random.normal(ky, rhs_shape)
  ours = lambda x, w: flat_dot_general(x, w, dims)  # noqa: E731
  assert "seqjax_dense_fwd" in jax.jit(ours).lower(x, w).as_text()
  ref = lambda x, w: jax.lax.dot_general(x, w, dims, precision="highest")  # noqa: E731
  np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=2e-5, atol=2e-5)
  g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), argnums=(0, 1))(x, w)
  g_ours = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), argnums=(0, 1)))(x, w)
  for a, b in zip(g_ours, g_ref):  # sin of sums of up to 256 terms: scale the tolerance with the gradient's size
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))


def test_native_matmul_falls_back_where_it_does_not_apply():
  x = jnp.ones((4, 24))
  for w, kw in ((jnp.ones((24, 16)), {}), (jnp.ones((24, 16)), dict(preferred_element_type=jnp.bfloat16))):
    text = jax.jit(lambda x, w: flat_dot_general(x, w, (((1,), (0,)), ((), ())), **kw)).lower(x, w).as_text()
    assert "seqjax_dense" not in text  # K = 24 is not a multiple of 16 / a non-float32 result type
  with pytest.raises(ValueError, match="multiple of 16"):
    matmul(x, jnp.ones((24, 8)), native=True)
  np.testing.assert_allclose(matmul(x, jnp.ones((24, 8))), x @ jnp.ones((24, 8)))
