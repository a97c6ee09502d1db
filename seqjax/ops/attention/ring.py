"""Ring attention: attention over a sequence sharded along a mesh axis, K/V blocks passed around the ring.

Legend: B batch, T / S the *local* query / key lengths (the global ones are P times larger), N query heads, K kv
heads, H head dim, P the number of shards on the ring (the size of mesh axis `axis_name`), r this shard's index.

Called inside `jax.shard_map` on the local shards q [B, T, N, H], k, v [B, S, K, H]. Hop h = 0 .. P-1: shard r
holds the K/V block of shard s = (r - h) mod P, runs the blockwise kernel (`blockwise.py`) on (local q, that
block) with the global positions of both, and merges the result into its running output by log-sum-exp:

    lse = logaddexp(lse, lse_h) ;  out = out e^(lse_old - lse) + out_h e^(lse_h - lse)

then passes the block to shard r + 1 (`lax.ppermute`, issued before the hop's compute so the two can overlap). The
hops run in a `fori_loop`, so per-device memory does not grow with P. Forward traffic: (P - 1) K/V blocks per shard.

Backward (`jax.custom_vjp`): a second ring pass. The forward saves only the output and the merged lse (O(T));
each hop recomputes its probabilities from them with the blockwise kernel's backward tiles, adds to the local dQ,
and adds to the dK/dV of the visiting block, which travel around the ring with their K/V block and arrive home
after one last hop. Traffic: (P - 1) (K/V + dK/dV) blocks, plus one dK/dV block.

Layouts (`layout`): how the global sequence is dealt to the shards, in the order the shards hold it (the caller
permutes the sequence; `ring_layout_permutation` gives the permutation and its inverse).
- "contiguous": shard r holds positions [r L, (r + 1) L). Causal work is unbalanced (shard P-1 does P hops of
  work, shard 0 one).
- "striped": shard r holds positions r, r + P, r + 2P, ... . Causal work balanced; every hop is a near-causal tile.
- "zigzag": the sequence cut into 2P chunks; shard r holds chunks r and 2P - 1 - r. Causal work balanced; every
  hop is the diagonal, or half of a full block.

Static hop plans (plain causal attention: `causal=True`, no `mask`, S = T; segment ids allowed). The hop kinds are
known per layout from r and the source shard s, so each hop picks one of a few branches with static shapes and
masks (`lax.switch`; `HOP_PLANS`), forward and backward:
- "contiguous": s = r the causal diagonal (`Causal()`), s < r the whole block (no mask), s > r nothing (skipped);
- "striped": s <= r `Causal()` (diagonal included), s > r strictly causal (`Causal(kv_offset=1)`);
- "zigzag": s = r `Causal()`; s < r every local query against the first half of the block, no mask; s > r the
  second half of the local queries against the whole block, no mask (half the work, no mask arithmetic).
Everything else (sliding windows, other position masks) takes the dynamic path: in every layout a shard's positions
increase with its row index, so a position mask (`masks.AtPositions`) finds a tile's span of positions from its
first and last rows: tiles and whole hops that a mask hides (future blocks under causal attention, blocks outside a
sliding window) are skipped at run time (`lax.cond`).

Masks: `causal`, `mask` (a position mask: `Causal`, `SlidingWindow`, `GlobalTokens`, `PrefixLM` and their `&`/`|`,
in global positions) and `segment_ids` (packed documents; the local [B, T] shard of the ids, which travel with K/V).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import check_inputs, default_scale
from seqjax.ops.attention.blockwise import (BLOCKWISE_BLOCK, _as_cols, _as_rows, _backward, _forward, _zero_cotangent,
                                            blockwise_attention, resolve_blocks)
from seqjax.ops.vma import vary_like

LAYOUTS = ("contiguous", "striped", "zigzag")


def _check_layout(layout: str, local_len: int, what: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"ring attention: layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "zigzag" and local_len % 2:
    raise ValueError(f"ring attention: the zigzag layout gives each shard two equal chunks, so the local {what} "
                     f"must be even, got {local_len}; use an even length or layout='striped'")


def shard_positions(layout: str, local_len: int, num_shards: int, shard, xp=jnp):
  """Global positions int32 [local_len] of the rows shard `shard` holds (`xp` = jnp for a traced shard, np)."""
  i = xp.arange(local_len, dtype=np.int32)
  if layout == "contiguous":
    return shard * local_len + i
  if layout == "striped":
    return i * num_shards + shard
  half = local_len // 2  # zigzag: chunks `shard` and 2P - 1 - `shard` of length half
  return xp.where(i < half, shard * half + i, (2 * num_shards - 1 - shard) * half + i - half).astype(np.int32)


def ring_layout_permutation(length: int, num_shards: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
  """(perm, inverse), int32 [length]: `x[..., perm, ...]` deals a sequence to the shards in `layout` (shard r gets
  the r-th of `num_shards` equal contiguous pieces of the result) and `y[..., inverse, ...]` undoes it.

  Apply `perm` to everything indexed by position (tokens, targets, positions, segment ids) before sharding along
  the ring axis. "contiguous" is the identity.
  """
  if not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
    raise ValueError(f"ring_layout_permutation: num_shards must be a positive int, got {num_shards!r}")
  if length % num_shards:
    raise ValueError(f"ring_layout_permutation: length {length} is not a multiple of the {num_shards} shards")
  local = length // num_shards
  _check_layout(layout, local, "length (length / num_shards)")
  perm = np.concatenate([shard_positions(layout, local, num_shards, r, np) for r in range(num_shards)])
  return perm.astype(np.int32), np.argsort(perm).astype(np.int32)


# ---- lse layouts: the kernel's [nq, B*K, G*bq] blocks <-> [B, T, N] ------------------------------------------------
def _lse_rows(lse_blocks, B, K, bq, T):
  nq, _, Gb = lse_blocks.shape
  G = Gb // bq
  return lse_blocks.reshape(nq, B, K, G, bq).transpose(1, 0, 4, 2, 3).reshape(B, nq * bq, K * G)[:, :T]


def _lse_blocks(lse_BTN, K, nq, bq):
  B, T, N = lse_BTN.shape
  lse_BTN = jnp.pad(lse_BTN, ((0, 0), (0, nq * bq - T), (0, 0)), constant_values=jnp.inf)
  return lse_BTN.reshape(B, nq, bq, K, N // K).transpose(1, 0, 3, 4, 2).reshape(nq, B * K, N // K * bq)


def _merge(out, lse, out_h, lse_h):
  """Log-sum-exp merge of two partial attentions (lse -inf: no visible key yet)."""
  lse_h = jnp.where(jnp.isinf(lse_h), -jnp.inf, lse_h)  # the kernel marks empty rows +inf
  m = jnp.maximum(lse, lse_h)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w, w_h = jnp.exp(lse - m), jnp.exp(lse_h - m)
  total = w + w_h
  safe = jnp.where(total == 0.0, 1.0, total)
  out = (out * w[..., None] + out_h * w_h[..., None]) / safe[..., None]
  return out, jnp.where(total == 0.0, -jnp.inf, m + jnp.log(safe))


class HopKind(NamedTuple):
  """A static kind of hop: which local query rows and visiting key rows it covers ("all", or the "first" / "second"
  half: zigzag's two chunks) and the position mask on those rows' local indices (None: every pair visible)."""
  name: str
  mask: masks_lib.Mask | None = None
  q_rows: str = "all"
  kv_rows: str = "all"


# Per layout, the kind of a hop whose block comes from (the diagonal s = r, an earlier shard s < r, a later s > r);
# None: the hop sees nothing and is skipped. Valid for plain causal attention with S = T (`_plan_for`).
HOP_PLANS: dict[str, tuple[HopKind | None, HopKind | None, HopKind | None]] = {
    "contiguous": (HopKind("diagonal", masks_lib.Causal()), HopKind("earlier block, whole"), None),
    "striped": (HopKind("diagonal", masks_lib.Causal()), HopKind("earlier shard, causal", masks_lib.Causal()),
                HopKind("later shard, strictly causal", masks_lib.Causal(kv_offset=1))),
    "zigzag": (HopKind("diagonal", masks_lib.Causal()), HopKind("earlier, first half of keys", kv_rows="first"),
               HopKind("later, second half of queries", q_rows="second")),
}
_ALL_ROWS = HopKind("dynamic")
_use_plans = True


@contextlib.contextmanager
def hop_plans(enabled: bool):
  """Within the block, ring attention traced here uses the static hop plans (True, the default) or always the
  dynamic position-mask path (False; for benchmarks and tests comparing the two)."""
  global _use_plans
  saved, _use_plans = _use_plans, bool(enabled)
  try:
    yield
  finally:
    _use_plans = saved


def hop_kind_index(r, s):
  """Index into a `HOP_PLANS` entry of the hop where shard r holds the block of shard s: 0 diagonal, 1 earlier,
  2 later (traced or NumPy ints)."""
  return jnp.where(s == r, 0, jnp.where(s < r, 1, 2)).astype(jnp.int32)


def _plan_for(layout, pos_mask, T, S):
  """The static hop plan that covers this call, or None (the dynamic path)."""
  causal = (isinstance(pos_mask, masks_lib.Causal) and isinstance(pos_mask.q_offset, int)
            and isinstance(pos_mask.kv_offset, int) and pos_mask.q_offset == 0 and pos_mask.kv_offset == 0)
  return HOP_PLANS[layout] if _use_plans and causal and T == S else None


def _row_slice(length, part):
  """The rows of `length` that `part` ("all", or the "first" / "second" half) names."""
  return {"all": slice(0, length), "first": slice(0, length // 2), "second": slice(length // 2, length)}[part]


def _rows_len(length, part):
  return len(range(length)[_row_slice(length, part)])


def _rows(x, part):
  """x's rows (axis 1) that `part` names."""
  return x if part == "all" else x[:, _row_slice(x.shape[1], part)]


def _add_rows(x, part, y):
  """x with y (holding the rows `part` names only) added to those rows."""
  return x + y if part == "all" else x.at[:, _row_slice(x.shape[1], part)].add(y)


def _set_rows(x, part, y):
  """x with the rows `part` names replaced by y."""
  return y if part == "all" else x.at[:, _row_slice(x.shape[1], part)].set(y)


class _Ring:
  """What every hop of one call shares: sizes, this shard's positions, the hop masks and the ring permutation."""

  def __init__(self, q, k, seg, pos_mask, axis_name, layout, bq, bk):
    self.B, self.T, self.N, _ = q.shape
    self.S, self.K = k.shape[1], k.shape[2]
    self.P = lax.axis_size(axis_name)
    self.r = lax.axis_index(axis_name)
    self.axis_name, self.layout, self.bq, self.bk = axis_name, layout, bq, bk
    self.seg, self.pos_mask = seg, pos_mask
    self.q_pos = shard_positions(layout, self.T, self.P, self.r)
    self.plan = _plan_for(layout, pos_mask, self.T, self.S)

  def blocks(self, kind):
    """Tile sides (bq, bk) of a hop of `kind`: the call's, capped at the rows the hop covers."""
    return min(self.bq, _rows_len(self.T, kind.q_rows)), min(self.bk, _rows_len(self.S, kind.kv_rows))

  def source(self, h):
    """The shard whose K/V block this shard holds at hop h."""
    return (self.r - h) % self.P

  def send(self, x):
    """Passes x (a pytree) to the next shard on the ring."""
    return lax.ppermute(x, self.axis_name, [(i, (i + 1) % self.P) for i in range(self.P)])

  def mask(self, h, kv_seg):
    """(mask of hop h, a traced bool that is False only if the hop sees nothing, or None)."""
    kv_pos = shard_positions(self.layout, self.S, self.P, self.source(h))
    mask = test = None
    if self.pos_mask is not None:
      mask = masks_lib.AtPositions(self.pos_mask, self.q_pos, kv_pos)
      test = mask.tile_maybe_visible(0, self.T, 0, self.S)
    if self.seg is not None:
      segments = masks_lib.SegmentIds(self.seg, kv_seg)
      mask = segments if mask is None else mask & segments
    return mask, test

  def hop(self, h, kv_seg, run, carry):
    """`run(kind, mask, carry)` for hop h: with a static plan, the branch of the hop's kind (`lax.switch`);
    otherwise the dynamic path."""
    if self.plan is None:
      return self.dynamic_hop(h, kv_seg, run, carry)
    kinds = sorted(set(self.plan), key=self.plan.index)  # distinct branches (striped's first two are alike)
    branch_of = np.array([kinds.index(kind) for kind in self.plan], np.int32)
    branches = [functools.partial(self.plan_branch, kind, kv_seg, run) for kind in kinds]
    index = jnp.asarray(branch_of)[hop_kind_index(self.r, self.source(h))]
    return branches[0](carry) if len(branches) == 1 else lax.switch(index, branches, carry)

  def plan_branch(self, kind, kv_seg, run, carry):
    """`run` for a hop of static `kind` (None: skipped), with the segment ids of the rows it covers."""
    if kind is None:
      return carry
    mask = kind.mask
    if self.seg is not None:
      segments = masks_lib.SegmentIds(_rows(self.seg, kind.q_rows), _rows(kv_seg, kind.kv_rows))
      mask = segments if mask is None else mask & segments
    return run(kind, mask, carry)

  def dynamic_hop(self, h, kv_seg, run, carry):
    """`run` on all rows with the hop's position mask, skipped (carry unchanged) when it shows the hop sees
    nothing."""
    mask, test = self.mask(h, kv_seg)
    if test is None:
      return run(_ALL_ROWS, mask, carry)
    return lax.cond(test, lambda c: run(_ALL_ROWS, mask, c), lambda c: c, carry)


def _ring_forward(q, k, v, seg, pos_mask, axis_name, layout, scale, bq, bk):
  ring = _Ring(q, k, seg, pos_mask, axis_name, layout, bq, bk)

  def compute(h, k, v, kv_seg, carry):
    def run(kind, mask, carry):
      bq_h, bk_h = ring.blocks(kind)
      q_h, k_h, v_h = _rows(q, kind.q_rows), _rows(k, kind.kv_rows), _rows(v, kind.kv_rows)
      out_h, lse_blocks, _ = _forward(q_h, k_h, v_h, mask, None, scale, bq_h, bk_h, out_dtype=jnp.float32)
      out, lse = carry
      merged = _merge(_rows(out, kind.q_rows), _rows(lse, kind.q_rows), out_h,
                      _lse_rows(lse_blocks, ring.B, ring.K, bq_h, q_h.shape[1]))
      return _set_rows(out, kind.q_rows, merged[0]), _set_rows(lse, kind.q_rows, merged[1])
    return ring.hop(h, kv_seg, run, carry)

  def body(h, loop_carry):
    k, v, kv_seg, carry = loop_carry
    k_next, v_next, seg_next = ring.send((k, v, kv_seg))  # overlaps with this hop's compute
    return k_next, v_next, seg_next, compute(h, k, v, kv_seg, carry)

  init = vary_like((jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32)),
                   q, k, v, seg, pos_mask, ring.q_pos)
  k, v, kv_seg, carry = lax.fori_loop(0, ring.P - 1, body, (k, v, seg, init))
  out, lse = compute(ring.P - 1, k, v, kv_seg, carry)
  return out.astype(q.dtype), jnp.where(jnp.isinf(lse), jnp.inf, lse)  # empty rows: +inf, as the kernel's


