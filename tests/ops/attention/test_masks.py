"""Mask objects: exact visibility against numpy oracles, tile answers consistent with it, pytree behaviour."""

import itertools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops.attention import masks
from seqjax.ops.attention.ring import shard_positions as ring_shard_positions

T, S = 13, 11


def _seg(rng, b, n):
  """Sorted packed segment ids with some trailing padding (0)."""
  ids = np.sort(rng.integers(1, 4, size=(b, n)), axis=1)
  ids[:, n - 2:] = 0
  return ids


def _oracle(name, q_off=0, kv_off=0):
  """(mask object, numpy bool [B or 1, T, S]) for one mask kind."""
  rng = np.random.default_rng(0)
  qp = np.arange(T)[:, None] + q_off
  kp = np.arange(S)[None, :] + kv_off
  if name == "causal":
    return masks.Causal(q_off, kv_off), (kp <= qp)[None]
  if name == "window":
    return masks.SlidingWindow(3, 1, q_off, kv_off), ((kp - qp >= -3) & (kp - qp <= 1))[None]
  if name == "window_left_only":
    return masks.SlidingWindow(None, 2, q_off, kv_off), (kp - qp <= 2)[None]
  if name == "global":
    return masks.GlobalTokens(2, q_off, kv_off), ((qp < 2) | (kp < 2))[None]
  if name == "segments":
    q_ids, kv_ids = _seg(rng, 2, T), _seg(rng, 2, S)
    want = (q_ids[:, :, None] == kv_ids[:, None, :]) & (q_ids[:, :, None] != 0)
    return masks.SegmentIds(jnp.asarray(q_ids), jnp.asarray(kv_ids)), want
  if name == "key_padding":
    lengths = np.array([4, 11])
    return masks.KeyPadding(jnp.asarray(lengths)), np.broadcast_to(
        np.arange(S)[None, None, :] < lengths[:, None, None], (2, T, S))
  if name == "prefix":
    prefix = np.array([0, 6])
    want = (kp <= qp)[None] | (kp[None] < prefix[:, None, None])
    return masks.PrefixLM(jnp.asarray(prefix), q_off, kv_off), want
  raise AssertionError(name)


KINDS = ["causal", "window", "window_left_only", "global", "segments", "key_padding", "prefix"]
POSITIONAL = ["causal", "window", "window_left_only", "global", "prefix"]


def _combos():
  yield "causal&segments", lambda: _pair("causal", "segments", "and")
  yield "window|global", lambda: _pair("window", "global", "or")
  yield "causal&(window|global)", lambda: _triple()
  yield "prefix&key_padding", lambda: _pair("prefix", "key_padding", "and")


def _pair(a, b, op):
  (ma, wa), (mb, wb) = _oracle(a), _oracle(b)
  return (ma & mb, wa & wb) if op == "and" else (ma | mb, wa | wb)


def _triple():
  (mc, wc), (mw, ww), (mg, wg) = _oracle("causal"), _oracle("window"), _oracle("global")
  return mc & (mw | mg), wc & (ww | wg)


def _all_cases():
  for name in KINDS:
    yield name, lambda name=name: _oracle(name)
  for name in POSITIONAL:
    yield name + "@offsets", lambda name=name: _oracle(name, q_off=5, kv_off=2)
  yield from _combos()


CASES = dict(_all_cases())


@pytest.mark.parametrize("case", sorted(CASES))
def test_materialize_matches_oracle(case):
  mask, want = CASES[case]()
  got = np.asarray(mask.materialize(T, S))
  assert got.ndim == 4 and got.shape[1] == 1 and got.shape[2:] == (T, S)
  np.testing.assert_array_equal(np.broadcast_to(got[:, 0], np.broadcast_shapes(got[:, 0].shape, want.shape)),
                                np.broadcast_to(want, np.broadcast_shapes(got[:, 0].shape, want.shape)))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("bq,bk", [(4, 3), (5, 5), (1, 2)])
