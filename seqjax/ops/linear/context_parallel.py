"""Context parallelism for the decayed linear recurrence (linear attention, Performer, RetNet, GLA) over a mesh axis.

Called inside `jax.shard_map` on the local, contiguous shards q, k [B, T, N, P], v [B, T, N, H] of a sequence split
over `axis_name`. The matrix state S [B, N, P, H] is affine in the state before the shard (S_out = A S_in + b with
A = the product of the shard's decays, one per head or per key feature), so the scheme of
`seqjax.ops.ssm.context_parallel` applies unchanged: each shard runs `decayed_linear_attention` from a zero state,
the shards' maps are combined across the axis (`combine_states`: "all_gather" or "ppermute"), and S_in's
contribution is added in closed form, o_t += (q_t * decay from the shard start to t)^T S_in, up to the shard's first
reset (and not at all when the shard's first token starts a new document). The delta rule (DeltaNet), whose map is a
product of P x P matrices, is not covered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.ops.linear.recurrence import _log_decay_BTNX, decayed_linear_attention
from seqjax.ops.ssm._common import as_arrays
from seqjax.ops.ssm.context_parallel import combine_states, reach, shard_keep, varying


def decayed_linear_attention_context_parallel(q, k, v, log_decay=None, *, axis_name: str = "seq",
                                              mode: str = "chunked", chunk_size: int | None = None,
                                              segment_ids=None, initial_state=None,
                                              return_final_state: bool = False,
                                              combine: str = "all_gather",
                                              name: str = "decayed_linear_attention_context_parallel"):
  """`decayed_linear_attention` on the local shard of a sequence sharded over `axis_name`: o [B, T, N, H] float32,
  and with `return_final_state` the state after this shard [B, N, P, H] (on the last shard: after the whole
  sequence). A log-decay of shape [N] is replicated; [B, T, N] and [B, T, N, P] are local shards."""
  if initial_state is not None:
    raise ValueError(f"{name}: a sequence split over the mesh axis {axis_name!r} starts from a zero state; "
                     f"initial_state must be None (run the unsharded op to continue from a state)")
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
