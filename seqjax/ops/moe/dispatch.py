"""Sending tokens to their experts and back: fixed-capacity buffers (with token dropping) or dropless grouped matmuls.

Both compute, for every token, sum_a gate[a] * expert_{e[a]}(x) over its A chosen experts (`routing.route`), where an
expert is the MLP `act(x Wi_j) Wo_j` or the gated MLP `(act(x Wg_j) * x Wi_j) Wo_j` (`expert_ffn`).

`capacity_moe` (Switch / GShard): each row of the batch is a group; expert j takes at most
Q = capacity(T, J, A, capacity_factor) = min(T, max(1, ceil(capacity_factor * T * A / J))) of the row's (token, choice)
assignments, first come first served in token order (token t's choices before token t + 1's, its best choice
first), so whether a token is dropped depends only on earlier tokens of its row. A dropped assignment contributes
nothing: a token whose every choice was dropped gets 0 from the layer and passes through the block's residual
unchanged. The kept ones are scattered into buffers [J, B, Q, D], each expert runs one batched matmul over its B·Q
slots (empty slots included: the cost is capacity_factor times the active compute), and the results are gathered
back. `constrain` (optional) is applied to the [J, B, Q, *] buffers: `seqjax.nn.moe` pins their expert axis to a mesh
axis there (expert parallelism).

`dropless_moe` (MegaBlocks-style): the B·T·A assignments are sorted by expert (stable), the experts run as grouped
matmuls over the sorted rows (`jax.lax.ragged_dot` with the per-expert group sizes) and the results are unsorted.
No token is ever dropped and nothing depends on the other tokens, so it is causal and packed documents do not
interact. `ragged_dot` is a true grouped matmul on TPU and GPU; XLA's CPU lowering computes every group against every
row and masks (J times the active flops) — see docs/moe.md for the figures.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.ops.dense.mlp import ACTIVATIONS
from seqjax.ops.moe.routing import Routing


class ExpertWeights(NamedTuple):
  """The stacked weights of J experts: wi [J, D, F], wo [J, F, D], and wg [J, D, F] for gated experts (else None)."""

  wi_JDF: jax.Array
  wo_JFD: jax.Array
  wg_JDF: jax.Array | None = None


def _check(x_BTD: jax.Array, routing: Routing, experts: ExpertWeights, activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"moe: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
  j, d, f = experts.wi_JDF.shape
  if experts.wo_JFD.shape != (j, f, d) or (experts.wg_JDF is not None and experts.wg_JDF.shape != (j, d, f)):
    raise ValueError(f"moe: expected wi [J, D, F], wo [J, F, D] (and wg [J, D, F]); got {experts.wi_JDF.shape}, "
                     f"{experts.wo_JFD.shape}, {None if experts.wg_JDF is None else experts.wg_JDF.shape}")
  if x_BTD.ndim != 3 or x_BTD.shape[-1] != d:
    raise ValueError(f"moe: expected x [B, T, D={d}], got {x_BTD.shape}")
  if routing.probs_BTJ.shape != x_BTD.shape[:2] + (j,):
    raise ValueError(f"moe: the routing is for probabilities {routing.probs_BTJ.shape}, the input is "
                     f"{x_BTD.shape} with {j} experts")


def expert_ffn(x: jax.Array, experts: ExpertWeights, activation: str,
               matmul: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """act(x Wi) Wo, or (act(x Wg) * x Wi) Wo, with `matmul(x, w)` applying each row's expert weight."""
  act = ACTIVATIONS[activation]
  h = matmul(x, experts.wi_JDF)
  h = act(h) if experts.wg_JDF is None else act(matmul(x, experts.wg_JDF)) * h
  return matmul(h, experts.wo_JFD)


def capacity(length: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert and row: min(T, max(1, ceil(capacity_factor * T * A / J)))."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity: capacity_factor must be positive, got {capacity_factor} (dropless: dropless_moe)")
  return min(length, max(1, math.ceil(capacity_factor * length * top_k / num_experts)))


