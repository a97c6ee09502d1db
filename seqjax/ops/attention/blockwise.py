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
the *transposed* probabilities `p^T = exp(k_j q_i^T - lse)` from the saved lse and accumulates

    dV_j += p^T dO_i ;  dS^T = p^T * (v_j dO_i^T - rowsum(dO * out)) ;  dK_j += dS^T q_i ;  dQ_i^T += k_j^T dS^T

Working key-major makes all five matmuls plain [m, c] x [c, n] products on row-major tiles: q and dO are kept both
as rows and as columns (O(T) each), so is k (the forward's q_i k_j^T uses the columns too), and dQ is accumulated
transposed, so no tile is transposed inside the loops (contracting the query-major p and dS over queries made XLA transpose both
per tile). Memory stays O(T) (no T x S array); the five matmuls per tile match the flash-attention count.

Layout. Tiles are 3-D with the batch and kv heads as one batch axis and the G query heads of a kv group folded
into the query rows: q rows [B * K, G * bq, H], k rows [B * K, bk, H] (grouped-query attention never repeats K/V).

Rows with no visible key: `l = 0` gives an output of 0 and `lse = +inf`, so their backward probabilities are 0 too.
Masks and per-tile biases (ALiBi) are treated as constants (zero cotangents).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops import backend
from seqjax.ops.vma import vary_like
from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import check_inputs, default_scale, group_heads, register_attention

DEFAULT_BLOCK_Q = 256   # largest default tile sides for `resolve_blocks` callers (the Pallas kernel)
DEFAULT_BLOCK_KV = 256
# This kernel's largest default tile side on CPU. XLA runs each tile's batched matmuls on one core below roughly
# this size; 512 x 512 tiles (B=1, N=8, H=64) let it use both cores of the benchmark machine: fwd+bwd 1.6x faster
# than 256 x 256 at T=4096 and 1.8x at T=16384 on an idle machine (4-7% slower when the other core is busy).
BLOCKWISE_BLOCK = 512
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
  """Per-tile scores shared by the forward and backward passes. Tiles are 3-D: batch dimension B * K, and the G
  query heads of a kv group folded into the query rows (row g * bq + t)."""

  def __init__(self, mask, bias, B, T, S, bq, bk, K, G):
    self.mask, self.bias = mask, bias
    self.B, self.T, self.S, self.bq, self.bk, self.K, self.G = B, T, S, bq, bk, K, G
    self.kv_padded = S % bk != 0

  def _indices(self, i, j):
    return (i * self.bq + jnp.arange(self.bq, dtype=jnp.int32), j * self.bk + jnp.arange(self.bk, dtype=jnp.int32))

  def _visible(self, q_idx, kv_idx):
    """bool [B or 1, 1, bq, bk], or None when every pair of the tile is visible."""
    visible = None if self.mask is None else self.mask.block(q_idx, kv_idx)
    if self.kv_padded:
      in_range = (kv_idx < self.S)[None, None, None, :]
      visible = in_range if visible is None else visible & in_range
    return visible

  def scores(self, q_rows, kT, i, j, masked):
    """Scores float32 [B*K, G*bq, bk] of query block i (pre-scaled rows) against key block j (kT [B*K, H, bk]);
    -inf where hidden."""
    s = jnp.einsum("arh,ahs->ars", q_rows, kT, preferred_element_type=jnp.float32)
    if self.bias is None and not masked:
      return s
    q_idx, kv_idx = self._indices(i, j)
    s = s.reshape(self.B, self.K, self.G, self.bq, self.bk)
    if self.bias is not None:
      s = s + group_heads(self.bias.block(q_idx, kv_idx).astype(jnp.float32), self.K)
    if masked:
      visible = self._visible(q_idx, kv_idx)
      if visible is not None:
        s = jnp.where(visible[:, :, None], s, -jnp.inf)
    return s.reshape(s.shape[0] * self.K, self.G * self.bq, self.bk)

  def probabilities_t(self, k_rows, qT, lse, i, j, masked):
    """Transposed probabilities p^T = exp(k q^T - lse) float32 [B*K, bk, G*bq] of key block j against query
    block i (qT [B*K, H, G*bq], lse [B*K, G*bq]); 0 where hidden."""
    sT = jnp.einsum("ash,ahr->asr", k_rows, qT, preferred_element_type=jnp.float32)
    if self.bias is None and not masked:
      return jnp.exp(sT - lse[:, None, :])
    q_idx, kv_idx = self._indices(i, j)
    sT = sT.reshape(self.B, self.K, self.bk, self.G, self.bq)
    if self.bias is not None:
      bias = group_heads(self.bias.block(q_idx, kv_idx).astype(jnp.float32), self.K)  # [B, K|1, G|1, bq, bk]
      sT = sT + jnp.moveaxis(bias, -1, 2)
    if masked:
      visible = self._visible(q_idx, kv_idx)
      if visible is not None:
        sT = jnp.where(jnp.swapaxes(visible, -1, -2)[:, :, :, None, :], sT, -jnp.inf)
    pT = jnp.exp(sT - lse.reshape(-1, self.K, 1, self.G, self.bq))  # hidden: exp(-inf - lse) = 0, lse may be +inf
    return pT.reshape(pT.shape[0] * self.K, self.bk, self.G * self.bq)

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


def _as_rows(x_BTNH, K, n_blocks, block):
  """[B, T, N, H] -> [n_blocks, B * K, G * block, H], G = N // K (zero-padded along T; row g * block + t)."""
  B, T, N, H = x_BTNH.shape
  x_BTNH = jnp.pad(x_BTNH, ((0, 0), (0, n_blocks * block - T), (0, 0), (0, 0)))
  x = x_BTNH.reshape(B, n_blocks, block, K, N // K, H).transpose(1, 0, 3, 4, 2, 5)
  return x.reshape(n_blocks, B * K, N // K * block, H)


def _as_cols(x_BTNH, K, n_blocks, block):
  """[B, T, N, H] -> [n_blocks, B * K, H, G * block]: `_as_rows` with the last two axes swapped."""
  B, T, N, H = x_BTNH.shape
  x_BTNH = jnp.pad(x_BTNH, ((0, 0), (0, n_blocks * block - T), (0, 0), (0, 0)))
  x = x_BTNH.reshape(B, n_blocks, block, K, N // K, H).transpose(1, 0, 3, 5, 4, 2)
  return x.reshape(n_blocks, B * K, H, N // K * block)


def _from_rows(x, B, K, block, T):
  """Inverse of `_as_rows`: [n, B * K, G * block, H] -> [B, T, K * G, H]."""
  n, _, Gb, H = x.shape
  G = Gb // block
  return x.reshape(n, B, K, G, block, H).transpose(1, 0, 4, 2, 3, 5).reshape(B, n * block, K * G, H)[:, :T]


def _from_cols(x, B, K, block, T):
  """Inverse of `_as_cols`: [n, B * K, H, G * block] -> [B, T, K * G, H]."""
  n, _, H, Gb = x.shape
  G = Gb // block
  return x.reshape(n, B, K, H, G, block).transpose(1, 0, 5, 2, 4, 3).reshape(B, n * block, K * G, H)[:, :T]


def _forward(q, k, v, mask, bias, scale, bq, bk, out_dtype=None):
  """Returns the output [B, T, N, H] (in `out_dtype`, default q's), lse [nq, B*K, G*bq] and the blocked operands
  (reused by the backward)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  plan = make_plan(mask, T, S, bq, bk)
  nq, nk = len(plan.n_full_kv), len(plan.n_full_q)
  tiles = _Tiles(mask, bias, B, T, S, bq, bk, K, G)
  q_blocks = _as_rows(q * jnp.asarray(scale, q.dtype), K, nq, bq)      # [nq, B*K, G*bq, H]
  kT_blocks = _as_cols(k, K, nk, bk)                                   # [nk, B*K, H, bk]
  v_blocks = _as_rows(v, K, nk, bk)                                    # [nk, B*K, bk, H]

  def make_body(q_tile, masked):
    def body(carry, i, j):
      acc, m, l = carry
      s = tiles.scores(q_tile, kT_blocks[j], i, j, masked)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      l = l * alpha + p.sum(axis=-1)
      acc = acc * alpha[..., None] + jnp.einsum("ars,ash->arh", p.astype(v.dtype), v_blocks[j],
                                                preferred_element_type=jnp.float32)
      return acc, m_new, l
    body.masked = masked
    return body

  def one_q_block(xs):
    i, q_tile, full_kv, n_full, part_kv, n_part = xs
    stats_shape = q_tile.shape[:-1]
    carry = vary_like((jnp.zeros(q_tile.shape, jnp.float32), jnp.full(stats_shape, _M_INIT, jnp.float32),
                       jnp.zeros(stats_shape, jnp.float32)), q_tile, kT_blocks, v_blocks, mask, bias)
    carry = _loop(n_full, make_body(q_tile, False), carry, tiles, i, full_kv, transpose=False)
    carry = _loop(n_part, make_body(q_tile, True), carry, tiles, i, part_kv, transpose=False)
    acc, m, l = carry
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out.astype(out_dtype or q.dtype), lse

  out_blocks, lse_blocks = jax.lax.map(
      one_q_block, (jnp.arange(nq, dtype=jnp.int32), q_blocks, plan.full_kv, plan.n_full_kv, plan.part_kv,
                    plan.n_part_kv))
  return _from_rows(out_blocks, B, K, bq, T), lse_blocks, (q_blocks, kT_blocks, v_blocks, out_blocks)


def _backward(q, k, v, mask, bias, scale, bq, bk, blocks, lse_blocks, d_out, grad_dtype=None):
  """dq, dk, dv (in `grad_dtype`, default the inputs' dtypes) from the forward's blocks and lse; `blocks[3]`, the
  output, and `lse_blocks` are those of the whole attention (a ring hop passes the merged ones)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  plan = make_plan(mask, T, S, bq, bk)
  nq, nk = len(plan.n_full_kv), len(plan.n_full_q)
  tiles = _Tiles(mask, bias, B, T, S, bq, bk, K, G)
  # Key-major tiles: p^T = exp(k q^T - lse) so that every matmul below is a plain [m, c] x [c, n] product (no
  # per-tile transposes); q and dO are needed both as rows and as columns (O(T) each).
  q_rows, kT_blocks, v_blocks, out_rows = blocks  # from the forward pass
  qT_blocks, k_blocks = jnp.swapaxes(q_rows, -1, -2), jnp.swapaxes(kT_blocks, -1, -2)
  do_rows = _as_rows(d_out.astype(q.dtype), K, nq, bq)
  doT_blocks = jnp.swapaxes(do_rows, -1, -2)
  delta_blocks = jnp.sum(do_rows.astype(jnp.float32) * out_rows.astype(jnp.float32), axis=-1)

  def make_body(k_tile, kT_tile, v_tile, masked):
    def body(carry, i, j):
      dk, dv, dqT_blocks = carry
      pT = tiles.probabilities_t(k_tile, qT_blocks[i], lse_blocks[i], i, j, masked)  # [B*K, bk, G*bq]
      dv = dv + jnp.einsum("asr,arh->ash", pT.astype(v.dtype), do_rows[i], preferred_element_type=jnp.float32)
      dpT = jnp.einsum("ash,ahr->asr", v_tile, doT_blocks[i], preferred_element_type=jnp.float32)
      dsT = (pT * (dpT - delta_blocks[i][:, None, :])).astype(q.dtype)
      dk = dk + jnp.einsum("asr,arh->ash", dsT, q_rows[i], preferred_element_type=jnp.float32)
      dqT = jnp.einsum("ahs,asr->ahr", kT_tile, dsT, preferred_element_type=jnp.float32)
      return dk, dv, dqT_blocks.at[i].add(dqT)
    body.masked = masked
    return body

  def one_kv_block(dqT_blocks, xs):
    j, k_tile, kT_tile, v_tile, full_q, n_full, part_q, n_part = xs
    carry = (*vary_like((jnp.zeros(k_tile.shape, jnp.float32), jnp.zeros(v_tile.shape, jnp.float32)),
                        dqT_blocks), dqT_blocks)
    carry = _loop(n_full, make_body(k_tile, kT_tile, v_tile, False), carry, tiles, j, full_q, transpose=True)
    carry = _loop(n_part, make_body(k_tile, kT_tile, v_tile, True), carry, tiles, j, part_q, transpose=True)
    dk, dv, dqT_blocks = carry
    return dqT_blocks, (dk.astype(grad_dtype or k.dtype), dv.astype(grad_dtype or v.dtype))

  dqT_blocks = vary_like(jnp.zeros(qT_blocks.shape, jnp.float32), q_rows, kT_blocks, v_blocks, do_rows, lse_blocks,
                         mask, bias)
  dqT_blocks, (dk_blocks, dv_blocks) = jax.lax.scan(
      one_kv_block, dqT_blocks, (jnp.arange(nk, dtype=jnp.int32), k_blocks, kT_blocks, v_blocks, plan.full_q,
                                 plan.n_full_q, plan.part_q, plan.n_part_q))
  dq = (_from_cols(dqT_blocks, B, K, bq, T) * scale).astype(grad_dtype or q.dtype)
  dk = _from_rows(dk_blocks, B, K, bk, S).astype(grad_dtype or k.dtype)
  dv = _from_rows(dv_blocks, B, K, bk, S).astype(grad_dtype or v.dtype)
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
  out, lse, blocks = _forward(q, k, v, mask, bias, scale, bq, bk)
  # The blocked (pre-scaled, re-laid-out) operands are residuals: O(T), and the backward skips redoing the layout.
  return out, (q, k, v, mask, bias, blocks, lse)


def _flash_bwd(scale, bq, bk, residuals, d_out):
  q, k, v, mask, bias, blocks, lse = residuals
  dq, dk, dv = _backward(q, k, v, mask, bias, scale, bq, bk, blocks, lse, d_out)
  return dq, dk, dv, jax.tree.map(_zero_cotangent, mask), jax.tree.map(_zero_cotangent, bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


def resolve_blocks(T: int, S: int, block_q: int | None, block_kv: int | None,
                   largest: tuple[int, int] = (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV)) -> tuple[int, int]:
  """Block sizes actually used: the defaults (at most `largest`) or the given sizes, capped at the lengths."""
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b is not None and (not isinstance(b, (int, np.integer)) or b <= 0):
      raise ValueError(f"blockwise_attention: {name} must be a positive int or None, got {b!r}")
  # Short sequences still get >= 4 tiles per axis (down to 64), so causal / sparse masks can skip tiles.
  return (min(block_q or _default_block(T, largest[0]), T), min(block_kv or _default_block(S, largest[1]), S))


def _default_block(length: int, largest: int) -> int:
  return min(largest, max(MIN_DEFAULT_BLOCK, length // 4))


@register_attention("blockwise")
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                        mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None,
                        block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
  """Flash-style attention with tile skipping and an O(T)-memory custom_vjp backward.

  On a CPU the tiles run in the C++ kernel of `seqjax.cpu_kernels.attention` (same algorithm, same results to
  float32 rounding) wherever it covers the mask and bias; everywhere else, and when the CPU kernels are switched off
  (`seqjax.ops.backend`, `SEQJAX_CPU_KERNELS=off`), in the JAX program of this module. The choice is made per
  lowering platform (`jax.lax.platform_dependent`), so one jitted function runs the C++ kernel on the CPU and the
  JAX tiles on a GPU/TPU.

  Args:
    q: queries [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (no K/V repetition).
    causal: add `masks.Causal()` to `mask`.
    mask: a `seqjax.ops.attention.masks` object; its static tile answers decide which tiles are computed.
    bias: None or a per-tile bias object (`positions.AlibiBias`); bias arrays need the reference kernel.
    scale: score scale, default 1 / sqrt(H).
    block_q, block_kv: tile sizes (default min(512, max(64, length // 4)), capped at T and S; the CPU kernel
      has its own defaults, see `seqjax.cpu_kernels.attention.tile_sides`). T and S need not be multiples.

  Returns:
    [B, T, N, H] in q's dtype (softmax statistics and accumulators in float32); rows with no visible key are 0.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  dims = check_inputs("blockwise_attention", q, k, v, mask, bias, array_bias=False)
  mask = masks_lib.combine(causal, mask)
  scale = float(default_scale(scale, dims.H))
  bq, bk = resolve_blocks(dims.T, dims.S, block_q, block_kv, largest=(BLOCKWISE_BLOCK, BLOCKWISE_BLOCK))
  jax_tiles = lambda q, k, v: _flash(q, k, v, mask, bias, scale, bq, bk)  # noqa: E731
  kernel = backend.cpu_kernel("attention")
  if kernel is None or not kernel.supports(q, k, v, mask, bias):
    return jax_tiles(q, k, v)
  cpu_tiles = lambda q, k, v: kernel.flash_attention(q, k, v, mask=mask, scale=scale, block_q=block_q,  # noqa
                                                     block_kv=block_kv)
  return backend.on_cpu(cpu_tiles, jax_tiles, q, k, v)
