"""Blockwise (flash-style) attention: tiles, an online softmax, tile skipping, and a memory-efficient backward.

Legend: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim; a tile is `bq` queries x
`bk` keys, `nq` / `nk` the numbers of query / key blocks.

Forward. Queries are cut into `nq` blocks; for each block a loop visits only the key blocks the mask does not rule
out (`mask.tile_kinds` decides EMPTY / PARTIAL / FULL at trace time, so causal attention visits about half of the
tiles), keeping the running max `m`, normaliser `l` and the unnormalised output in float32:

    s = q_i k_j^T (+ bias tile) ; m' = max(m, rowmax s) ; l = l e^(m - m') + rowsum e^(s - m')
    acc = acc e^(m - m') + e^(s - m') v_j

FULL tiles skip the mask arithmetic; PARTIAL tiles evaluate `mask.block` on the tile (and, when the mask has a
cheap run-time test such as segment-id ranges, skip the tile if it is provably empty). Only O(T) state is stored:
the output and the log-sum-exp `lse = m + log l` per query row.

Backward (`jax.custom_vjp`). One pass over key blocks; for each, a loop over the query blocks that see it recomputes
`p = exp(s - lse)` from the saved lse, and accumulates dV_j += p^T dO, dK_j += dS^T q, dQ_i += dS k_j with
dS = p * (dO v_j^T - rowsum(dO * out)). Memory stays O(T) (no T x S array); the five matmuls per tile match the
flash-attention count.

Rows with no visible key: `l = 0` gives an output of 0 and `lse = +inf`, so their backward probabilities are 0 too.
Masks and per-tile biases (ALiBi) are treated as constants (zero cotangents).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops import masks as masks_lib
from seqjax.ops.attention_base import check_inputs, default_scale, group_heads, register_attention

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_KV = 256
MIN_DEFAULT_BLOCK = 64
_M_INIT = -1e30  # running-max initial value: finite, so a fully masked tile never yields (-inf) - (-inf)


class Plan(NamedTuple):
  """The static tile schedule. For each query block: the key blocks to visit without and with masking (padded
  index tables + counts); and the transpose (for each key block, the query blocks) for the backward pass."""
  full_kv: np.ndarray     # int32 [nq, max(1, most full tiles in a row)]
  n_full_kv: np.ndarray   # int32 [nq]
  part_kv: np.ndarray     # int32 [nq, ...]
  n_part_kv: np.ndarray   # int32 [nq]
  full_q: np.ndarray      # int32 [nk, ...]
  n_full_q: np.ndarray    # int32 [nk]
  part_q: np.ndarray      # int32 [nk, ...]
  n_part_q: np.ndarray    # int32 [nk]
  visited_tiles: int      # tiles computed (for FLOP accounting and tests)


def _tables(kinds: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row of `kinds`, the column indices equal to `kind`, left-aligned in a padded table, and their counts."""
  hit = kinds == kind
  counts = hit.sum(axis=1).astype(np.int32)
  table = np.zeros((kinds.shape[0], max(1, int(counts.max(initial=0)))), np.int32)
  for row in range(kinds.shape[0]):
    cols = np.nonzero(hit[row])[0]
    table[row, :len(cols)] = cols
  return table, counts