def test_tile_answers_are_consistent(case, bq, bk):
  """EMPTY tiles have no visible pair, FULL tiles only visible pairs; a False dynamic test means empty."""
  mask, _ = CASES[case]()
  dense = np.asarray(mask.materialize(T, S)).any(axis=(0, 1)), np.asarray(mask.materialize(T, S)).all(axis=(0, 1))
  q_lo = np.arange(0, T, bq)
  kv_lo = np.arange(0, S, bk)
  kinds = mask.tile_kinds(q_lo[:, None], np.minimum(q_lo + bq, T)[:, None], kv_lo[None], np.minimum(kv_lo + bk, S)[None])
  assert kinds.shape == (len(q_lo), len(kv_lo))
  saw_nonpartial = False
  for (i, qs), (j, ks) in itertools.product(enumerate(q_lo), enumerate(kv_lo)):
    any_visible = dense[0][qs:qs + bq, ks:ks + bk].any()
    all_visible = dense[1][qs:qs + bq, ks:ks + bk].all()
    if kinds[i, j] == masks.EMPTY:
      assert not any_visible, (i, j)
    if kinds[i, j] == masks.FULL:
      assert all_visible, (i, j)
    saw_nonpartial |= kinds[i, j] != masks.PARTIAL
    maybe = mask.tile_maybe_visible(jnp.int32(qs), min(bq, T - qs), jnp.int32(ks), min(bk, S - ks))
    if maybe is not None and not bool(maybe):
      assert not any_visible, (i, j)
  if case in ("causal", "window", "causal&segments"):
    assert saw_nonpartial  # static classification actually decides something for position masks


