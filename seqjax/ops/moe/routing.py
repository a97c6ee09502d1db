"""The router of a mixture of experts and its two auxiliary losses.

    r = route(x_BTD, w_DJ, top_k, valid_BT=None)
      r.logits_BTJ   float32 x W (the router always runs in float32, whatever the compute dtype)
      r.probs_BTJ    softmax over the J experts
      r.experts_BTA  the A = top_k most probable experts of each token, best first (int32)
      r.gates_BTA    their weights in the mixture: top-1 (Switch) keeps the probability itself, so the router
                     gets a gradient through the gate; top-k with k > 1 renormalises the k probabilities to sum to 1
                     (GShard / Mixtral), so a token's output is a convex combination of its experts' outputs.
                     Tokens with valid_BT = 0 (padding) get gates 0.

    load_balance_loss(probs_BTJ, experts_BTA, valid_BT=None) = J * sum_j f_j * P_j     (Switch Transformer eq. 4)
      f_j: the fraction of (token, choice) assignments routed to expert j; P_j: the mean router probability of j,
      both over the valid tokens. 1 when routing is uniform (f = P = 1/J), J when every token goes to one expert
      with probability 1; its gradient reaches the router through P (f is a count).
    router_z_loss(logits_BTJ, valid_BT=None) = mean over valid tokens of logsumexp(logits)^2      (ST-MoE eq. 5)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """What the router decided for each token (see the module docstring)."""

  logits_BTJ: jax.Array
  probs_BTJ: jax.Array
  experts_BTA: jax.Array
  gates_BTA: jax.Array


def _valid(valid_BT: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  return jnp.ones(shape, jnp.float32) if valid_BT is None else (jnp.asarray(valid_BT) > 0).astype(jnp.float32)


def route(x_BTD: jax.Array, w_DJ: jax.Array, top_k: int, valid_BT: jax.Array | None = None) -> Routing:
  """Router logits in float32, softmax probabilities, the top-k experts and their gates (module docstring)."""
  x_BTD, w_DJ = jnp.asarray(x_BTD), jnp.asarray(w_DJ)
  if x_BTD.ndim != 3 or w_DJ.ndim != 2 or x_BTD.shape[-1] != w_DJ.shape[0]:
    raise ValueError(f"route: expected x [B, T, D] and the router weight [D, J]; got {x_BTD.shape}, {w_DJ.shape}")
  num_experts = w_DJ.shape[1]
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"route: top_k={top_k} must be between 1 and the number of experts ({num_experts})")
  logits_BTJ = jnp.einsum("btd,dj->btj", x_BTD.astype(jnp.float32), w_DJ.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
  probs_BTJ = jax.nn.softmax(logits_BTJ, axis=-1)
  gates_BTA, experts_BTA = jax.lax.top_k(probs_BTJ, top_k)
  if top_k > 1:
    gates_BTA = gates_BTA / jnp.sum(gates_BTA, axis=-1, keepdims=True)
  gates_BTA = gates_BTA * _valid(valid_BT, x_BTD.shape[:2])[..., None]
  return Routing(logits_BTJ, probs_BTJ, experts_BTA.astype(jnp.int32), gates_BTA)


def load_balance_loss(probs_BTJ: jax.Array, experts_BTA: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
  """J * sum_j f_j P_j over the valid tokens (float32 scalar; module docstring)."""
  num_experts = probs_BTJ.shape[-1]
  v_BT = _valid(valid_BT, probs_BTJ.shape[:2])
  tokens = jnp.maximum(jnp.sum(v_BT), 1.0)
  counts_J = jnp.sum(jax.nn.one_hot(experts_BTA, num_experts, dtype=jnp.float32) * v_BT[..., None, None],
                     axis=(0, 1, 2))
  f_J = counts_J / (tokens * experts_BTA.shape[-1])
  p_J = jnp.sum(probs_BTJ.astype(jnp.float32) * v_BT[..., None], axis=(0, 1)) / tokens
  return num_experts * jnp.sum(f_J * p_J)


def router_z_loss(logits_BTJ: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
  """Mean over the valid tokens of logsumexp(logits)^2 (float32 scalar)."""
  v_BT = _valid(valid_BT, logits_BTJ.shape[:2])
  z_BT = jax.nn.logsumexp(logits_BTJ.astype(jnp.float32), axis=-1)
  return jnp.sum(z_BT ** 2 * v_BT) / jnp.maximum(jnp.sum(v_BT), 1.0)