def capacity_moe(x_BTD: jax.Array, routing: Routing, experts: ExpertWeights, *, activation: str = "gelu",
                 capacity_factor: float = 1.25, valid_BT: jax.Array | None = None,
                 constrain: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """The mixture with fixed-capacity expert buffers (module docstring) -> (y [B, T, D] in x's dtype, the fraction
  of valid (token, choice) assignments dropped, a float32 scalar). Tokens with valid_BT = 0 take no slot."""
  x_BTD = jnp.asarray(x_BTD)
  _check(x_BTD, routing, experts, activation)
  batch, length, _ = x_BTD.shape
  num_experts, top_k = routing.probs_BTJ.shape[-1], routing.experts_BTA.shape[-1]
  slots = capacity(length, num_experts, top_k, capacity_factor)
  constrain = constrain or (lambda a: a)
  valid_BY = jnp.ones((batch, length * top_k), bool) if valid_BT is None else \
      jnp.repeat(jnp.asarray(valid_BT) > 0, top_k, axis=1)
  e_BY = routing.experts_BTA.reshape(batch, length * top_k)
  onehot_BYJ = jax.nn.one_hot(e_BY, num_experts, dtype=jnp.int32) * valid_BY[..., None]
  position_BY = jnp.sum(jnp.cumsum(onehot_BYJ, axis=1) * onehot_BYJ, axis=-1) - 1
  keep_BY = valid_BY & (position_BY < slots)
  slot_BY = jnp.where(keep_BY, position_BY, slots)  # Slot `slots` is out of range: the assignment is dropped.
  rows_BY = jnp.broadcast_to(jnp.arange(batch)[:, None], e_BY.shape)
  xs_BYD = jnp.repeat(x_BTD, top_k, axis=1)
  buffer_JBQD = jnp.zeros((num_experts, batch, slots, x_BTD.shape[-1]), x_BTD.dtype)
  buffer_JBQD = constrain(buffer_JBQD.at[e_BY, rows_BY, slot_BY].add(xs_BYD, mode="drop"))

  def matmul(a_JBQI, w_JIO):
    return constrain(jnp.einsum("jbqi,jio->jbqo", a_JBQI, w_JIO.astype(a_JBQI.dtype),
                                preferred_element_type=jnp.float32).astype(a_JBQI.dtype))

  out_JBQD = expert_ffn(buffer_JBQD, experts, activation, matmul)
  out_BYD = out_JBQD.at[e_BY, rows_BY, slot_BY].get(mode="fill", fill_value=0)
  gates_BY = routing.gates_BTA.reshape(batch, length * top_k) * keep_BY
  y_BTD = jnp.sum((out_BYD.astype(jnp.float32) * gates_BY[..., None]).reshape(batch, length, top_k, -1), axis=2)
  dropped = 1.0 - jnp.sum(keep_BY) / jnp.maximum(jnp.sum(valid_BY), 1)
  return y_BTD.astype(x_BTD.dtype), dropped.astype(jnp.float32)


def dropless_moe(x_BTD: jax.Array, routing: Routing, experts: ExpertWeights, *, activation: str = "gelu"
                 ) -> jax.Array:
  """The mixture with every assignment computed: sort by expert, grouped matmuls, unsort (module docstring)."""
  x_BTD = jnp.asarray(x_BTD)
  _check(x_BTD, routing, experts, activation)
  batch, length, width = x_BTD.shape
  num_experts, top_k = routing.probs_BTJ.shape[-1], routing.experts_BTA.shape[-1]
  e_Y = routing.experts_BTA.reshape(-1)
  order_Y = jnp.argsort(e_Y, stable=True)
  group_sizes_J = jnp.bincount(e_Y, length=num_experts).astype(jnp.int32)
  x_sorted_YD = x_BTD.reshape(batch * length, width)[order_Y // top_k]

  def matmul(a_YI, w_JIO):
    return jax.lax.ragged_dot(a_YI, w_JIO.astype(a_YI.dtype), group_sizes_J,
                              preferred_element_type=jnp.float32).astype(a_YI.dtype)

  out_sorted_YD = expert_ffn(x_sorted_YD, experts, activation, matmul)
  out_YD = out_sorted_YD[jnp.argsort(order_Y)]
  gates_Y = routing.gates_BTA.reshape(-1)
  y_BTD = jnp.sum((out_YD.astype(jnp.float32) * gates_Y[:, None]).reshape(batch, length, top_k, width), axis=2)
  return y_BTD.astype(x_BTD.dtype)
