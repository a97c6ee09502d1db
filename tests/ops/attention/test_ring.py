"""Ring attention on 8 simulated devices = float64 NumPy attention over the whole sequence, forward and dq/dk/dv.

The oracle (`_attention64` / `_attention64_grads`) materialises the global [B, N, L, L] softmax in float64 from the
equations and shares no code with the ring or the blockwise kernel. Every case runs `ring_attention` inside
`jax.shard_map` with the default `check_vma=True`, on the sequence dealt to the shards in the layout's order
(`ring_layout_permutation`), with grouped-query attention (K < N) and local lengths that are not multiples of the
tiles. Bugs these catch: a wrong hop offset or source shard (positions of the visiting block), a wrong merge of
the hops' log-sum-exps, dK/dV not travelling home with their block, a layout's positions or permutation wrong,
hops skipped that are visible. Plain causal attention (with or without segment ids) runs the static hop plans
(`ring.HOP_PLANS`); `_plan_only` makes the dynamic path raise, so those cases prove the plan is what ran, and a
planted wrong hop kind must fail.
"""

import contextlib
from unittest import mock


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh, PartitionSpec as P

from seqjax.ops.attention import all_gather_attention, masks, ring_attention, ring_layout_permutation
from seqjax.ops.attention import ring as ring_lib
from seqjax.ops.attention.ring import LAYOUTS

B, N, K, H = 2, 4, 2, 8
WINDOW = 13  # a causal window of 13 keys (the query included)


def _visible64(kind, L, seg):
  """bool [B, L, L] of the whole sequence, written from the definitions."""
  t, s = np.arange(L)[:, None], np.arange(L)[None, :]
  vis = np.ones((L, L), bool)
  if kind != "none":
    vis &= s <= t
  if kind in ("window", "all"):
    vis &= s > t - WINDOW
  vis = np.broadcast_to(vis, (B, L, L)).copy()
  if kind in ("segments", "all"):
    vis &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  return vis


