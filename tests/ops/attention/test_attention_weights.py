"""`attention_weights` (the probabilities behind attention maps) against a float64 NumPy softmax."""

from absl.testing import parameterized
import jax
import numpy as np

from seqjax.ops import attention
from seqjax.ops.attention import masks, positions


def _numpy_weights(q, k, visible, bias):
  """float64 softmax of q.k / sqrt(H) + bias over the visible keys, K/V heads repeated per query head."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]) + bias
  s = np.where(visible, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.where(visible, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
  d = p.sum(-1, keepdims=True)
  return p / np.where(d == 0, 1, d)


class AttentionWeightsTest(parameterized.TestCase):

  @parameterized.named_parameters(("causal_gqa", "causal", 2), ("window_segments_mha", "window", 4),
                                  ("padding_alibi_mqa", "padding", 1))
  def test_equals_numpy_softmax(self, kind, num_kv_heads):
    """Catches: a wrong scale, GQA heads grouped in the wrong order, a mask or bias not applied, unnormalised
    rows, NaN rows where nothing is visible."""
    B, T, N, H = 2, 9, 4, 8
    kq, kk = jax.random.split(jax.random.key(1))
    q = jax.random.normal(kq, (B, T, N, H)) * 2
    k = jax.random.normal(kk, (B, T, num_kv_heads, H)) * 2
    t, s = np.arange(T)[:, None], np.arange(T)[None]
    bias = np.zeros((1, 1, T, T))
    if kind == "causal":
      mask, visible = masks.Causal(), np.broadcast_to(s <= t, (B, 1, T, T))
    elif kind == "window":
      seg = np.array([[1] * 4 + [2] * 5, [1] * 9])
      mask = masks.SlidingWindow(2, 0) & masks.SegmentIds(seg, seg)
      visible = (s <= t) & (t - s <= 2) & (seg[:, None, :, None] == seg[:, None, None, :])
    else:  # row 1's keys past 5 are padding, and its queries past 5 see nothing at all (zero rows)
      valid = np.array([[1] * 9, [1] * 5 + [0] * 4])
      mask = masks.Causal() & masks.SegmentIds(valid, valid)
      visible = (s <= t) & (valid[:, None, :, None] == 1) & (valid[:, None, None, :] == 1)
      slopes = np.asarray(positions.alibi_slopes(N))
      bias = -slopes[None, :, None, None] * np.abs(t - s)[None, None]
      kind_bias = positions.AlibiBias(positions.alibi_slopes(N))
    got = attention.attention_weights(q, k, mask=mask, bias=kind_bias if kind == "padding" else None)
    want = _numpy_weights(q, k, visible, bias)
    self.assertEqual(got.shape, (B, N, T, T))
    self.assertEqual(got.dtype, np.float32)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    rows = np.asarray(got).sum(-1)
    any_visible = np.broadcast_to(visible.any(-1), rows.shape)
    np.testing.assert_allclose(rows[any_visible], 1.0, atol=1e-5)
    np.testing.assert_array_equal(rows[~any_visible], 0.0)

  def test_weights_times_values_is_the_reference_attention(self):
    """Catches: the weights and the kernel disagreeing (the maps must show what the model computes)."""
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(key, (1, 6, 2, 4)) for key in (kq, kk, kv))
    w = attention.attention_weights(q, k, causal=True)
    out = np.einsum("bnts,bsnh->btnh", np.asarray(w, np.float64), np.asarray(v, np.float64))
    np.testing.assert_allclose(out, attention.blockwise_attention(q, k, v, causal=True), atol=1e-5)

  def test_bad_shapes_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, "attention_weights: expected q"):
      attention.attention_weights(np.zeros((2, 3, 4)), np.zeros((2, 3, 4, 1)))
