"""Based's Taylor feature map (seqjax.ops.linear.variants.taylor_features) and the normalised linear attention over
it, against float64 NumPy written from the paper: phi(q).phi(k) = 1 + z + z^2 / 2 with z = q.k / sqrt(P), and

    o_t = sum_{s<=t} (1 + z_ts + z_ts^2 / 2) v_s / (sum_{s<=t} (1 + z_ts + z_ts^2 / 2) + eps)

over the current document only, in every form (forward and gradients by central differences).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from seqjax.ops import linear
from tests.ops.linear.test_numpy_oracle import assert_directional_derivatives

MODES = ("parallel", "recurrent", "chunked")
B, T, N, P, H = 2, 11, 2, 3, 4
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3], [4] * 11], np.int32)
RNG = np.random.default_rng(11)


def taylor_attention_oracle(q, k, v, eps):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  o = np.zeros(v.shape)
  for b in range(B):
    for t in range(T):
      start = t
      while start > 0 and SEGMENTS[b, start - 1] == SEGMENTS[b, t]:
        start -= 1
      for n in range(N):
        z = np.array([q[b, t, n] @ k[b, s, n] for s in range(start, t + 1)]) / np.sqrt(P)
        w = 1.0 + z + z ** 2 / 2.0
        o[b, t, n] = (w[:, None] * v[b, start:t + 1, n]).sum(0) / (w.sum() + eps)
  return o


class TaylorTest(parameterized.TestCase):

  def test_features_give_the_taylor_kernel(self):
    """Catches: a missing 1 / sqrt(2) on the quadratic block, a wrong P^-1/4 scale, a dropped constant feature."""
    q, k = RNG.standard_normal((5, P)), RNG.standard_normal((5, P))
    fq, fk = (np.asarray(linear.taylor_features(jnp.asarray(a, jnp.float32)), np.float64) for a in (q, k))
    assert fq.shape == (5, 1 + P + P * P)
    z = np.sum(q * k, axis=-1) / np.sqrt(P)
    np.testing.assert_allclose(np.sum(fq * fk, axis=-1), 1 + z + z ** 2 / 2, rtol=1e-5)

  @parameterized.product(mode=MODES)
  def test_attention_matches_the_explicit_sums(self, mode):
    """Forward and gradients (directional, w.r.t. q, k, v) of every form against the float64 double sum."""
    q, k, v = (RNG.standard_normal(s).astype(np.float32) for s in ((B, T, N, P), (B, T, N, P), (B, T, N, H)))
    eps = linear.variants.DEFAULT_EPS
    run = lambda q, k, v: linear.linear_attention(q, k, v, feature_map_name="taylor", mode=mode,  # noqa: E731
                                                  chunk_size=4, segment_ids=SEGMENTS)
    expected = taylor_attention_oracle(q, k, v, eps)
    np.testing.assert_allclose(np.asarray(run(q, k, v), np.float64), expected, rtol=2e-5, atol=2e-5)
    w = RNG.standard_normal((B, T, N, H))
    assert_directional_derivatives(lambda *a: jnp.sum(run(*a) * w),
                                   lambda *a: np.sum(taylor_attention_oracle(*a, eps) * w), [q, k, v], rng=RNG)
