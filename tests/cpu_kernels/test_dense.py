"""The matmul CPU kernel (`seqjax.cpu_kernels.dense`): what flat_dot_general runs on a CPU equals XLA's dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import cpu_kernels
from seqjax.cpu_kernels import dense
from seqjax.ops.dense.dot import flat_dot_general, matmul

pytestmark = pytest.mark.skipif(not cpu_kernels.available("mlp"), reason="the mlp / dense CPU kernel is unavailable")


@pytest.mark.parametrize("lhs_shape, rhs_shape", [
    ((2, 37, 32), (32, 48)),      # ragged row count (74 rows: one full and one partial block)
    ((3, 100, 64), (64, 4, 16)),  # to heads: N = 64
    ((1, 300, 128), (128, 128)),  # several backward row blocks, full register tiles
    ((2, 70, 32), (32, 259)),     # N not a multiple of 16 (a tied read-out over 259 bytes): padded columns
    ((1, 32, 256), (256, 1024)),  # few rows (a recurrent step): the forward splits the columns into panels
])
def test_matmul_equals_dot_general_forward_and_grad(lhs_shape, rhs_shape):
  """Float32 products with K a multiple of 16 take the CPU kernel through flat_dot_general; results match XLA's."""
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


def test_binding_raises_where_it_does_not_apply_and_matmul_dispatches():
  x = jnp.ones((4, 32))
  with pytest.raises(ValueError, match="multiple of 16"):
    dense.matmul(jnp.ones((4, 24)), jnp.ones((24, 8)))
  assert "seqjax_dense_fwd" in jax.jit(matmul).lower(x, jnp.ones((32, 8))).as_text()
  np.testing.assert_allclose(dense.matmul(x, jnp.ones((32, 8))), x @ jnp.ones((32, 8)), rtol=1e-6)
