"""The Pallas kernels (interpret mode on CPU) == reference attention, forward and gradients through custom_vjp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import attention
from seqjax.ops.attention import masks, positions

B, N, H = 2, 4, 8


def _qkv(T, S, K, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
          jax.random.normal(kv, (B, S, K, H), dtype))


def _run(fn, q, k, v, mask, bias, **kw):
  w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

  @jax.jit
  def run(q, k, v):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask, bias=bias, **kw), q, k, v)
    return out, pullback(w.astype(out.dtype))

  return run(q, k, v)


def _case(kind, T, S):
  if kind == "causal_segments_gqa":
    ids = np.sort(np.random.default_rng(0).integers(1, 4, size=(B, T)), axis=1)
    ids[0, -4:] = 0  # padding rows: zero output, no NaN
    ids = jnp.asarray(ids, jnp.int32)
    return masks.Causal() & masks.SegmentIds(ids, ids), None
  if kind == "window_alibi":
    return masks.SlidingWindow(6, 0), positions.AlibiBias(positions.alibi_slopes(N))
  if kind == "traced_offset_cross":
    return masks.Causal(q_offset=jnp.int32(S - T)) & masks.KeyPadding(jnp.array([S, S - 3])), None
  if kind == "prefix_or_global":
    return masks.PrefixLM(jnp.array([2, 9])) | masks.GlobalTokens(2), None
  raise AssertionError(kind)


@pytest.mark.parametrize("kind,T,S,K,dtype", [
    ("causal_segments_gqa", 21, 21, 2, jnp.float32),
    ("window_alibi", 19, 19, 4, jnp.float32),
    ("traced_offset_cross", 6, 22, 1, jnp.float32),
    pytest.param("prefix_or_global", 17, 17, 2, jnp.bfloat16, marks=pytest.mark.slow),
])
def test_pallas_equals_reference(kind, T, S, K, dtype):
  q, k, v = _qkv(T, S, K, dtype)
  mask, bias = _case(kind, T, S)
  out_p, grads_p = _run(attention.pallas_attention, q, k, v, mask, bias, block_q=8, block_kv=8)
  out_r, grads_r = _run(attention.reference_attention, q, k, v, mask, bias)
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  for got, want in zip((out_p, *grads_p), (out_r, *grads_r)):
    assert got.dtype == dtype and np.isfinite(np.asarray(got, np.float32)).all()
    scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * scale,
                               rtol=tol)


def test_pallas_is_registered():
  assert attention.get_attention("pallas") is attention.pallas_attention