def _ring_backward(q, k, v, seg, pos_mask, out, lse, d_out, axis_name, layout, scale, bq, bk):
  ring = _Ring(q, k, seg, pos_mask, axis_name, layout, bq, bk)
  query_side = {}  # per query rows a hop covers: its blocked (scaled q, out, lse), computed once outside the loop
  for kind in (_ALL_ROWS,) if ring.plan is None else [kind for kind in ring.plan if kind is not None]:
    if kind.q_rows not in query_side:
      bq_h = ring.blocks(kind)[0]
      nq_h = -(-_rows_len(ring.T, kind.q_rows) // bq_h)
      query_side[kind.q_rows] = (_as_rows(_rows(q, kind.q_rows) * jnp.asarray(scale, q.dtype), ring.K, nq_h, bq_h),
                                 _as_rows(_rows(out, kind.q_rows), ring.K, nq_h, bq_h),
                                 _lse_blocks(_rows(lse, kind.q_rows), ring.K, nq_h, bq_h))

  def compute(h, k, v, kv_seg, grads):
    def run(kind, mask, grads):
      bq_h, bk_h = ring.blocks(kind)
      q_h, k_h, v_h = _rows(q, kind.q_rows), _rows(k, kind.kv_rows), _rows(v, kind.kv_rows)
      q_rows, out_rows, lse_blocks = query_side[kind.q_rows]
      nk_h = -(-k_h.shape[1] // bk_h)
      blocks = (q_rows, _as_cols(k_h, ring.K, nk_h, bk_h), _as_rows(v_h, ring.K, nk_h, bk_h), out_rows)
      dq_h, dk_h, dv_h = _backward(q_h, k_h, v_h, mask, None, scale, bq_h, bk_h, blocks, lse_blocks,
                                   _rows(d_out, kind.q_rows), grad_dtype=jnp.float32)
      dq, dk, dv = grads
      return (_add_rows(dq, kind.q_rows, dq_h), _add_rows(dk, kind.kv_rows, dk_h), _add_rows(dv, kind.kv_rows, dv_h))
    return ring.hop(h, kv_seg, run, grads)

  def body(h, loop_carry):
    k, v, kv_seg, dq, dk, dv = loop_carry
    k_next, v_next, seg_next = ring.send((k, v, kv_seg))
    dq, dk, dv = compute(h, k, v, kv_seg, (dq, dk, dv))
    dk, dv = ring.send((dk, dv))  # the block's gradients travel with it
    return k_next, v_next, seg_next, dq, dk, dv

  zeros = vary_like(tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v)), q, k, v, seg, pos_mask, d_out,
                    ring.q_pos)
  k, v, kv_seg, *grads = lax.fori_loop(0, ring.P - 1, body, (k, v, seg, *zeros))
  dq, dk, dv = compute(ring.P - 1, k, v, kv_seg, tuple(grads))
  dk, dv = ring.send((dk, dv))  # home: after P - 1 hops shard r holds the block of shard r + 1
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring(q, k, v, seg, pos_mask, axis_name, layout, scale, bq, bk):
  return _ring_forward(q, k, v, seg, pos_mask, axis_name, layout, scale, bq, bk)[0]


