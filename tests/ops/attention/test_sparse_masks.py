"""Longformer / BigBird masks: exact visibility against dense NumPy oracles (their own hash and patterns), tile
answers consistent with the dense mask, the blockwise kernel against a float64 reference (forward and gradients),
and the tiles it visits growing linearly with the length at a fixed window."""

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops.attention import blockwise, blockwise_attention, masks, sparse_masks

_M32 = 0xFFFFFFFF


def _py_hash(seed, qb, i):
  """The 32-bit hash of (seed, query block, draw), written with Python ints (the oracle of `_hash`)."""
  h = (qb * 0x85EBCA77 + i * 0xC2B2AE3D + seed * 0x9E3779B1) & _M32
  for _ in range(2):
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M32
  return h ^ (h >> 16)


def _random_oracle(T, S, bs, r, seed, causal, n_kv_blocks=None, q_off=0, kv_off=0):
  want = np.zeros((T, S), bool)
  for t in range(T):
    qb = (t + q_off) // bs
    if causal:
      drawn = {_py_hash(seed, qb, i) % qb for i in range(r)} if qb >= 1 else set()
    else:
      drawn = {_py_hash(seed, qb, i) % n_kv_blocks for i in range(r)}
    for s in range(S):
      want[t, s] = (s + kv_off) // bs in drawn
  return want


def _pattern_oracle(T, S, window, globals_, causal, random=None):
  """Dense Longformer / BigBird visibility [T, S]: window | global rows and columns | random blocks (& causal)."""
  q, k = np.arange(T)[:, None], np.arange(S)[None, :]
  want = (k - q >= -(window - 1)) & (k - q <= (0 if causal else window - 1))
  g = np.zeros(max(T, S), bool)
  g[list(globals_)] = True
  want |= g[:T][:, None] | g[:S][None, :]
  if random is not None:
    want |= random
  return want & (k <= q) if causal else want


def _cases():
  T = S = 37
  rnd_c = _random_oracle(T, S, 4, 2, 7, True)
  rnd_nc = _random_oracle(T, S, 4, 3, 1, False, n_kv_blocks=10)
  return {
      "longformer_causal": (sparse_masks.longformer(5, num_global=2), _pattern_oracle(T, S, 5, [0, 1], True)),
      "longformer_bidirectional": (sparse_masks.longformer(4, global_positions=(3, 36), causal=False),
                                   _pattern_oracle(T, S, 4, [3, 36], False)),
      "bigbird_causal": (sparse_masks.bigbird(3, num_global=1, num_random=2, block_size=4, seed=7),
                         _pattern_oracle(T, S, 3, [0], True, rnd_c)),
      "bigbird_bidirectional": (sparse_masks.bigbird(3, num_global=2, num_random=3, block_size=4, seed=1,
                                                     causal=False, kv_len=S),
                                _pattern_oracle(T, S, 3, [0, 1], False, rnd_nc)),
      "random_only": (sparse_masks.RandomBlocks(4, 2, 7), rnd_c),
      "global_only": (sparse_masks.GlobalPositions((5, 9)), _pattern_oracle(T, S, 1, [5, 9], False)
                      & ~np.eye(T, S, dtype=bool) | (np.isin(np.arange(T), [5, 9])[:, None])),
  }


CASES = _cases()


def _materialize(mask, T, S):
  return jax.jit(lambda m: m.materialize(T, S))(mask)


class MaskOracleTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name, name) for name in CASES])
  def test_visibility_equals_numpy_oracle(self, name):
    mask, want = CASES[name]
    got = np.asarray(_materialize(mask, *want.shape))[0, 0]
    np.testing.assert_array_equal(got, want)

  @parameterized.named_parameters(*[(f"{name}_b{b}", name, b) for name in CASES for b in (3, 4, 8)])
  def test_tile_kinds_match_the_dense_mask(self, name, b):
    mask, want = CASES[name]
    T, S = want.shape
    lo_q, lo_k = np.arange(0, T, b), np.arange(0, S, b)
    kinds = mask.tile_kinds(lo_q[:, None], np.minimum(lo_q + b, T)[:, None], lo_k[None], np.minimum(lo_k + b, S)[None])
    for i, ql in enumerate(lo_q):
      for j, kl in enumerate(lo_k):
        tile = want[ql:ql + b, kl:kl + b]
        if kinds[i, j] == masks.EMPTY:
          self.assertFalse(tile.any(), (name, i, j))
        elif kinds[i, j] == masks.FULL:
          self.assertTrue(tile.all(), (name, i, j))
    # Exactness where it matters for speed: an all-hidden tile of a static pattern is never visited.
    empty_tiles = np.array([[not want[ql:ql + b, kl:kl + b].any() for kl in lo_k] for ql in lo_q])
    np.testing.assert_array_equal(kinds == masks.EMPTY, empty_tiles)

  @parameterized.named_parameters(("causal", True, 3, 5), ("bidirectional", False, 0, 4))
  def test_offsets_and_span_tests_are_consistent(self, causal, q_off, kv_off):
    T, S, bs = 9, 11, 4
    mask = sparse_masks.RandomBlocks(bs, 2, 3, causal=causal, num_kv_blocks=None if causal else 5)
    shifted = mask.shift(q_off, kv_off)
    want = _random_oracle(T, S, bs, 2, 3, causal, 5, q_off, kv_off)
    np.testing.assert_array_equal(np.asarray(shifted.materialize(T, S))[0, 0], want)
    los, klos = np.meshgrid(np.arange(0, T, 3), np.arange(0, S, 3), indexing="ij")
    maybe = jax.jit(jax.vmap(lambda lo, klo: mask.shift(jnp.asarray(q_off), jnp.asarray(kv_off)).tile_maybe_visible(
        lo, 3, klo, 3)))(los.reshape(-1), klos.reshape(-1))
    for lo, klo, m in zip(los.reshape(-1), klos.reshape(-1), np.asarray(maybe)):
      if want[lo:lo + 3, klo:klo + 3].any():
        self.assertTrue(m, (lo, klo))

  def test_in_documents_gives_each_document_its_own_pattern(self):
    pattern = sparse_masks.bigbird(2, num_global=1, num_random=1, block_size=2, seed=3)
    lengths = (6, 5, 3)
    segments = np.concatenate([np.full(n, d + 1) for d, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    mask = sparse_masks.InDocuments(pattern, jnp.asarray(positions), jnp.asarray(positions)) & masks.SegmentIds(
        jnp.asarray(segments), jnp.asarray(segments))
    got = np.asarray(_materialize(mask, 14, 14))[0, 0]
    start = 0
    for n in lengths:
      alone = np.asarray(pattern.materialize(n, n))[0, 0]
      np.testing.assert_array_equal(got[start:start + n, start:start + n], alone)
      self.assertFalse(got[start:start + n, :start].any())
      start += n

  def test_bad_arguments_are_clear_errors(self):
    with self.assertRaisesRegex(ValueError, "num_kv_blocks"):
      sparse_masks.RandomBlocks(4, 2, causal=False)
    with self.assertRaisesRegex(ValueError, "window must be an int >= 1"):
      sparse_masks.longformer(0)
    with self.assertRaisesRegex(ValueError, "kv_len"):
      sparse_masks.bigbird(4, num_random=1, causal=False)
    with self.assertRaisesRegex(ValueError, "position mask"):
      sparse_masks.InDocuments(masks.SegmentIds(jnp.ones((1, 3)), jnp.ones((1, 3))), jnp.zeros((1, 3)),
                               jnp.zeros((1, 3)))


def _dense64(q, k, v, visible):
  """Float64 NumPy attention with a boolean [T, S] mask (rows with no visible key give 0)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(visible, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  return np.einsum("bnts,bsnh->btnh", p / np.maximum(p.sum(-1, keepdims=True), 1e-300), v)


class BlockwiseSparseTest(parameterized.TestCase):

  @parameterized.named_parameters(("longformer_causal", "longformer_causal"), ("bigbird_causal", "bigbird_causal"),
                                  ("bigbird_bidirectional", "bigbird_bidirectional"))
  def test_blockwise_equals_float64_reference_forward_and_gradients(self, name):
    mask, visible = CASES[name]
    T = visible.shape[0]
    rng = np.random.default_rng(1)
    q, k, v, w = (rng.standard_normal((1, T, 2, 8)) for _ in range(4))
    f = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, mask=mask, block_q=8, block_kv=8))
    out = f(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(out, _dense64(q, k, v, visible), atol=2e-5)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(*(jnp.asarray(x, jnp.float32)
                                                                           for x in (q, k, v)))
    eps = 1e-6
    for arg, g in enumerate(grads):  # float64 central differences of the NumPy reference along a direction
      d = rng.standard_normal(q.shape)
      args_p, args_m = [q, k, v], [q, k, v]
      args_p[arg], args_m[arg] = args_p[arg] + eps * d, args_m[arg] - eps * d
      numeric = (np.sum(_dense64(*args_p, visible) * w) - np.sum(_dense64(*args_m, visible) * w)) / (2 * eps)
      np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * d), numeric, rtol=1e-4, atol=1e-4)

  @parameterized.named_parameters(("longformer", False), ("bigbird", True))
  def test_visited_tiles_grow_linearly_at_fixed_window(self, random):
    counts = []
    for T in (1024, 2048, 4096, 8192):
      mask = (sparse_masks.bigbird(128, num_global=16, num_random=2, block_size=64) if random else
              sparse_masks.longformer(128, num_global=16))
      counts.append(blockwise.make_plan(mask, T, T, 64, 64).visited_tiles)
    per_row = [c / (T // 64) for c, T in zip(counts, (1024, 2048, 4096, 8192))]
    # Each query row of tiles visits a bounded number of tiles: window (3) + the global column (1) + random (<= 2),
    # plus the global row (all tiles of row 0): the per-row count stays flat while the length doubles.
    self.assertLess(max(per_row), 7.5)
    for small, large in zip(counts, counts[1:]):
      self.assertLess(large / small, 2.25)
    causal_full = blockwise.make_plan(masks.Causal(), 8192, 8192, 64, 64).visited_tiles
    self.assertLess(counts[-1] * 10, causal_full)
