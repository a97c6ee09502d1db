"""Context parallelism for the decayed linear recurrence (linear attention, Performer, RetNet, GLA) over a mesh axis.

Called inside `jax.shard_map` on the local, contiguous shards q, k [B, T, N, P], v [B, T, N, H] of a sequence split
over `axis_name`. The matrix state S [B, N, P, H] is affine in the state before the shard (S_out = A S_in + b with
A = the product of the shard's decays, one per head or per key feature), so the scheme of
`seqjax.ops.ssm.context_parallel` applies unchanged: each shard runs `decayed_linear_attention` from a zero state,
the shards' maps are combined across the axis (`combine_states`: "all_gather" or "ppermute"), and S_in's
contribution is added in closed form, o_t += (q_t * decay from the shard start to t)^T S_in, up to the shard's first
reset (and not at all when the shard's first token starts a new document).

The delta rule (DeltaNet, Gated DeltaNet; `delta.py`) is affine in its state too, but its map is a matrix: a token
maps S to a_t (I - beta_t k_t k_t^T) S + beta_t k_t v_t^T, so a shard maps S_in to M_r S_in + B_r with M_r the
[P, P] product of its tokens' factors (per row and head) and B_r its end state from zero. Each column of the state
evolves on its own (column j of S_t depends only on column j of S_{t-1} and of v_t), so one run of the local
chunked kernel on the values [v | 0_P] from the initial state [0 | I_P] gives everything at once: the first H
columns are the zero-state run (outputs o0, end state B_r), the last P are the run from the identity with no values
(end state M_r; outputs R_t^T q_t, with R_t = the product of the factors up to t, so that S_in's contribution to
o_t = (R_t S_in)^T q_t is (R_t^T q_t)^T S_in, a closed form once S_in is known). The UT transform of each chunk is
shared by all P + H columns. `delta_rule_context_parallel`: the maps are combined as matrices (`combine_states(...,
matrix=True)`), and a reset cuts the identity like any state (a shard whose first token starts a document starts
from [0 | 0]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.ops.linear import delta
from seqjax.ops.linear.recurrence import _log_decay_BTNX, decayed_linear_attention
from seqjax.ops.ssm._common import as_arrays
from seqjax.ops.ssm.context_parallel import combine_states, reach, shard_keep, varying
from seqjax.ops.vma import vary_like


def _refuse_initial_state(name, axis_name, initial_state):
  if initial_state is not None:
    raise ValueError(f"{name}: a sequence split over the mesh axis {axis_name!r} starts from a zero state; "
                     f"initial_state must be None (run the unsharded op to continue from a state)")


def decayed_linear_attention_context_parallel(q, k, v, log_decay=None, *, axis_name: str = "seq",
                                              mode: str = "chunked", chunk_size: int | None = None,
                                              segment_ids=None, initial_state=None,
                                              return_final_state: bool = False,
                                              combine: str = "all_gather",
                                              name: str = "decayed_linear_attention_context_parallel"):
  """`decayed_linear_attention` on the local shard of a sequence sharded over `axis_name`: o [B, T, N, H] float32,
  and with `return_final_state` the state after this shard [B, N, P, H] (on the last shard: after the whole
  sequence). A log-decay of shape [N] is replicated; [B, T, N] and [B, T, N, P] are local shards."""
  _refuse_initial_state(name, axis_name, initial_state)
  q, k, v, log_decay, segment_ids = as_arrays(q, k, v, log_decay, segment_ids)
  q, k, v, log_decay = varying(axis_name, q, k, v, log_decay)
  b, t, n = q.shape[:3]
  o0_BTNH, end_BNPH = decayed_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=chunk_size,
                                               segment_ids=segment_ids, return_final_state=True, name=name)
  reach_BT = reach(shard_keep(segment_ids, b, t, axis_name))
  phi_BTNX = jnp.exp(jnp.cumsum(_log_decay_BTNX(log_decay, b, t, n), axis=1)) * reach_BT[..., None, None]
  s_in, s_out = combine_states(phi_BTNX[:, -1, :, :, None], end_BNPH, axis_name=axis_name, combine=combine)
  o_BTNH = o0_BTNH + jnp.einsum("btnp,bnph->btnh", q.astype(jnp.float32) * phi_BTNX, s_in)
  return (o_BTNH, s_out) if return_final_state else o_BTNH


def delta_rule_context_parallel(q, k, v, beta, *, log_decay=None, axis_name: str = "seq", mode: str = "chunked",
                                chunk_size: int | None = None, segment_ids=None, initial_state=None,
                                return_final_state: bool = False, combine: str = "all_gather"):
  """`delta_rule` (DeltaNet; Gated DeltaNet with `log_decay`) on the local shard of a sequence sharded over
  `axis_name`: o [B, T, N, H] in v's dtype, and with `return_final_state` the state after this shard [B, N, P, H]
  float32 (on the last shard: after the whole sequence). q, k [B, T, N, P], v [B, T, N, H], beta and log_decay
  [B, T, N], segment_ids [B, T]: all local shards (module docstring for the scheme)."""
  _refuse_initial_state("delta_rule_context_parallel", axis_name, initial_state)
  q, k, v, beta, log_decay, segment_ids = as_arrays(q, k, v, beta, log_decay, segment_ids)
  delta.check_arguments(q, k, v, beta, log_decay, mode, chunk_size, None, segment_ids)  # before widening v
  q, k, v, beta, log_decay = varying(axis_name, q, k, v, beta, log_decay)
  b, t, n, p = q.shape
  h = v.shape[3]
  f32 = jnp.float32
  # [v | 0] from [0 | I] (cut where the shard's first token starts a document): one local pass, P + H columns.
  continues_B = shard_keep(segment_ids, b, t, axis_name)[:, 0]
  identity_BNPP = continues_B[:, None, None, None] * jnp.eye(p, dtype=f32)
  s0_BNPX = vary_like(jnp.concatenate([jnp.zeros((b, n, p, h), f32), jnp.broadcast_to(identity_BNPP, (b, n, p, p))],
                                      axis=-1), q, k, v, beta, log_decay, continues_B)
  v_BTNX = jnp.concatenate([v.astype(f32), jnp.zeros((b, t, n, p), f32)], axis=-1)
  o_BTNX, end_BNPX = delta.delta_rule(q, k, v_BTNX, beta, log_decay=log_decay, mode=mode, chunk_size=chunk_size,
                                initial_state=s0_BNPX, segment_ids=segment_ids, return_final_state=True)
  s_in, s_out = combine_states(end_BNPX[..., h:], end_BNPX[..., :h], axis_name=axis_name, combine=combine,
                               matrix=True)
  o_BTNH = o_BTNX[..., :h] + jnp.einsum("btnp,bnph->btnh", o_BTNX[..., h:], s_in)
  o_BTNH = o_BTNH.astype(v.dtype)
  return (o_BTNH, s_out) if return_final_state else o_BTNH
