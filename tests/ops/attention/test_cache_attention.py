"""`cache_attention` (seqjax/ops/attention/decode.py): decoding's attention over a [B, K, S, H] cache, against a
float64 NumPy oracle written from the formula (forward) and against `reference_attention` (gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops.attention import masks, reference_attention
from seqjax.ops.attention.decode import cache_attention


def _oracle(q_BTNH, k_BKSH, v_BKSH, visible_BTS, bias_BNTS):
  q, k, v = (np.asarray(x, np.float64) for x in (q_BTNH, k_BKSH, v_BKSH))
  B, T, N, H = q.shape
  K = k.shape[1]
  out = np.zeros((B, T, N, H))
  for b in range(B):
    for t in range(T):
      for n in range(N):
        kv = n // (N // K)
        seen = np.flatnonzero(visible_BTS[b, t])
        if not seen.size:
          continue
        s = k[b, kv, seen] @ q[b, t, n] / np.sqrt(H) + (0.0 if bias_BNTS is None else bias_BNTS[b, n, t, seen])
        p = np.exp(s - s.max())
        out[b, t, n] = (p / p.sum()) @ v[b, kv, seen]
  return out


def _inputs(B, T, N, K, S, H, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, K, S, H)).astype(np.float32)
  v = rng.standard_normal((B, K, S, H)).astype(np.float32)
  visible = rng.random((B, T, S)) < 0.7
  visible[0, 0] = False  # a query that sees nothing: 0
  return q, k, v, visible


@pytest.mark.parametrize("T, N, K, with_bias", [(1, 4, 4, False), (1, 4, 1, True), (3, 6, 2, False),
                                                (5, 4, 2, True)])
def test_forward_equals_the_formula(T, N, K, with_bias):
  B, S, H = 2, 7, 8
  q, k, v, visible = _inputs(B, T, N, K, S, H)
  bias = np.random.default_rng(1).standard_normal((B, N, T, S)).astype(np.float32) if with_bias else None
  out = cache_attention(q, k, v, jnp.asarray(visible), None if bias is None else jnp.asarray(bias))
  np.testing.assert_allclose(np.asarray(out), _oracle(q, k, v, visible, bias), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[0, 0] == 0)


class _Visible(masks.Mask):
  """The same visibility as a mask object for reference_attention."""

  _arrays = ("visible_BTS",)

  def __init__(self, visible_BTS):
    self.visible_BTS = visible_BTS

  def block(self, q_idx, kv_idx):
    return self.visible_BTS[:, jnp.asarray(q_idx)][:, :, jnp.asarray(kv_idx)][:, None]

  def check(self, batch, q_len, kv_len):
    pass


def test_gradients_equal_the_reference_kernel():
  B, T, N, K, S, H = 2, 3, 4, 2, 6, 8
  q, k, v, visible = _inputs(B, T, N, K, S, H, seed=2)
  visible = jnp.asarray(visible)
  w = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, N, H)), jnp.float32)

  def ours(q, k, v):
    return jnp.sum(w * cache_attention(q, k, v, visible))

  def reference(q, k, v):  # the reference kernel takes [B, S, K, H]
    out = reference_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=_Visible(visible))
    return jnp.sum(w * out)

  got, want = jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(reference, (0, 1, 2))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_clear_errors():
  q, k, v, visible = _inputs(1, 1, 4, 2, 5, 8)
  with pytest.raises(ValueError, match=r"k, v \[B, K, S, H\]"):
    cache_attention(q, k[..., :4], v, visible)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    cache_attention(q[:, :, :3], k, v, visible)
  with pytest.raises(ValueError, match=r"visible must be \[B, T, S\]"):
    cache_attention(q, k, v, visible[:, :, :4])
