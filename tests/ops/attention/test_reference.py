"""The reference attention against a plain numpy oracle, its edge cases, and the registry."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import attention
from seqjax.ops.attention import masks, positions

# One compilation per test instead of one per eager op (much cheaper on a shared CPU).
reference = jax.jit(attention.reference_attention, static_argnames=("causal", "scale"))


def _numpy_attention(q, k, v, visible=None, bias=None, scale=None):
  """Loop-free float64 oracle that repeats K/V per query head (what GQA avoids doing in the kernels)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, N, H = q.shape
  g = N // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * (H ** -0.5 if scale is None else scale)
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  if visible is None:
    visible = np.ones(s.shape, bool)
  visible = np.broadcast_to(visible, s.shape)
  s = np.where(visible, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.where(visible, np.exp(s - m), 0)
  denom = p.sum(-1, keepdims=True)
  w = p / np.where(denom == 0, 1, denom)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _qkv(B=2, T=7, S=9, N=4, K=2, H=8, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
          jax.random.normal(kv, (B, S, K, H), dtype))


class ReferenceGqaTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((4, 4), (4, 2), (4, 1))
  def test_reference_matches_numpy_gqa(self, N, K):
    q, k, v = _qkv(N=N, K=K)
    got = self.variant(attention.reference_attention)(q, k, v)
    chex.assert_shape(got, q.shape)
    chex.assert_type(got, jnp.float32)
    chex.assert_trees_all_close(got, _numpy_attention(q, k, v).astype(np.float32), rtol=1e-5, atol=1e-5)


def test_reference_with_mask_bias_and_scale():
  q, k, v = _qkv(T=7, S=7)
  ids = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
  mask = masks.SegmentIds(ids, ids)
  bias = jax.random.normal(jax.random.key(3), (2, 4, 7, 7))
  got = reference(q, k, v, causal=True, mask=mask, bias=bias, scale=0.3)
  visible = np.asarray(masks.Causal().materialize(7, 7) & mask.materialize(7, 7))
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, visible, bias, 0.3), rtol=1e-5, atol=1e-5)
  # Padding rows see nothing: exactly zero.
  np.testing.assert_array_equal(got[0, 5:], 0.0)


def test_reference_alibi_object_equals_materialised_bias():
  q, k, v = _qkv(N=4, K=2)
  alibi = positions.AlibiBias(positions.alibi_slopes(4))
  dense = alibi.block(jnp.arange(7), jnp.arange(9))
  np.testing.assert_allclose(reference(q, k, v, causal=True, bias=alibi),
                             reference(q, k, v, causal=True, bias=dense), rtol=1e-6)


def test_fully_masked_rows_are_zero_with_finite_gradients():
  q, k, v = _qkv(T=5, S=5)
  lengths = jnp.array([0, 3])  # batch row 0 has no visible key at all

  def loss(q, k, v):
    return jnp.sum(reference(q, k, v, mask=masks.KeyPadding(lengths)) ** 2)

  out = reference(q, k, v, mask=masks.KeyPadding(lengths))
  np.testing.assert_array_equal(out[0], 0.0)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(grads[1][1, 3:], 0.0)  # padded keys get no gradient


def test_reference_causal_by_gradients():
  q, k, v = _qkv(T=6, S=6)
  t = 2
  jac = jax.jit(jax.grad(lambda k: reference(q, k, v, causal=True)[:, t].sum()))(k)
  assert np.abs(np.asarray(jac[:, t + 1:])).max() == 0.0
  assert np.abs(np.asarray(jac[:, :t + 1])).max() > 0.0


def test_bfloat16_inputs_keep_dtype():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  out = reference(q, k, v, causal=True)
  assert out.dtype == jnp.bfloat16
  want = _numpy_attention(q, k, v, np.asarray(masks.Causal().materialize(7, 9)))
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=3e-2)


def test_bad_shapes_raise_value_error():
  q, k, v = _qkv(N=4, K=3, H=8)
  with pytest.raises(ValueError, match="multiple"):
    reference(q, k, v)
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="same shape"):
    reference(q, k, v[:, :3])
  with pytest.raises(ValueError, match="B, T, N, H"):
    reference(q[0], k, v)
  with pytest.raises(ValueError, match="masks object"):
    reference(q, k, v, mask=jnp.ones((7, 9), bool))
  with pytest.raises(ValueError, match="broadcastable"):
    reference(q, k, v, bias=jnp.ones((2, 3, 7, 9)))
  with pytest.raises(ValueError, match="kv_ids"):
    reference(q, k, v, mask=masks.SegmentIds(jnp.ones((2, 7)), jnp.ones((2, 8))))


def test_registry():
  assert "reference" in attention.available_attentions()
  assert attention.get_attention("reference") is attention.reference_attention

  @attention.register_attention("test_scaled_reference")
  def scaled(q, k, v, *, causal=False, mask=None, bias=None, scale=None):
    return reference(q, k, v, causal=causal, mask=mask, bias=bias, scale=scale)

  assert attention.get_attention("test_scaled_reference") is scaled
  with pytest.raises(ValueError, match="already registered"):
    attention.register_attention("test_scaled_reference")(lambda *a, **k: None)
  with pytest.raises(ValueError, match="registered: .*reference"):
    attention.get_attention("no_such_attention")