def make_plan(mask: masks_lib.Mask | None, T: int, S: int, bq: int, bk: int) -> Plan:
  """Classifies every (query block, key block) tile with the mask's static knowledge; builds the loop tables."""
  nq, nk = -(-T // bq), -(-S // bk)
  q_lo, kv_lo = np.arange(nq) * bq, np.arange(nk) * bk
  if mask is None:
    kinds = np.full((nq, nk), masks_lib.FULL, np.int8)
  else:
    kinds = mask.tile_kinds(q_lo[:, None], np.minimum(q_lo + bq, T)[:, None], kv_lo[None, :],
                            np.minimum(kv_lo + bk, S)[None, :])
    kinds = np.broadcast_to(kinds, (nq, nk)).copy()
  if S % bk:  # the last key block holds padding keys that must be masked out
    kinds[:, -1] = np.minimum(kinds[:, -1], masks_lib.PARTIAL)
  full_kv, n_full_kv = _tables(kinds, masks_lib.FULL)
  part_kv, n_part_kv = _tables(kinds, masks_lib.PARTIAL)
  full_q, n_full_q = _tables(kinds.T, masks_lib.FULL)
  part_q, n_part_q = _tables(kinds.T, masks_lib.PARTIAL)
  return Plan(full_kv, n_full_kv, part_kv, n_part_kv, full_q, n_full_q, part_q, n_part_q,
              int((kinds != masks_lib.EMPTY).sum()))


class _Tiles:
  """Per-tile score computation shared by the forward and backward passes."""

  def __init__(self, mask, bias, T, S, bq, bk, K):
    self.mask, self.bias, self.T, self.S, self.bq, self.bk, self.K = mask, bias, T, S, bq, bk, K
    self.kv_padded = S % bk != 0

  def scores(self, q_tile, k_tile, i, j, masked):
    """Scores float32 [B, K, G, bq, bk] of query block i (pre-scaled) against key block j; -inf where hidden."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", q_tile, k_tile, preferred_element_type=jnp.float32)
    q_idx = i * self.bq + jnp.arange(self.bq, dtype=jnp.int32)
    kv_idx = j * self.bk + jnp.arange(self.bk, dtype=jnp.int32)
    if self.bias is not None:
      s = s + group_heads(self.bias.block(q_idx, kv_idx).astype(jnp.float32), self.K)
    if masked:
      visible = jnp.ones((1, 1, 1, 1, self.bk), bool)
      if self.mask is not None:
        visible = self.mask.block(q_idx, kv_idx)[:, :, None]
      if self.kv_padded:
        visible = visible & (kv_idx < self.S)
      s = jnp.where(visible, s, -jnp.inf)
    return s

  def maybe_visible(self, i, j):
    if self.mask is None:
      return None
    return self.mask.tile_maybe_visible(i * self.bq, self.bq, j * self.bk, self.bk)


def _loop(count, body, carry, tiles, i_or_j, table, transpose):
  """Runs `body(carry, i, j)` over the tiles listed in `table[:count]`, skipping run-time-empty tiles."""

  def step(t, carry):
    other = table[t]
    i, j = (other, i_or_j) if transpose else (i_or_j, other)
    test = tiles.maybe_visible(i, j) if body.masked else None
    if test is None:
      return body(carry, i, j)
    return jax.lax.cond(test, lambda c: body(c, i, j), lambda c: c, carry)

  return jax.lax.fori_loop(0, count, step, carry)


def _as_blocks(x_BLNH, K, n_blocks, block):
  """[B, L, N, H] -> [n_blocks, B, K, N // K, block, H] (zero-padded along L)."""
  B, L, N, H = x_BLNH.shape
  x_BLNH = jnp.pad(x_BLNH, ((0, 0), (0, n_blocks * block - L), (0, 0), (0, 0)))
  return x_BLNH.reshape(B, n_blocks, block, K, N // K, H).transpose(1, 0, 3, 4, 2, 5)


def _from_blocks(x_nBKGbH, L):
  """Inverse of `_as_blocks`: [n, B, K, G, b, H] -> [B, L, K * G, H]."""
  n, B, K, G, b, H = x_nBKGbH.shape
  return x_nBKGbH.transpose(1, 0, 4, 2, 3, 5).reshape(B, n * b, K * G, H)[:, :L]


def _forward(q, k, v, mask, bias, scale, bq, bk):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  plan = make_plan(mask, T, S, bq, bk)
  nq, nk = len(plan.n_full_kv), len(plan.n_full_q)
  tiles = _Tiles(mask, bias, T, S, bq, bk, K)
  q_blocks = _as_blocks(q * jnp.asarray(scale, q.dtype), K, nq, bq)     # [nq, B, K, G, bq, H]
  k_blocks = _as_blocks(k, K, nk, bk)[:, :, :, 0]                       # [nk, B, K, bk, H]
  v_blocks = _as_blocks(v, K, nk, bk)[:, :, :, 0]

  def make_body(q_tile, masked):
    def body(carry, i, j):
      acc, m, l = carry
      s = tiles.scores(q_tile, k_blocks[j], i, j, masked)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      l = l * alpha + p.sum(axis=-1)
      acc = acc * alpha[..., None] + jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_blocks[j],
                                                preferred_element_type=jnp.float32)
      return acc, m_new, l
    body.masked = masked
    return body

  def one_q_block(xs):
    i, q_tile, full_kv, n_full, part_kv, n_part = xs
    stats_shape = q_tile.shape[:-1]
    carry = (jnp.zeros(q_tile.shape, jnp.float32), jnp.full(stats_shape, _M_INIT, jnp.float32),
             jnp.zeros(stats_shape, jnp.float32))
    carry = _loop(n_full, make_body(q_tile, False), carry, tiles, i, full_kv, transpose=False)
    carry = _loop(n_part, make_body(q_tile, True), carry, tiles, i, part_kv, transpose=False)
    acc, m, l = carry
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out.astype(q.dtype), lse

  out_blocks, lse_blocks = jax.lax.map(
      one_q_block, (jnp.arange(nq, dtype=jnp.int32), q_blocks, plan.full_kv, plan.n_full_kv, plan.part_kv,
                    plan.n_part_kv))
  return _from_blocks(out_blocks, T), lse_blocks  # lse: float32 [nq, B, K, G, bq]


def _backward(q, k, v, mask, bias, scale, bq, bk, out, lse_blocks, d_out):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  plan = make_plan(mask, T, S, bq, bk)
  nq, nk = len(plan.n_full_kv), len(plan.n_full_q)
  tiles = _Tiles(mask, bias, T, S, bq, bk, K)
  q_blocks = _as_blocks(q * jnp.asarray(scale, q.dtype), K, nq, bq)
  do_blocks = _as_blocks(d_out.astype(q.dtype), K, nq, bq)
  delta_blocks = jnp.sum(_as_blocks(d_out.astype(jnp.float32) * out.astype(jnp.float32), K, nq, bq), axis=-1)
  k_blocks = _as_blocks(k, K, nk, bk)[:, :, :, 0]
  v_blocks = _as_blocks(v, K, nk, bk)[:, :, :, 0]

  def make_body(k_tile, v_tile, masked):
    def body(carry, i, j):
      dk, dv, dq_blocks = carry
      q_tile, do_tile = q_blocks[i], do_blocks[i]
      s = tiles.scores(q_tile, k_tile, i, j, masked)
      p = jnp.exp(s - lse_blocks[i][..., None])
      dv = dv + jnp.einsum("bkgqs,bkgqh->bksh", p.astype(v.dtype), do_tile, preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqh,bksh->bkgqs", do_tile, v_tile, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_blocks[i][..., None])).astype(q.dtype)
      dk = dk + jnp.einsum("bkgqs,bkgqh->bksh", ds, q_tile, preferred_element_type=jnp.float32)
      dq_tile = jnp.einsum("bkgqs,bksh->bkgqh", ds, k_tile, preferred_element_type=jnp.float32)
      dq_blocks = dq_blocks.at[i].add(dq_tile)
      return dk, dv, dq_blocks
    body.masked = masked
    return body

  def one_kv_block(dq_blocks, xs):
    j, k_tile, v_tile, full_q, n_full, part_q, n_part = xs
    carry = (jnp.zeros(k_tile.shape, jnp.float32), jnp.zeros(v_tile.shape, jnp.float32), dq_blocks)
    carry = _loop(n_full, make_body(k_tile, v_tile, False), carry, tiles, j, full_q, transpose=True)
    carry = _loop(n_part, make_body(k_tile, v_tile, True), carry, tiles, j, part_q, transpose=True)
    dk, dv, dq_blocks = carry
    return dq_blocks, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq_blocks = jnp.zeros(q_blocks.shape, jnp.float32)
  dq_blocks, (dk_blocks, dv_blocks) = jax.lax.scan(
      one_kv_block, dq_blocks, (jnp.arange(nk, dtype=jnp.int32), k_blocks, v_blocks, plan.full_q, plan.n_full_q,
                                plan.part_q, plan.n_part_q))
  dq = (_from_blocks(dq_blocks, T) * scale).astype(q.dtype)
  dk = _from_blocks(dk_blocks[:, :, :, None], S).astype(k.dtype)
  dv = _from_blocks(dv_blocks[:, :, :, None], S).astype(v.dtype)
  return dq, dk, dv


def _zero_cotangent(x: Any) -> Any:
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, mask, bias, scale, bq, bk):
  return _forward(q, k, v, mask, bias, scale, bq, bk)[0]


def _flash_fwd(q, k, v, mask, bias, scale, bq, bk):
  out, lse = _forward(q, k, v, mask, bias, scale, bq, bk)
  return out, (q, k, v, mask, bias, out, lse)


def _flash_bwd(scale, bq, bk, residuals, d_out):
  q, k, v, mask, bias, out, lse = residuals
  dq, dk, dv = _backward(q, k, v, mask, bias, scale, bq, bk, out, lse, d_out)
  return dq, dk, dv, jax.tree.map(_zero_cotangent, mask), jax.tree.map(_zero_cotangent, bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


def resolve_blocks(T: int, S: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
  """Block sizes actually used: the defaults (or the given sizes) capped at the sequence lengths."""
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b is not None and (not isinstance(b, (int, np.integer)) or b <= 0):
      raise ValueError(f"blockwise_attention: {name} must be a positive int or None, got {b!r}")
  # Short sequences still get >= 4 tiles per axis (down to 64), so causal / sparse masks can skip tiles.
  return (min(block_q or _default_block(T, DEFAULT_BLOCK_Q), T),
          min(block_kv or _default_block(S, DEFAULT_BLOCK_KV), S))


def _default_block(length: int, largest: int) -> int:
  return min(largest, max(MIN_DEFAULT_BLOCK, length // 4))


@register_attention("blockwise")
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                        mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None,
                        block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
  """Flash-style attention with tile skipping and an O(T)-memory custom_vjp backward.

  Args:
    q: queries [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (no K/V repetition).
    causal: add `masks.Causal()` to `mask`.
    mask: a `seqjax.ops.masks` object; its static tile answers decide which tiles are computed.
    bias: None or a per-tile bias object (`positions.AlibiBias`); bias arrays need the reference kernel.
    scale: score scale, default 1 / sqrt(H).
    block_q, block_kv: tile sizes (default min(256, max(64, length // 4)), capped at T and S). T and S need
      not be multiples.

  Returns:
    [B, T, N, H] in q's dtype (softmax statistics and accumulators in float32); rows with no visible key are 0.
  """
  dims = check_inputs("blockwise_attention", q, k, v, mask, bias, array_bias=False)
  mask = masks_lib.combine(causal, mask)
  bq, bk = resolve_blocks(dims.T, dims.S, block_q, block_kv)
  return _flash(q, k, v, mask, bias, float(default_scale(scale, dims.H)), bq, bk)
