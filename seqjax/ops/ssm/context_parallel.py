"""Context parallelism for the SSMs: a sequence sharded along a mesh axis, states passed across the shards.

Legend: B batch, T the *local* length (the global one is R times larger), E channels, P state size, N heads,
H head dim, R the number of shards on the mesh axis `axis_name`, r this shard's index. Called inside
`jax.shard_map` on the local, contiguous shards of the sequence (shard r holds positions [r T, (r + 1) T)).

Every recurrence here is affine in its state: a shard maps the state before it, h_in, to the state after it,

    h_out = A_r * h_in + b_r       (A_r: the product of the shard's decays, elementwise; b_r: its end state from 0)

and each local output is the output from a zero state plus a term linear in h_in. So each shard:
1. runs its kernel on its own tokens from a zero state (outputs y0, end state b_r) and forms A_r;
2. combines the maps (A_j, b_j) of the shards before it into h_in (`combine_states`: "all_gather" — the small
   maps gathered once, then a local associative scan; or "ppermute" — a log-depth Hillis-Steele scan of
   neighbour sends, ceil(log2 R) + 1 rounds);
3. adds h_in's contribution: SSD, S4D and S5 in closed form (C_t read out of the decayed h_in); the selective scan,
   whose decay differs per (channel, state) pair, by a second local scan with zero input from h_in (its
   memory-lean chunked kernel, no [B, T, E, P] tensor).
Segment resets cut the incoming state: it reaches only positions before the shard's first reset, and a shard
whose first token starts a new document (its id differs from the left neighbour's last id, sent by `ppermute`)
takes no state at all. Gradients flow through the collectives (`all_gather` / `ppermute` transpose to their
reverse); operands replicated over the axis (A, D, ...) are cast to varying first so that their gradient is summed
over the shards (`lax.pcast` transposes to `psum`). Everything runs under `shard_map`'s default check_vma=True.

The combine choice: the maps are small ([B, N, H, P] for Mamba-2) and both combines move a few of them, so the
collective's latency decides. "all_gather" is one collective (R - 1 maps received per device); "ppermute" is
ceil(log2 R) + 1 dependent sends (one map each). `python -m seqjax.bench ring --ssm` measures both;
"all_gather" is the default (docs/parallelism.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.ssm._common import as_arrays, keep_mask
from seqjax.ops.ssm.s4 import s4d_recurrent, s5_scan
from seqjax.ops.ssm.s4_chunked import s4d_chunked
from seqjax.ops.ssm.selective import selective_scan
from seqjax.ops.ssm.ssd import ssd
from seqjax.ops.vma import vary_like

COMBINES = ("all_gather", "ppermute")


def _check_combine(combine: str) -> None:
  if combine not in COMBINES:
    raise ValueError(f"SSM context parallelism: combine must be one of {COMBINES}, got {combine!r}")


def _compose(first, second, act=jnp.multiply):
  """Affine maps h -> act(a, h) + b composed: `first` applied, then `second`."""
  a1, b1 = first
  a2, b2 = second
  return act(a2, a1), act(a2, b1) + b2


def combine_states(decay, end_state, *, axis_name: str = "seq", combine: str = "all_gather",
                   matrix: bool = False):
  """(h_in, h_out): the state before and after this shard, from every shard's map h -> decay * h + end_state.

  `decay` broadcasts against `end_state` (e.g. [B, N, 1, 1] against [B, N, H, P]); with `matrix`, it is a matrix
  [..., P, P] acting on the state [..., P, H] from the left (h -> decay @ h + end_state: the delta rule's map). The
  first shard's h_in is zero (the sequence starts from a zero state); the last shard's h_out is the state after the
  whole sequence.
  """
  _check_combine(combine)
  num_shards = lax.axis_size(axis_name)
  r = lax.axis_index(axis_name)
  act = jnp.matmul if matrix else jnp.multiply
  if combine == "all_gather":
    decay_R, end_R = lax.all_gather(decay, axis_name), lax.all_gather(end_state, axis_name)
    if not matrix:
      decay_R = jnp.broadcast_to(decay_R, end_R.shape)
    _, after_R = lax.associative_scan(lambda x, y: _compose(x, y, act), (decay_R, end_R), axis=0)  # from 0
    h_in = jnp.where(r > 0, after_R[jnp.maximum(r - 1, 0)], jnp.zeros_like(end_state))
    return h_in, after_R[r]
  # Hillis-Steele: after the round with distance d, (a, h) is the composition of shards max(0, r - 2d + 1) .. r.
  a, h = decay, end_state
  d = 1
  while d < num_shards:
    perm = [(i, i + d) for i in range(num_shards - d)]
    a_left, h_left = lax.ppermute(a, axis_name, perm), lax.ppermute(h, axis_name, perm)
    has_left = r >= d
    h = jnp.where(has_left, act(a, h_left) + h, h)
    a = jnp.where(has_left, act(a, a_left), a)
    d *= 2
  h_in = lax.ppermute(h, axis_name, [(i, i + 1) for i in range(num_shards - 1)])  # zeros on shard 0
  return h_in, h


def from_left(x_BT_: jax.Array, width: int, axis_name: str = "seq") -> jax.Array:
  """The `width` positions (axis 1) just before this shard, [B, width, ...]; zeros before the sequence start.

  A causal convolution's halo (Mamba's conv takes its W - 1 previous inputs), or the neighbour's last segment id.
  A halo longer than a shard is assembled from several shards to the left (one `ppermute` per shard).
  """
  length = x_BT_.shape[1]
  num_shards = lax.axis_size(axis_name)
  hops = -(-width // length)
  blocks = [lax.ppermute(x_BT_, axis_name, [(i, i + j) for i in range(num_shards - j)]) if j < num_shards
            else jnp.zeros_like(x_BT_) for j in range(hops, 0, -1)]  # shards r - hops .. r - 1 (zeros before 0)
  left = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
  return left[:, left.shape[1] - width:]


def shard_keep(segment_ids: jax.Array | None, batch: int, length: int, axis_name: str = "seq") -> jax.Array:
  """[B, T] float32 keep mask of this shard (0 where the state resets): position 0 resets when its segment id differs
  from the left neighbour's last one (on the first shard it does not matter: nothing comes in)."""
  keep_BT = keep_mask(segment_ids, batch, length)
  if segment_ids is None:
    return keep_BT
  segment_ids = jnp.asarray(segment_ids)
  continues_B = from_left(segment_ids, 1, axis_name)[:, 0] == segment_ids[:, 0]
  return keep_BT.at[:, 0].set(continues_B.astype(jnp.float32))