def _ring_fwd(q, k, v, seg, pos_mask, axis_name, layout, scale, bq, bk):
  out, lse = _ring_forward(q, k, v, seg, pos_mask, axis_name, layout, scale, bq, bk)
  return out, (q, k, v, seg, pos_mask, out, lse)


def _ring_bwd(axis_name, layout, scale, bq, bk, residuals, d_out):
  q, k, v, seg, pos_mask, out, lse = residuals
  dq, dk, dv = _ring_backward(q, k, v, seg, pos_mask, out, lse, d_out, axis_name, layout, scale, bq, bk)
  return dq, dk, dv, jax.tree.map(_zero_cotangent, seg), jax.tree.map(_zero_cotangent, pos_mask)


_ring.defvjp(_ring_fwd, _ring_bwd)


def split_segment_ids(mask: masks_lib.Mask | None) -> tuple[masks_lib.Mask | None, jax.Array | None]:
  """(position part, segment ids) of a self-attention mask `positions & SegmentIds(ids, ids)`, the form the
  context-parallel kernels take (`mask=`, `segment_ids=`); ValueError for a mask of another form."""
  parts = mask.masks if type(mask) is masks_lib.And else (() if mask is None else (mask,))
  segments = [m for m in parts if isinstance(m, masks_lib.SegmentIds)]
  rest = [m for m in parts if not isinstance(m, masks_lib.SegmentIds)]
  if (len(segments) > 1 or any(not masks_lib.is_positional(m) for m in rest)
      or any(m.q_ids is not m.kv_ids or m.padding_id != 0 for m in segments)):
    raise ValueError(f"context-parallel attention takes position masks and at most one self-attention "
                     f"SegmentIds(ids, ids) (padding id 0), combined with &; got {mask!r}")
  position = None if not rest else rest[0] if len(rest) == 1 else masks_lib.And(rest)
  return position, segments[0].q_ids if segments else None


