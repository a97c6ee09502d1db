"""The loop kernels run inside `jax.shard_map` under its default `check_vma=True` and equal the unsharded run.

The bug this catches: a loop carry started from `jnp.zeros` / `jnp.full` is not typed as varying over the mesh
axes, so tracing inside `shard_map` fails ("carry input and carry output must have equal types"). The blockwise
attention forward (`fori_loop`), its backward (`scan` + `fori_loop`) and SSD's scans (chunked and sequential) are
each run batch-sharded over 8 simulated devices, forward and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax.sharding import Mesh, PartitionSpec as P

from seqjax.ops import backend
from seqjax.ops.attention import blockwise_attention, masks
from seqjax.ops.ssm.ssd import ssd

B = 8  # one example per device


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))


def _sharded(fn, n_args):
  """fn and its gradient (sum of outputs) in shard_map over the batch, jitted; check_vma left at its default."""
  def loss(*args):
    return jnp.sum(fn(*args).astype(jnp.float32) ** 2)

  both = lambda *args: (fn(*args), jax.grad(loss, argnums=tuple(range(n_args)))(*args))  # noqa: E731
  spec = P("data")
  return jax.jit(jax.shard_map(both, mesh=_mesh(), in_specs=(spec,) * n_args,
                               out_specs=(spec, (spec,) * n_args))), jax.jit(both)


class ShardMapTest(parameterized.TestCase):

  @parameterized.named_parameters(("causal", "causal"), ("segments", "segments"))
  def test_blockwise_attention_in_shard_map(self, kind):
    T, N, K, H = 40, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H))
    k, v = jax.random.normal(kk, (B, T, K, H)), jax.random.normal(kv, (B, T, K, H))
    seg = jnp.asarray(np.sort(np.random.default_rng(0).integers(1, 4, (B, T)), axis=1), jnp.int32)

    def attend(q, k, v, seg):
      seg = seg.astype(jnp.int32)  # passed as float so that `grad` accepts it
      mask = masks.SegmentIds(seg, seg) if kind == "segments" else None
      return blockwise_attention(q, k, v, causal=kind != "none", mask=mask, block_q=16, block_kv=16)

    sharded, plain = _sharded(attend, 4)  # the ids are sharded too
    args = (q, k, v, seg.astype(jnp.float32))
    with backend.cpu_kernels_mode("off"):  # the JAX tiles (the CPU kernel has no loop carries)
      (out, grads), (want, want_grads) = sharded(*args), plain(*args)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads[:3], want_grads[:3]):
      np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)

  @parameterized.named_parameters(("chunked", "chunked"), ("sequential", "sequential"))
  def test_ssd_in_shard_map(self, mode):
    T, N, H, Ps = 20, 2, 4, 3
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (B, T, N, H))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (B, T, N)))
    Bm, Cm = jax.random.normal(keys[2], (B, T, Ps)), jax.random.normal(keys[3], (B, T, Ps))
    A = -jnp.linspace(0.5, 1.5, N)
    sharded, plain = _sharded(lambda x, dt, Bm, Cm: ssd(x, dt, A, Bm, Cm, mode=mode, chunk_size=8), 4)
    (out, grads), (want, want_grads) = sharded(x, dt, Bm, Cm), plain(x, dt, Bm, Cm)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