def reach(keep_BT: jax.Array) -> jax.Array:
  """[B, T] float32: 1 at the positions the incoming state still reaches (before the shard's first reset)."""
  return (jnp.cumsum(1.0 - keep_BT, axis=1) == 0.0).astype(jnp.float32)


def varying(axis_name, *xs):
  """The operands cast to varying over `axis_name` and every axis any of them varies over (None stays None): a
  replicated operand's gradient is then summed over the shards by the cast's transpose."""
  refs = (lax.axis_index(axis_name),) + tuple(x for x in xs if x is not None)
  return tuple(None if x is None else vary_like(x, *refs) for x in xs)


def _finish(y_local, h_out, return_final_state):
  return (y_local, h_out) if return_final_state else y_local


def ssd_context_parallel(x, dt, A, B, C, D=None, *, axis_name: str = "seq", mode: str = "chunked",
                         chunk_size: int | None = None, segment_ids=None, return_final_state: bool = False,
                         combine: str = "all_gather"):
  """Mamba-2's SSD (`ssd.ssd`) on the local shard of a sequence sharded over `axis_name`: y [B, T, N, H] in x's
  dtype, and with `return_final_state` the state after this shard [B, N, H, P] (on the last shard: after the whole
  sequence). Arguments as `ssd`, all local shards ([B, T, ...]); A [N] and D [N] replicated."""
  _check_combine(combine)
  x, dt, A, B, C, D, segment_ids = as_arrays(x, dt, A, B, C, D, segment_ids)
  x, dt, A, B, C, D = varying(axis_name, x, dt, A, B, C, D)
  b, t = x.shape[:2]
  y0_BTNH, end_BNHP = ssd(x, dt, A, B, C, D, mode=mode, chunk_size=chunk_size, segment_ids=segment_ids,
                          return_final_state=True)
  f32 = jnp.float32
  alive_BT = reach(shard_keep(segment_ids, b, t, axis_name))
  phi_BTN = jnp.exp(jnp.cumsum(dt.astype(f32) * A.astype(f32), axis=1)) * alive_BT[..., None]  # h_in's decay to t
  h_in, h_out = combine_states(phi_BTN[:, -1, :, None, None], end_BNHP, axis_name=axis_name, combine=combine)
  incoming_BTNH = jnp.einsum("btp,bnhp->btnh", C.astype(f32), h_in) * phi_BTN[..., None]
  return _finish((y0_BTNH.astype(f32) + incoming_BTNH).astype(x.dtype), h_out, return_final_state)


