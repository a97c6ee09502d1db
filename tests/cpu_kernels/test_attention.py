"""The flash-attention CPU kernel (`seqjax.cpu_kernels.attention`): dispatch, coverage, errors, threads,
transformations, sharding.

Its numerics across masks, GQA, lengths and dtypes are tested against the reference in
tests/ops/attention/test_blockwise.py (the "native" cases); here is what is particular to the C++ kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from seqjax import cpu_kernels
from seqjax.cpu_kernels.attention import canonical_mask, flash_attention, supports
from seqjax.ops import attention, backend
from seqjax.ops.attention import masks, positions

pytestmark = pytest.mark.skipif(not cpu_kernels.available("flash_attention"), reason=f"CPU kernel unavailable here: "
                                f"{cpu_kernels.unavailable_reason('flash_attention')}")


def _qkv(B, T, S, N, K, H, seed=0, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
          jax.random.normal(kv, (B, S, K, H), dtype))


def _value_and_grads(fn, q, k, v, **kw):
  w = jax.random.normal(jax.random.key(5), q.shape, jnp.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw) * w)  # noqa: E731
  return jax.jit(lambda q, k, v: (fn(q, k, v, **kw), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def _hlo(fn, *args):
  return jax.jit(fn).lower(*args).as_text()


def test_blockwise_dispatches_to_the_kernel_on_cpu_only_where_covered():
  q, k, v = _qkv(1, 16, 16, 2, 2, 8)
  covered = _hlo(lambda q, k, v: attention.blockwise_attention(q, k, v, causal=True), q, k, v)
  assert "seqjax_flash_attention_fwd" in covered
  grad = _hlo(jax.grad(lambda q: attention.blockwise_attention(q, k, v, causal=True).sum()), q)
  assert "seqjax_flash_attention_bwd" in grad
  alibi = positions.AlibiBias(positions.alibi_slopes(2))
  for kw in (dict(bias=alibi), dict(mask=masks.GlobalTokens(2)), dict(mask=masks.Causal(q_offset=jnp.int32(3)))):
    text = _hlo(lambda q, k, v: attention.blockwise_attention(q, k, v, **kw), q, k, v)
    assert "seqjax_flash_attention" not in text, kw
  with backend.cpu_kernels_mode("off"):
    forced_off = _hlo(lambda q, k, v: attention.blockwise_attention(q, k, v, causal=True), q, k, v)
  assert "seqjax_flash_attention" not in forced_off


def test_canonical_mask_intersects_bands_with_offsets():
  spec, _ = canonical_mask(masks.Causal(q_offset=5) & masks.SlidingWindow(3, 1, kv_offset=2))
  # causal: j + 0 <= i + 5 -> j - i <= 5;  window: -3 <= (j + 2) - i <= 1 -> -5 <= j - i <= -1
  assert (spec.has_band, spec.band_lo, spec.band_hi) == (True, -5, -1)
  assert canonical_mask(masks.SegmentIds(jnp.ones((1, 4)), jnp.ones((1, 4))) & masks.SegmentIds(
      jnp.ones((1, 4)), jnp.ones((1, 4)))) is None  # two segment masks: not covered
  assert canonical_mask(masks.Causal() | masks.GlobalTokens(1)) is None


def test_uncovered_inputs_raise_clear_errors():
  q, k, v = _qkv(1, 8, 8, 2, 2, 8)
  assert not supports(q, k, v, masks.PrefixLM(jnp.array([3])))
  with pytest.raises(ValueError, match="covers Causal"):
    flash_attention(q, k, v, mask=masks.PrefixLM(jnp.array([3])))
  with pytest.raises(ValueError, match="covers Causal"):
    flash_attention(q, k, v, bias=positions.AlibiBias(positions.alibi_slopes(2)))
  with pytest.raises(ValueError, match="floating point"):
    flash_attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))


def test_many_threads_many_tiles_full_register_tiles_equal_reference():
  """H = 64 and 200-row tiles exercise the full register tiles, several work items per thread, GQA folding."""
  q, k, v = _qkv(2, 300, 260, 8, 2, 64, seed=1)
  mask = masks.Causal(q_offset=-40) & masks.KeyPadding(jnp.array([260, 201]))
  out_n, grads_n = _value_and_grads(flash_attention, q, k, v, mask=mask, block_q=50, block_kv=96)
  out_r, grads_r = _value_and_grads(attention.reference_attention, q, k, v, mask=mask)
  np.testing.assert_allclose(out_n, out_r, atol=2e-5, rtol=2e-5)
  for gn, gr in zip(grads_n, grads_r):
    np.testing.assert_allclose(gn, gr, atol=5e-5, rtol=5e-5)


def test_vmap_runs_each_element():
  q, k, v = _qkv(3, 24, 24, 2, 1, 16)
  qs, ks, vs = (x[:, None] for x in (q, k, v))  # vmap over the batch, each element is a batch of 1
  out = jax.vmap(lambda q, k, v: flash_attention(q, k, v, causal=True))(qs, ks, vs)[:, 0]
  np.testing.assert_allclose(out, attention.reference_attention(q, k, v, causal=True), atol=2e-5, rtol=2e-5)


def test_sharded_batch_equals_unsharded():
  """On 8 devices with a batch-sharded input the kernel gives the unsharded result (forward and gradients)."""
  q, k, v = _qkv(8, 32, 32, 4, 2, 16, seed=2)
  ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(1, 3, (8, 32)), axis=1), jnp.int32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))  # noqa: E731

  def fn(q, k, v, ids):
    return attention.blockwise_attention(q, k, v, mask=masks.Causal() & masks.SegmentIds(ids, ids))

  want = _value_and_grads(lambda q, k, v: fn(q, k, v, ids), q, k, v)
  got = jax.jit(lambda q, k, v, ids: (fn(q, k, v, ids), jax.grad(lambda q, k, v: jnp.sum(
      fn(q, k, v, ids) * jax.random.normal(jax.random.key(5), q.shape)), argnums=(0, 1, 2))(q, k, v)))(
          put(q), put(k), put(v), put(ids))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
