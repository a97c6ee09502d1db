"""Flash attention as Pallas kernels (forward, and a backward in two kernels), with the same masks, biases and GQA.

Legend: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim, bq x bk tiles.

The algorithm is the one of `blockwise.py` (read that module first): the same static tile plan decides
which key blocks each query block visits and which of them need masking; the online softmax keeps float32
statistics; the backward recomputes probabilities from the saved log-sum-exp.

- forward kernel, grid (B, N, nq): one query tile against the planned key tiles -> out tile, lse tile;
- dq kernel, grid (B, N, nq): the same loop, accumulating dQ;
- dkv kernel, grid (B, N, nk): one key tile against the query tiles that see it -> dK, dV per query head,
  summed over the G heads of a group outside the kernel (K/V are never repeated in the forward).

Mask and bias objects enter the kernels as their pytree leaves (whole arrays); each program rebuilds the object
and evaluates `block` on its tile. That is simple and exact; a production GPU/TPU version would prefetch the
plan tables as scalars and slice batch-indexed mask data per program. On CPU the kernels run with
`interpret=True` (the default off-accelerator), which is what the tests compare against the reference.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import check_inputs, default_scale, register_attention
from seqjax.ops.attention.blockwise import make_plan, resolve_blocks

_M_INIT = -1e30
_SQ = pl.squeezed


def _full_spec(x):
  """A BlockSpec that hands every program the whole array."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