def selective_scan_context_parallel(x, delta, A, B, C, D=None, *, axis_name: str = "seq", mode: str = "chunked",
                                    chunk_size: int | None = None, segment_ids=None,
                                    return_final_state: bool = False, combine: str = "all_gather"):
  """Mamba's selective scan (`selective.selective_scan`) on the local shard of a sequence sharded over
  `axis_name`: y [B, T, E] in x's dtype, and with `return_final_state` the state after this shard [B, E, P].
  Arguments as `selective_scan`, all local shards; A [E, P] and D [E] replicated."""
  _check_combine(combine)
  x, delta, A, B, C, D, segment_ids = as_arrays(x, delta, A, B, C, D, segment_ids)
  x, delta, A, B, C, D = varying(axis_name, x, delta, A, B, C, D)
  b, t = x.shape[:2]
  scan = lambda u, **kw: selective_scan(u, delta, A, B, C, mode=mode, chunk_size=chunk_size,  # noqa: E731
                                        segment_ids=segment_ids, **kw)
  y0_BTE, end_BEP = scan(x, return_final_state=True)
  f32 = jnp.float32
  keep_BT = shard_keep(segment_ids, b, t, axis_name)
  total_BE = jnp.sum(delta.astype(f32), axis=1)
  decay_BEP = jnp.exp(total_BE[..., None] * A.astype(f32)) * reach(keep_BT)[:, -1, None, None]
  h_in, h_out = combine_states(decay_BEP, end_BEP, axis_name=axis_name, combine=combine)
  # h_in's contribution: the same scan with zero input from h_in (cut where the first token starts a document).
  incoming_BTE = scan(jnp.zeros_like(x), initial_state=h_in * keep_BT[:, 0, None, None]).astype(f32)
  y_BTE = y0_BTE.astype(f32) + incoming_BTE
  if D is not None:
    y_BTE = y_BTE + D.astype(f32) * x.astype(f32)
  return _finish(y_BTE.astype(x.dtype), h_out, return_final_state)


def _powers(d, length):
  """d^1 .. d^T along a new axis 0, [T, ...] (complex): the decay of a time-invariant diagonal SSM to each step."""
  steps_T = jnp.arange(1, length + 1, dtype=jnp.float32).reshape((length,) + (1,) * d.ndim)
  return jnp.exp(jnp.log(d.astype(jnp.complex64))[None] * steps_T)


def _time_invariant(run, readout, u, decay, operands, *, axis_name, segment_ids, return_final_state, combine):
  """S4D / S5: `run(u, decay, *operands, segment_ids=...)` -> (y0, end state) from a zero state, decay d the
  diagonal of the discrete state matrix (time-invariant: its power d^(t+1) decays h_in to local step t), and
  `readout(phi [T, ...], C, h_in)` the output of the decayed incoming state [B, T, E]."""
  _check_combine(combine)
  u, decay, *operands, segment_ids = as_arrays(u, decay, *operands, segment_ids)
  u, decay, *operands = varying(axis_name, u, decay, *operands)
  b, t = u.shape[:2]
  y0_BTE, end = run(u, decay, *operands, segment_ids=segment_ids, return_final_state=True)
  reach_BT = reach(shard_keep(segment_ids, b, t, axis_name))
  phi = _powers(decay, t)
  h_in, h_out = combine_states(phi[-1] * reach_BT[(slice(None), -1) + (None,) * decay.ndim], end,
                               axis_name=axis_name, combine=combine)
  y_BTE = y0_BTE.astype(jnp.float32) + readout(phi, operands[1].astype(jnp.complex64), h_in) * reach_BT[..., None]
  return _finish(y_BTE.astype(u.dtype), h_out, return_final_state)


def s4d_context_parallel(u, dA, dB, C, D=None, *, axis_name: str = "seq", mode: str = "parallel",
                         segment_ids=None, return_final_state: bool = False, combine: str = "all_gather"):
  """S4D (`s4.s4d_recurrent`) on the local shard of a sequence sharded over `axis_name`: y [B, T, E] in u's dtype,
  and with `return_final_state` the state after this shard [B, E, P] complex64. dA, dB, C [E, P] and D [E]
  replicated. mode "chunked" runs `s4d_chunked` on the shard, the others `s4d_recurrent`."""
  return _time_invariant(
      s4d_chunked if mode == "chunked" else lambda *a, **kw: s4d_recurrent(*a, mode=mode, **kw),
      lambda phi_TEP, C_EP, h_BEP: 2.0 * jnp.einsum("tep,ep,bep->bte", phi_TEP, C_EP, h_BEP).real,
      u, dA, (dB, C, D), axis_name=axis_name, segment_ids=segment_ids, return_final_state=return_final_state,
      combine=combine)


def s5_context_parallel(u, dLambda, dB, C, D=None, *, axis_name: str = "seq", mode: str = "parallel",
                        segment_ids=None, return_final_state: bool = False, combine: str = "all_gather"):
  """S5 (`s4.s5_scan`) on the local shard of a sequence sharded over `axis_name`: y [B, T, E] in u's dtype, and
  with `return_final_state` the state after this shard [B, P] complex64. dLambda [P], dB [P, E], C [E, P] and
  D [E] replicated."""
  return _time_invariant(
      lambda *a, **kw: s5_scan(*a, mode=mode, **kw),
      lambda phi_TP, C_EP, h_BP: jnp.einsum("tp,ep,bp->bte", phi_TP, C_EP, h_BP).real,
      u, dLambda, (dB, C, D), axis_name=axis_name, segment_ids=segment_ids, return_final_state=return_final_state,
      combine=combine)
