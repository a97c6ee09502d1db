"""Reformer LSH attention against a float64 NumPy oracle of its definition (own hash, own sort, the union of the
rounds' keys), with one bucket = full attention, the decoding step = the parallel form, and gradients."""

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops.attention import lsh

B, T, N, H = 2, 19, 2, 8


def _np_buckets(x_BTNH, rot_NRHU):
  """argmax([x W, -x W]) in float64: [B, N, R, T]."""
  xw = np.einsum("btnh,nrhu->bnrtu", np.asarray(x_BTNH, np.float64), np.asarray(rot_NRHU, np.float64))
  return np.argmax(np.concatenate([xw, -xw], axis=-1), axis=-1)


def _oracle(qk, v, rot, chunk, causal, segment_ids=None):
  """The definition, pair by pair: out_i = softmax over the union of the rounds' visible keys (self only alone)."""
  qk, v = np.asarray(qk, np.float64), np.asarray(v, np.float64)
  Bn, Tn, Nn, Hn = qk.shape
  seg = np.ones((Bn, Tn), int) if segment_ids is None else np.asarray(segment_ids)
  k = qk / np.linalg.norm(qk, axis=-1, keepdims=True)
  buckets = _np_buckets(k, rot)
  out = np.zeros(v.shape)
  for b in range(Bn):
    for n in range(Nn):
      union = np.zeros((Tn, Tn), bool)
      for r in range(buckets.shape[2]):
        order = sorted(range(Tn), key=lambda t: (buckets[b, n, r, t], t))
        place = np.empty(Tn, int)
        place[order] = np.arange(Tn)
        for i in range(Tn):
          for j in range(Tn):
            gap = place[i] - place[j]
            near = 0 <= gap < chunk if causal else abs(gap) < chunk
            union[i, j] |= bool(buckets[b, n, r, i] == buckets[b, n, r, j] and near)
      union &= (seg[b][:, None] == seg[b][None, :]) & (seg[b][:, None] != 0)
      s = qk[b, :, n] @ k[b, :, n].T / np.sqrt(Hn)
      for i in range(Tn):
        others = union[i].copy()
        others[i] = False
        pick = others if others.any() else union[i]
        if not pick.any():
          continue
        w = np.exp(s[i, pick] - s[i, pick].max())
        out[b, i, n] = (w / w.sum()) @ v[b, pick, n]
  return out


def _inputs(seed=0, buckets=4, hashes=3):
  rng = np.random.default_rng(seed)
  qk, v = rng.standard_normal((B, T, N, H)), rng.standard_normal((B, T, N, H))
  rot = np.asarray(lsh.lsh_rotations(jax.random.key(seed), N, hashes, H, buckets))
  return qk, v, rot


class LshTest(parameterized.TestCase):

  def test_hash_equals_numpy_oracle(self):
    qk, _, rot = _inputs(buckets=8)
    np.testing.assert_array_equal(jax.jit(lsh.lsh_hash)(jnp.asarray(qk, jnp.float32), jnp.asarray(rot)),
                                  _np_buckets(qk, rot))

  @parameterized.named_parameters(("causal_c3", True, 3), ("causal_c5", True, 5), ("bidirectional_c3", False, 3),
                                  ("bidirectional_c4", False, 4))
  def test_equals_oracle(self, causal, chunk):
    qk, v, rot = _inputs()
    seg = np.array([[1] * 8 + [2] * 9 + [0] * 2, [1] * T])
    got = jax.jit(lambda *a: lsh.lsh_attention(*a, chunk=chunk, causal=causal, segment_ids=jnp.asarray(seg)))(
        jnp.asarray(qk, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(rot))
    np.testing.assert_allclose(got, _oracle(qk, v, rot, chunk, causal, seg), atol=2e-5)

  def test_one_bucket_is_full_attention(self):
    qk, v, _ = _inputs()
    rot = np.zeros((N, 2, H, 1), np.float32)  # two buckets, everything lands in bucket 0
    got = jax.jit(lambda *a: lsh.lsh_attention(*a, chunk=T, causal=True))(
        jnp.asarray(qk, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(rot))
    k = qk / np.linalg.norm(qk, axis=-1, keepdims=True)
    s = np.einsum("btnh,bsnh->bnts", qk, k) / np.sqrt(H)
    s = np.where(np.tril(np.ones((T, T), bool)) & ~np.eye(T, dtype=bool), s, -np.inf)
    s[:, :, 0, 0] = 0.0  # the first token is alone: it sees itself
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(got, want, atol=2e-5)

  def test_step_equals_parallel(self):
    qk, v, rot = _inputs(seed=2)
    qk, v = jnp.asarray(qk, jnp.float32), jnp.asarray(v, jnp.float32)
    full = jax.jit(lambda *a: lsh.lsh_attention(*a, chunk=3, causal=True))(qk, v, jnp.asarray(rot))
    keys = qk / jnp.linalg.norm(qk, axis=-1, keepdims=True)
    step = jax.jit(lambda q, k, vv, vis: lsh.lsh_attention_step(q, k, vv, vis, jnp.asarray(rot), chunk=3))
    for t in (0, 5, T - 1):
      order = jnp.arange(t, t - T, -1) % T  # distance d -> token t - d (wrapping tokens are masked)
      visible = jnp.broadcast_to(jnp.arange(T) <= t, (B, T))
      out = step(qk[:, t], keys[:, order], v[:, order], visible)
      np.testing.assert_allclose(out, full[:, t], atol=2e-5)

  def test_gradients_against_float64_differences(self):
    qk, v, rot = _inputs(seed=3)
    w = np.random.default_rng(4).standard_normal((B, T, N, H))
    loss = lambda qk, v: jnp.sum(lsh.lsh_attention(qk, v, jnp.asarray(rot), chunk=4) * w)  # noqa: E731
    g_qk, g_v = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(qk, jnp.float32), jnp.asarray(v, jnp.float32))
    rng = np.random.default_rng(5)
    for arg, g in ((0, g_qk), (1, g_v)):
      d = rng.standard_normal(qk.shape)
      eps = 1e-5
      args_p, args_m = [qk, v], [qk, v]
      args_p[arg], args_m[arg] = args_p[arg] + eps * d, args_m[arg] - eps * d
      f = lambda a: np.sum(_oracle(*a, rot, 4, True) * w)  # noqa: E731
      numeric = (f(args_p) - f(args_m)) / (2 * eps)
      np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * d), numeric, rtol=1e-3, atol=1e-3)

  def test_bad_arguments_are_clear_errors(self):
    qk, v, rot = _inputs()
    with self.assertRaisesRegex(ValueError, "rotations"):
      lsh.lsh_attention(qk, v, rot[:1], chunk=2)
    with self.assertRaisesRegex(ValueError, "chunk"):
      lsh.lsh_attention(qk, v, rot, chunk=0)
    with self.assertRaisesRegex(ValueError, "even"):
      lsh.lsh_rotations(jax.random.key(0), 2, 1, 8, 3)