def _check_context_parallel(name, q, k, v, mask, layout, segment_ids, axis_name):
  """Shared argument checks of `ring_attention` and `all_gather_attention`; returns the sizes."""
  dims = check_inputs(name, q, k, v, mask, None, array_bias=False)
  if mask is not None and not masks_lib.is_positional(mask):
    raise ValueError(f"{name}: mask must be a position mask (Causal, SlidingWindow, GlobalTokens, PrefixLM and "
                     f"their & / |) in global positions, got {mask!r}; pass packed-document ids as segment_ids=")
  _check_layout(layout, dims.T, "query length")
  _check_layout(layout, dims.S, "key length")
  if segment_ids is not None:
    if dims.S != dims.T or segment_ids.shape != (dims.B, dims.T):
      raise ValueError(f"{name}: segment_ids must be this shard's [B, T] = {(dims.B, dims.T)} ids of a "
                       f"self-attention (S = T = {dims.T}), got shape {segment_ids.shape} with S = {dims.S}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"{name}: segment_ids must be integers, got {segment_ids.dtype}")
  try:
    lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(f"{name}: no mesh axis {axis_name!r} is bound here; call it inside jax.shard_map over a mesh "
                     f"with that axis, on the local shards (or pass axis_name=)") from e
  return dims


def all_gather_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str = "seq", causal: bool = True,
                         layout: str = "zigzag", mask: masks_lib.Mask | None = None,
                         segment_ids: jax.Array | None = None, scale: float | None = None,
                         block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
  """`ring_attention`'s arguments and result, by gathering K/V (and segment ids) from every shard once.

  The simpler strategy for short contexts: one all-gather forward (its transpose, a reduce-scatter of dK/dV,
  backward) instead of P - 1 hops, at the price of holding the whole K/V on every device. The gathered keys are
  put back in sequence order, so the blockwise kernel sees increasing key positions whatever the layout.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  dims = _check_context_parallel("all_gather_attention", q, k, v, mask, layout, segment_ids, axis_name)
  P = lax.axis_size(axis_name)
  _, inverse = ring_layout_permutation(dims.S * P, P, layout)
  gather = lambda x: jnp.take(lax.all_gather(x, axis_name, axis=1, tiled=True), inverse, axis=1)  # noqa: E731
  k_all, v_all = gather(k), gather(v)
  pos_mask = masks_lib.combine(causal, mask)
  hop_mask = None
  if pos_mask is not None:
    q_pos = shard_positions(layout, dims.T, P, lax.axis_index(axis_name))
    hop_mask = masks_lib.AtPositions(pos_mask, q_pos, jnp.arange(dims.S * P, dtype=jnp.int32))
  if segment_ids is not None:
    segments = masks_lib.SegmentIds(segment_ids, gather(segment_ids))
    hop_mask = segments if hop_mask is None else hop_mask & segments
  return blockwise_attention(q, k_all, v_all, mask=hop_mask, scale=scale, block_q=block_q, block_kv=block_kv)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str = "seq", causal: bool = True,
                   layout: str = "zigzag", mask: masks_lib.Mask | None = None,
                   segment_ids: jax.Array | None = None, scale: float | None = None, block_q: int | None = None,
                   block_kv: int | None = None) -> jax.Array:
  """Attention over a sequence sharded along mesh axis `axis_name`; call inside `jax.shard_map`.

  Args:
    q: this shard's queries [B, T, N, H] (T = global length / P, in `layout` order).
    k, v: this shard's keys and values [B, S, K, H], N a multiple of K (grouped-query attention).
    axis_name: the mesh axis the sequence is sharded over (the ring).
    causal: add `masks.Causal()` (in global positions). Causal without `mask` (segment ids allowed) runs the
      layout's static hop plan (`HOP_PLANS`; `hop_plans(False)` turns it off); anything else the dynamic path.
    layout: "contiguous", "striped" or "zigzag" (default; balanced causal work): the order the shards hold the
      sequence in; permute inputs with `ring_layout_permutation` (and outputs back with its inverse).
    mask: a position mask in global positions (`masks.SlidingWindow(w - 1, 0)` for a causal window of w keys,
      `GlobalTokens`, `PrefixLM`, ...); hops it hides entirely are skipped.
    segment_ids: this shard's int [B, T] ids of packed documents (0 = padding), for self-attention (S = T).
    scale: score scale, default 1 / sqrt(H).
    block_q, block_kv: the blockwise kernel's tile sides (defaults as `blockwise_attention`, over local lengths).

  Returns:
    [B, T, N, H] in q's dtype: this shard's rows of the attention over the whole sequence.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  dims = _check_context_parallel("ring_attention", q, k, v, mask, layout, segment_ids, axis_name)
  pos_mask = masks_lib.combine(causal, mask)
  bq, bk = resolve_blocks(dims.T, dims.S, block_q, block_kv, largest=(BLOCKWISE_BLOCK, BLOCKWISE_BLOCK))
  return _ring(q, k, v, segment_ids, pos_mask, axis_name, layout, float(default_scale(scale, dims.H)), bq, bk)