class _Context:
  """Static facts shared by the three kernels, and the rebuilding of mask / bias objects from their refs."""

  def __init__(self, mask, bias, T, S, bq, bk, G):
    self.T, self.S, self.bq, self.bk, self.G = T, S, bq, bk, G
    self.kv_padded = S % bk != 0
    self.mask_def, mask_leaves = _flatten(mask)
    self.bias_def, bias_leaves = _flatten(bias)
    self.shapes = [x.shape for x in mask_leaves + bias_leaves]
    self.n_mask = len(mask_leaves)

  def rebuild(self, refs):
    values = [r[...].reshape(shape) for r, shape in zip(refs, self.shapes)]
    mask = jax.tree.unflatten(self.mask_def, values[:self.n_mask])
    bias = jax.tree.unflatten(self.bias_def, values[self.n_mask:])
    return mask, bias

  def scores(self, mask, bias, q_tile, k_tile, b, n, i, j, masked):
    """float32 [bq, bk] scores of query tile i (pre-scaled) and key tile j of batch b, head n."""
    s = jax.lax.dot_general(q_tile, k_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    q_idx = i * self.bq + jnp.arange(self.bq, dtype=jnp.int32)
    kv_idx = j * self.bk + jnp.arange(self.bk, dtype=jnp.int32)
    if bias is not None:
      s = s + _select(_select(bias.block(q_idx, kv_idx).astype(jnp.float32), 0, b), 0, n)
    if masked:
      visible = jnp.ones((self.bq, self.bk), bool)
      if mask is not None:
        visible = _select(mask.block(q_idx, kv_idx), 0, b)[0]
      if self.kv_padded:
        visible = visible & (kv_idx < self.S)[None, :]
      s = jnp.where(visible, s, -jnp.inf)
    return s


def _leaf_operands(mask, bias):
  """The mask and bias leaves as kernel operands (at least 1-d); `_Context.rebuild` restores their shapes."""
  return [jnp.atleast_1d(x) for x in _flatten(mask)[1] + _flatten(bias)[1]]


def _flatten(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [jnp.asarray(x) for x in leaves]


def _select(x, axis, index):
  """x[index] along `axis`, or x[0] when that axis is broadcast (size 1)."""
  if x.shape[axis] == 1:
    return jax.lax.index_in_dim(x, 0, axis, keepdims=False)
  return jax.lax.dynamic_index_in_dim(x, index, axis, keepdims=False)


def _tile_loop(count, body, carry):
  return jax.lax.fori_loop(0, count, body, carry)


def _fwd_kernel(ctx, full_kv, n_full, part_kv, n_part, q_ref, k_ref, v_ref, *rest):
  leaf_refs, (o_ref, lse_ref) = rest[:-2], rest[-2:]
  mask, bias = ctx.rebuild(leaf_refs)
  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_tile = q_ref[...]

  def make_body(table, masked):
    def body(t, carry):
      acc, m, l = carry
      j = table[i, t]
      k_tile, v_tile = k_ref[pl.ds(j * ctx.bk, ctx.bk), :], v_ref[pl.ds(j * ctx.bk, ctx.bk), :]
      s = ctx.scores(mask, bias, q_tile, k_tile, b, n, i, j, masked)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[:, None])
      alpha = jnp.exp(m - m_new)
      l = l * alpha + p.sum(axis=-1)
      acc = acc * alpha[:, None] + jax.lax.dot_general(p.astype(v_tile.dtype), v_tile, (((1,), (0,)), ((), ())),
                                                       preferred_element_type=jnp.float32)
      return acc, m_new, l
    return body

  carry = (jnp.zeros(q_tile.shape, jnp.float32), jnp.full((ctx.bq,), _M_INIT, jnp.float32),
           jnp.zeros((ctx.bq,), jnp.float32))
  carry = _tile_loop(n_full[i], make_body(full_kv, False), carry)
  acc, m, l = _tile_loop(n_part[i], make_body(part_kv, True), carry)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_kernel(ctx, full_kv, n_full, part_kv, n_part, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
  leaf_refs, dq_ref = rest[:-1], rest[-1]
  mask, bias = ctx.rebuild(leaf_refs)
  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q_tile, do_tile, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def make_body(table, masked):
    def body(t, dq):
      j = table[i, t]
      k_tile, v_tile = k_ref[pl.ds(j * ctx.bk, ctx.bk), :], v_ref[pl.ds(j * ctx.bk, ctx.bk), :]
      p = jnp.exp(ctx.scores(mask, bias, q_tile, k_tile, b, n, i, j, masked) - lse[:, None])
      dp = jax.lax.dot_general(do_tile, v_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[:, None])).astype(k_tile.dtype)
      return dq + jax.lax.dot_general(ds, k_tile, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return body

  dq = _tile_loop(n_full[i], make_body(full_kv, False), jnp.zeros(q_tile.shape, jnp.float32))
  dq_ref[...] = _tile_loop(n_part[i], make_body(part_kv, True), dq)


def _dkv_kernel(ctx, full_q, n_full, part_q, n_part, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest):
  leaf_refs, (dk_ref, dv_ref) = rest[:-2], rest[-2:]
  mask, bias = ctx.rebuild(leaf_refs)
  b, n, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k_tile, v_tile = k_ref[...], v_ref[...]

  def make_body(table, masked):
    def body(t, carry):
      dk, dv = carry
      i = table[j, t]
      rows = pl.ds(i * ctx.bq, ctx.bq)
      q_tile, do_tile, lse, delta = q_ref[rows, :], do_ref[rows, :], lse_ref[rows], delta_ref[rows]
      p = jnp.exp(ctx.scores(mask, bias, q_tile, k_tile, b, n, i, j, masked) - lse[:, None])
      dv = dv + jax.lax.dot_general(p.astype(do_tile.dtype), do_tile, (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)
      dp = jax.lax.dot_general(do_tile, v_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[:, None])).astype(q_tile.dtype)
      dk = dk + jax.lax.dot_general(ds, q_tile, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      return dk, dv
    return body

  zeros = jnp.zeros(k_tile.shape, jnp.float32)
  carry = _tile_loop(n_full[j], make_body(full_q, False), (zeros, zeros))
  dk, dv = _tile_loop(n_part[j], make_body(part_q, True), carry)
  dk_ref[...], dv_ref[...] = dk, dv


def _layout(x_BTNH, block):
  """[B, T, N, H] -> [B, N, T_padded, H] with T padded to a multiple of `block`."""
  T = x_BTNH.shape[1]
  x_BTNH = jnp.pad(x_BTNH, ((0, 0), (0, -T % block), (0, 0), (0, 0)))
  return x_BTNH.transpose(0, 2, 1, 3)


def _setup(q, k, v, mask, bias, scale, bq, bk):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  ctx = _Context(mask, bias, T, S, bq, bk, N // K)
  plan = make_plan(mask, T, S, bq, bk)
  q_BNTH = _layout(q * jnp.asarray(scale, q.dtype), bq)
  return ctx, plan, q_BNTH, _layout(k, bk), _layout(v, bk)


def _specs(plan_tables, tiles, leaves):
  return [_full_spec(jnp.asarray(t)) for t in plan_tables] + tiles + [_full_spec(x) for x in leaves]


def _fwd(q, k, v, mask, bias, scale, bq, bk, interpret):
  B, T, N, H = q.shape
  ctx, plan, q_BNTH, k_BKSH, v_BKSH = _setup(q, k, v, mask, bias, scale, bq, bk)
  G, Tp, Sp = ctx.G, q_BNTH.shape[2], k_BKSH.shape[2]
  tables = (plan.full_kv, plan.n_full_kv, plan.part_kv, plan.n_part_kv)
  q_spec = pl.BlockSpec((_SQ, _SQ, bq, H), lambda b, n, i: (b, n, i, 0))
  kv_spec = pl.BlockSpec((_SQ, _SQ, Sp, H), lambda b, n, i: (b, n // G, 0, 0))
  leaves = _leaf_operands(mask, bias)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, ctx),
      out_shape=(jax.ShapeDtypeStruct((B, N, Tp, H), q.dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
      grid=(B, N, Tp // bq),
      in_specs=_specs(tables, [q_spec, kv_spec, kv_spec], leaves),
      out_specs=(q_spec, pl.BlockSpec((_SQ, _SQ, bq), lambda b, n, i: (b, n, i))),
      interpret=interpret, name="flash_attention_fwd",
  )(*[jnp.asarray(t) for t in tables], q_BNTH, k_BKSH, v_BKSH, *leaves)
  return out.transpose(0, 2, 1, 3)[:, :T], lse


def _bwd(q, k, v, mask, bias, scale, bq, bk, interpret, out, lse, d_out):
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  ctx, plan, q_BNTH, k_BKSH, v_BKSH = _setup(q, k, v, mask, bias, scale, bq, bk)
  G, Tp, Sp = ctx.G, q_BNTH.shape[2], k_BKSH.shape[2]
  do_BNTH = _layout(d_out.astype(q.dtype), bq)
  delta_BNT = jnp.sum(_layout(d_out.astype(jnp.float32) * out.astype(jnp.float32), bq), axis=-1)
  leaves = _leaf_operands(mask, bias)
  operands = [q_BNTH, k_BKSH, v_BKSH, do_BNTH, lse, delta_BNT, *leaves]

  q_tile = pl.BlockSpec((_SQ, _SQ, bq, H), lambda b, n, i: (b, n, i, 0))
  row_tile = pl.BlockSpec((_SQ, _SQ, bq), lambda b, n, i: (b, n, i))
  kv_whole = pl.BlockSpec((_SQ, _SQ, Sp, H), lambda b, n, i: (b, n // G, 0, 0))
  tables = (plan.full_kv, plan.n_full_kv, plan.part_kv, plan.n_part_kv)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, ctx),
      out_shape=jax.ShapeDtypeStruct((B, N, Tp, H), jnp.float32),
      grid=(B, N, Tp // bq),
      in_specs=_specs(tables, [q_tile, kv_whole, kv_whole, q_tile, row_tile, row_tile], leaves),
      out_specs=q_tile, interpret=interpret, name="flash_attention_dq",
  )(*[jnp.asarray(t) for t in tables], *operands)

  q_whole = pl.BlockSpec((_SQ, _SQ, Tp, H), lambda b, n, j: (b, n, 0, 0))
  row_whole = pl.BlockSpec((_SQ, _SQ, Tp), lambda b, n, j: (b, n, 0))
  kv_tile = pl.BlockSpec((_SQ, _SQ, bk, H), lambda b, n, j: (b, n // G, j, 0))
  head_tile = pl.BlockSpec((_SQ, _SQ, bk, H), lambda b, n, j: (b, n, j, 0))
  tables_t = (plan.full_q, plan.n_full_q, plan.part_q, plan.n_part_q)
  dk_h, dv_h = pl.pallas_call(
      functools.partial(_dkv_kernel, ctx),
      out_shape=(jax.ShapeDtypeStruct((B, N, Sp, H), jnp.float32),) * 2,
      grid=(B, N, Sp // bk),
      in_specs=_specs(tables_t, [q_whole, kv_tile, kv_tile, q_whole, row_whole, row_whole], leaves),
      out_specs=(head_tile, head_tile), interpret=interpret, name="flash_attention_dkv",
  )(*[jnp.asarray(t) for t in tables_t], *operands)

  def per_kv_head(x_BNSH):  # sum the G query heads of each group, back to [B, S, K, H]
    return x_BNSH.reshape(B, K, G, Sp, H).sum(axis=2).transpose(0, 2, 1, 3)[:, :S]

  dq = (dq.transpose(0, 2, 1, 3)[:, :T] * scale).astype(q.dtype)
  return dq, per_kv_head(dk_h).astype(k.dtype), per_kv_head(dv_h).astype(v.dtype)


def _zero_cotangent(x: Any) -> Any:
  x = jnp.asarray(x)
  return jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, mask, bias, scale, bq, bk, interpret):
  return _fwd(q, k, v, mask, bias, scale, bq, bk, interpret)[0]


def _flash_fwd(q, k, v, mask, bias, scale, bq, bk, interpret):
  out, lse = _fwd(q, k, v, mask, bias, scale, bq, bk, interpret)
  return out, (q, k, v, mask, bias, out, lse)


def _flash_bwd(scale, bq, bk, interpret, residuals, d_out):
  q, k, v, mask, bias, out, lse = residuals
  dq, dk, dv = _bwd(q, k, v, mask, bias, scale, bq, bk, interpret, out, lse, d_out)
  return dq, dk, dv, jax.tree.map(_zero_cotangent, mask), jax.tree.map(_zero_cotangent, bias)


_flash.defvjp(_flash_fwd, _flash_bwd)


@register_attention("pallas")
def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None,
                     block_q: int | None = None, block_kv: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Flash attention as Pallas kernels; same arguments and results as `blockwise_attention`.

  `interpret=None` interprets the kernels unless the default backend is a GPU or TPU. Gradients go through a
  `jax.custom_vjp` whose backward is two more Pallas kernels (dQ, and dK/dV).
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  dims = check_inputs("pallas_attention", q, k, v, mask, bias, array_bias=False)
  mask = masks_lib.combine(causal, mask)
  bq, bk = resolve_blocks(dims.T, dims.S, block_q, block_kv)
  if interpret is None:
    interpret = jax.default_backend() not in ("gpu", "tpu")
  return _flash(q, k, v, mask, bias, float(default_scale(scale, dims.H)), bq, bk, bool(interpret))