class MaterializeVariantsTest(chex.TestCase):
  """A mask is a pytree: jitted (traced ids and offsets) it materialises the same visibility as eagerly."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("causal&segments", "causal&(window|global)", "prefix&key_padding", "window@offsets")
  def test_materialize_matches_oracle(self, case):
    mask, want = CASES[case]()
    got = self.variant(lambda m: m.materialize(T, S))(mask)
    chex.assert_rank(got, 4)
    chex.assert_type(got, bool)
    np.testing.assert_array_equal(np.broadcast_to(got[:, 0], np.broadcast_shapes(got[:, 0].shape, want.shape)),
                                  np.broadcast_to(want, np.broadcast_shapes(got[:, 0].shape, want.shape)))


def test_causal_tile_kinds_exact():
  kinds = masks.Causal().tile_kinds(np.arange(0, 12, 4)[:, None], np.arange(4, 16, 4)[:, None],
                                    np.arange(0, 12, 4)[None], np.arange(4, 16, 4)[None])
  np.testing.assert_array_equal(kinds, [[1, 0, 0], [2, 1, 0], [2, 2, 1]])


def test_traced_offsets_are_children_static_offsets_are_aux():
  assert jax.tree.leaves(masks.Causal()) == []
  assert len(jax.tree.leaves(masks.Causal(q_offset=jnp.int32(3)))) == 1
  # Traced offsets: no static knowledge, exact materialisation.
  traced = masks.Causal(q_offset=jnp.int32(3))
  assert (traced.tile_kinds(0, 4, 0, 4) == masks.PARTIAL).all()
  np.testing.assert_array_equal(traced.materialize(4, 8), masks.Causal(3).materialize(4, 8))


def test_masks_pass_through_jit_without_retracing():
  traces = []

  @jax.jit
  def f(m):
    traces.append(1)
    return m.materialize(5, 5)

  ids = jnp.array([[1, 1, 2, 2, 0]])
  a = f(masks.Causal() & masks.SegmentIds(ids, ids))
  b = f(masks.Causal() & masks.SegmentIds(ids + 1, ids + 1))
  assert len(traces) == 1
  assert not np.array_equal(a, b)  # padding id 0 became segment 1 in the second call


def test_shift_moves_positions():
  np.testing.assert_array_equal(masks.Causal().shift(q_offset=4).materialize(3, 9), masks.Causal(4).materialize(3, 9))
  combined = (masks.Causal() & masks.SlidingWindow(2, 0)).shift(q_offset=4)
  want = masks.Causal(4).materialize(3, 9) & masks.SlidingWindow(2, 0, q_offset=4).materialize(3, 9)
  np.testing.assert_array_equal(combined.materialize(3, 9), want)


def test_segment_padding_semantics():
  ids = jnp.array([[0, 0, 1]])
  m = np.asarray(masks.SegmentIds(ids, ids).materialize(3, 3))[0, 0]
  np.testing.assert_array_equal(m, [[0, 0, 0], [0, 0, 0], [0, 0, 1]])
  m = np.asarray(masks.SegmentIds(ids, ids, padding_id=None).materialize(3, 3))[0, 0]
  np.testing.assert_array_equal(m, [[1, 1, 0], [1, 1, 0], [0, 0, 1]])


def test_and_or_flatten():
  m = masks.Causal() & masks.SlidingWindow(2, 0) & masks.GlobalTokens(1)
  assert isinstance(m, masks.And) and len(m.masks) == 3
  o = masks.SlidingWindow(2, 0) | masks.GlobalTokens(1)
  combined = masks.Causal() & o
  assert len(combined.masks) == 2 and isinstance(combined.masks[1], masks.Or)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="left"):
    masks.SlidingWindow(-1, 0)
  with pytest.raises(ValueError, match="SegmentIds"):
    masks.SegmentIds(jnp.zeros((2, 3)), jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match="mask objects"):
    masks.Causal() & jnp.ones((3, 3), bool)
  with pytest.raises(ValueError, match="kv_ids"):
    masks.SegmentIds(jnp.zeros((2, 3)), jnp.zeros((2, 4))).check(2, 3, 5)


@pytest.mark.parametrize("layout", ["striped", "zigzag"])
@pytest.mark.parametrize("inner", ["causal", "window", "causal&(window|global)", "prefix"])
def test_at_positions_is_the_inner_mask_at_those_positions(layout, inner):
  """AtPositions (ring hops): visibility = the inner mask on the position grid; a False tile test means empty.

  Catches a span test that reads the wrong end of a tile (it would skip tiles with visible pairs)."""
  inner_mask = {"causal": masks.Causal(), "window": masks.SlidingWindow(5, 1),
                "causal&(window|global)": masks.Causal() & (masks.SlidingWindow(3, 0) | masks.GlobalTokens(2)),
                "prefix": masks.PrefixLM(jnp.array([7, 0]))}[inner]
  shards, local = 4, 12
  for r, s in itertools.product(range(shards), repeat=2):
    q_pos = np.asarray(ring_shard_positions(layout, local, shards, r, np))
    kv_pos = np.asarray(ring_shard_positions(layout, local, shards, s, np))
    mask = masks.AtPositions(inner_mask, q_pos, kv_pos)
    got = np.asarray(mask.materialize(local, local))
    want = np.asarray(inner_mask.materialize(4 * local, 4 * local))[:, :, q_pos][:, :, :, kv_pos]
    np.testing.assert_array_equal(got, np.broadcast_to(want, got.shape))
    for qs, ks in itertools.product(range(0, local, 5), range(0, local, 3)):
      maybe = mask.tile_maybe_visible(jnp.int32(qs), min(5, local - qs), jnp.int32(ks), min(3, local - ks))
      if not bool(maybe):
        assert not got[:, :, qs:qs + 5, ks:ks + 3].any(), (r, s, qs, ks)


def test_at_positions_refuses_data_masks():
  with pytest.raises(ValueError, match="position mask"):
    masks.AtPositions(masks.KeyPadding(jnp.array([3])), np.arange(4), np.arange(4))