def _probs64(q, k, vis, scale):
  G = N // K
  kg = np.repeat(k, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, kg) * scale
  s = np.where(vis[:, None], s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(vis[:, None], np.exp(s - m), 0.0)
  z = e.sum(-1, keepdims=True)
  return e / np.where(z == 0, 1.0, z), kg


def _attention64(q, k, v, vis, scale):
  p, _ = _probs64(q, k, vis, scale)
  return np.einsum("bnts,bsnh->btnh", p, np.repeat(v, N // K, axis=2))


def _attention64_grads(q, k, v, vis, scale, d_out):
  """dq, dk, dv of sum(out * d_out), by the softmax backward equations (GQA: summed over each kv head's group)."""
  G = N // K
  p, kg = _probs64(q, k, vis, scale)
  vg = np.repeat(v, G, axis=2)
  dv = np.einsum("bnts,btnh->bsnh", p, d_out)
  dp = np.einsum("btnh,bsnh->bnts", d_out, vg)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bnts,bsnh->btnh", ds, kg) * scale
  dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
  fold = lambda x: x.reshape(x.shape[0], x.shape[1], K, G, H).sum(3)  # noqa: E731
  return dq, fold(dk), fold(dv)


def _segments(L, seed):
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(1, 5, size=(B, L)), axis=1)
  ids[0, -5:] = 0  # padding at the end of row 0
  return ids.astype(np.int32)


def _mesh(shards):
  devices = np.array(jax.devices()[:8]).reshape(8 // shards, shards)
  return Mesh(devices, ("data", "seq"))


def _run_ring(kind, layout, shards, L, block_q, block_kv, seed=0, kernel=ring_attention, dtype=np.float32):
  """(out, dq, dk, dv) of the ring over the whole sequence, and the float64 oracle's."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, L, N, H)).astype(np.float32)
  k = rng.standard_normal((B, L, K, H)).astype(np.float32)
  v = rng.standard_normal((B, L, K, H)).astype(np.float32)
  d_out = rng.standard_normal((B, L, N, H)).astype(np.float32)
  if dtype != np.float32:  # the oracle sees the same rounded inputs
    q, k, v, d_out = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, d_out))
  seg = _segments(L, seed)
  perm, inverse = ring_layout_permutation(L, shards, layout)
  spec = P("data", "seq")

  def local(q, k, v, seg):
    mask = masks.SlidingWindow(WINDOW - 1, 0) if kind in ("window", "all") else None
    return kernel(q, k, v, causal=kind != "none", layout=layout, mask=mask,
                          segment_ids=seg if kind in ("segments", "all") else None, block_q=block_q,
                          block_kv=block_kv)

  sharded = jax.shard_map(local, mesh=_mesh(shards), in_specs=(spec,) * 4, out_specs=spec)

  @jax.jit
  def out_and_grads(q, k, v, seg, d_out):
    out, vjp = jax.vjp(lambda q, k, v: sharded(q, k, v, seg), q, k, v)
    return out, *vjp(d_out)

  cast = lambda x: x if x.dtype == np.int32 else jnp.asarray(x, dtype)  # noqa: E731
  results = out_and_grads(*(cast(x[:, perm]) for x in (q, k, v, seg, d_out)))
  got = [np.asarray(x.astype(jnp.float32))[:, inverse] for x in results]
  vis = _visible64(kind, L, seg)
  scale = H ** -0.5
  q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
  want = [_attention64(q64, k64, v64, vis, scale), *_attention64_grads(q64, k64, v64, vis, scale, d_out)]
  return got, want


def _assert_close(got, want):
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=name)


def _cases(layouts, kinds):
  return [(f"{layout}_{kind}", layout, kind) for layout in layouts for kind in kinds]


@contextlib.contextmanager
def _plan_only():
  """The ring's dynamic (position-mask) path raises: what runs inside is the static hop plan."""
  def refuse(*args, **kwargs):
    raise AssertionError("the dynamic hop path was traced where a static hop plan should run")
  with mock.patch.object(ring_lib._Ring, "dynamic_hop", refuse):
    yield


class RingAttentionTest(parameterized.TestCase):
  """Compiling a ring program takes a few seconds, so the fast set is one case per layout with every mask feature
  at once (causal & sliding window & segment ids), one non-causal case and one on 8 shards; the features one at a
  time are the slow set."""

  @parameterized.named_parameters(*_cases(LAYOUTS, ("all",)), ("zigzag_none", "zigzag", "none"))
  def test_equals_oracle(self, layout, kind):
    # 4 shards of 16 rows (data 2 x seq 4); tiles 5 x 7 are ragged at the shard's end; the window hides whole hops.
    _assert_close(*_run_ring(kind, layout, shards=4, L=64, block_q=5, block_kv=7))

  @parameterized.named_parameters(*_cases(LAYOUTS, ("segments",)))
  def test_static_plan_equals_oracle(self, layout, kind):
    """Causal & segment ids: every hop takes its layout's static kind (diagonal, earlier, later), GQA, ragged
    tiles (zigzag's half-block hops have 8 rows: tiles 5 x 7 are ragged there too)."""
    with _plan_only():
      _assert_close(*_run_ring(kind, layout, shards=4, L=64, block_q=5, block_kv=7))

  @parameterized.named_parameters(
      ("striped_later_not_strict", "striped", 2, ring_lib.HopKind("wrong", masks.Causal())),
      ("zigzag_later_first_queries", "zigzag", 2, ring_lib.HopKind("wrong", q_rows="first")),
      ("contiguous_earlier_skipped", "contiguous", 1, None))
  def test_wrong_hop_kind_fails(self, layout, position, wrong):
    """Planted bug: one hop kind of the plan replaced; the oracle comparison must notice."""
    plan = list(ring_lib.HOP_PLANS[layout])
    plan[position] = wrong
    with _plan_only(), mock.patch.dict(ring_lib.HOP_PLANS, {layout: tuple(plan)}):
      got, want = _run_ring("causal", layout, shards=4, L=32, block_q=4, block_kv=4)
    with pytest.raises(AssertionError):
      _assert_close(got, want)

  def test_all_gather_strategy(self):
    """The same computation with K/V gathered once (model.context_parallel="all_gather")."""
    _assert_close(*_run_ring("all", "zigzag", shards=4, L=64, block_q=5, block_kv=7, kernel=all_gather_attention))

  def test_bfloat16(self):
    """bfloat16 inputs (float32 softmax statistics, merges and gradient sums) against the float64 oracle on the
    same rounded inputs, in units of each result's RMS: the kernel's own bfloat16 tiles (probabilities cast for the
    matmuls, as in `blockwise_attention`) cost well under 1% RMS."""
    got, want = _run_ring("all", "zigzag", shards=4, L=64, block_q=8, block_kv=8, dtype=jnp.bfloat16)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
      scale = np.sqrt(np.mean(w ** 2))
      assert np.sqrt(np.mean((g - w) ** 2)) <= 1e-2 * scale, name  # measured 0.2-0.4%
      assert np.max(np.abs(g - w)) <= 8e-2 * scale, name           # measured 1.6-4.8% (a few rows)

  def test_eight_shards(self):
    _assert_close(*_run_ring("all", "zigzag", shards=8, L=64, block_q=3, block_kv=4, seed=2))



class RingAttentionSlowTest(parameterized.TestCase):
  """The mask features one at a time, every layout; 8 shards for the other layouts."""

  pytestmark = pytest.mark.slow

  @parameterized.named_parameters(*_cases(LAYOUTS, ("causal", "segments", "window")),
                                  *_cases(("contiguous", "striped"), ("none",)))
  def test_equals_oracle_one_feature(self, layout, kind):
    _assert_close(*_run_ring(kind, layout, shards=4, L=48, block_q=8, block_kv=6, seed=1))

  @parameterized.named_parameters(*((layout, layout) for layout in LAYOUTS))
  def test_eight_shards_causal(self, layout):
    with _plan_only():
      _assert_close(*_run_ring("causal", layout, shards=8, L=64, block_q=3, block_kv=4, seed=2))

  @parameterized.named_parameters(*_cases(LAYOUTS, ("segments",)))
  def test_dynamic_path_without_plans(self, layout, kind):
    """`hop_plans(False)`: the same causal calls through the position-mask path (what the benchmark compares)."""
    with ring_lib.hop_plans(False):
      _assert_close(*_run_ring(kind, layout, shards=4, L=48, block_q=8, block_kv=6, seed=1))


class LayoutTest(parameterized.TestCase):

  def test_permutations_by_hand(self):
    perm, inverse = ring_layout_permutation(8, 2, "zigzag")  # chunks of 2: shard 0 has 0 and 3, shard 1 has 1, 2
    np.testing.assert_array_equal(perm, [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(perm[inverse], np.arange(8))
    perm, _ = ring_layout_permutation(8, 2, "striped")
    np.testing.assert_array_equal(perm, [0, 2, 4, 6, 1, 3, 5, 7])
    perm, inverse = ring_layout_permutation(8, 2, "contiguous")
    np.testing.assert_array_equal(perm, np.arange(8))
    np.testing.assert_array_equal(inverse, np.arange(8))

  @parameterized.named_parameters(*((layout, layout) for layout in LAYOUTS))
  def test_inverse(self, layout):
    perm, inverse = ring_layout_permutation(96, 8, layout)
    np.testing.assert_array_equal(np.sort(perm), np.arange(96))
    np.testing.assert_array_equal(perm[inverse], np.arange(96))


class RingErrorsTest(parameterized.TestCase):

  def _call(self, **kwargs):
    q = jnp.zeros((B, 6, N, H))
    k = jnp.zeros((B, 6, K, H))
    spec = P("data", "seq")
    fn = jax.shard_map(lambda q, k: ring_attention(q, k, k, **kwargs), mesh=_mesh(4), in_specs=(spec, spec),
                       out_specs=spec)
    return fn(jnp.concatenate([q] * 4, 1), jnp.concatenate([k] * 4, 1))

  def test_bad_layout(self):
    with pytest.raises(ValueError, match="layout must be one of"):
      self._call(layout="spiral")

  def test_zigzag_needs_even_local_length(self):
    q = jnp.zeros((B, 20, N, H))
    spec = P("data", "seq")
    fn = jax.shard_map(lambda q: ring_attention(q, q[:, :, :K], q[:, :, :K]), mesh=_mesh(4), in_specs=spec,
                       out_specs=spec)
    with pytest.raises(ValueError, match="must be even"):
      fn(q)

  def test_data_mask_refused(self):
    with pytest.raises(ValueError, match="segment_ids="):
      self._call(mask=masks.KeyPadding(jnp.array([1])))

  def test_outside_shard_map(self):
    with pytest.raises(ValueError, match="inside jax.shard_map"):
      ring_attention(jnp.zeros((B, 4, N, H)), jnp.zeros((B, 4, K, H)), jnp.zeros((B, 4, K, H)))

  def test_bad_permutation_arguments(self):
    with pytest.raises(ValueError, match="not a multiple"):
      ring_layout_permutation(10, 4, "striped")
