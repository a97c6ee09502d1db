"""The mixture-of-experts MLP (linen): a router and J expert MLPs over the ops of `seqjax.ops.moe`.

    moe = MoeMlp(num_experts=8, top_k=2, hidden=F, kind="mlp", capacity_factor=1.25)
    y_BTD = moe.apply(variables, x_BTD, valid_BT=None, mutable=["moe"])    # -> (y_BTD, {"moe": ...})

Parameters: `router/kernel` [D, J] (the router runs in float32), `wi` [J, D, F], `wg` [J, D, F] (gated kind only),
`wo` [J, F, D], with logical axes ("embed", None) and ("expert", "embed", "mlp") / ("expert", "mlp", "embed").

`capacity_factor > 0` sends tokens through fixed-size expert buffers and drops the assignments over capacity (the
token then passes through the residual); `0` is dropless (grouped matmuls; see `seqjax.ops.moe.dispatch`). A single
token per row (cached decoding) never overflows: its A choices are distinct experts and each has >= 1 slot.

Each call sows three float32 scalars into the collection "moe" (collected only when the caller makes it mutable):
`load_balance_loss` (Switch: 1 for uniform routing, J for full collapse), `router_z_loss` (mean logsumexp^2 of the
router logits) and `dropped_fraction` (assignments dropped at capacity). `moe_losses` gathers them over the layers of
a model; the LM task adds `load_balance_weight` and `z_loss_weight` times their sums over layers to the training
loss and logs their per-layer means (docs/moe.md).

Expert parallelism: the expert axis J of the weights has the logical name "expert", which the trainer's rules
(`seqjax.train.sharding.LOGICAL_AXIS_RULES`) map to the mesh axis `EXPERT_MESH_AXIS` ("data": the data-parallel
devices each hold J / n experts, as in GShard). When the call is traced under `jax.set_mesh(mesh)` and that axis
divides J, the dispatched buffers [J, B, Q, D] are also constrained to it, so each device runs only its own experts
and XLA moves the tokens (all-to-all) instead of the weights.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from seqjax.nn.layers import dense_init
from seqjax.ops import moe as moe_ops

Dtype = Any
EXPERT_MESH_AXIS = "data"
LOSS_NAMES = ("load_balance_loss", "router_z_loss", "dropped_fraction")


def _expert_init() -> nn.initializers.Initializer:
  """Fan-in variance scaling of each expert's [in, out] matrix (the leading J axis is a batch of matrices)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                          batch_axis=(0,))


def _expert_constraint(num_experts: int):
  """The sharding constraint for [J, B, Q, ...] buffers under a mesh set with `jax.set_mesh` whose expert axis
  divides J; None otherwise."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None and mesh.axis_names else {}
  size = sizes.get(EXPERT_MESH_AXIS, 1)
  if size <= 1 or num_experts % size:
    return None
  return lambda a: jax.lax.with_sharding_constraint(a, P(EXPERT_MESH_AXIS, *([None] * (a.ndim - 1))))


class MoeMlp(nn.Module):
  """Router + J expert MLPs in place of a block's MLP (see the module docstring)."""

  num_experts: int
  top_k: int
  hidden: int
  kind: Literal["mlp", "gated"] = "mlp"
  activation: str = "gelu"
  capacity_factor: float = 1.25  # 0: dropless.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, valid_BT: jax.Array | None = None) -> jax.Array:
    d, j, f = x_BTD.shape[-1], self.num_experts, self.hidden
    if self.kind not in ("mlp", "gated"):
      raise ValueError(f"MoeMlp: kind must be 'mlp' or 'gated', got {self.kind!r}")
    router = self.param("router", nn.with_logical_partitioning(dense_init(0.1), ("embed", None)), (d, j),
                        self.param_dtype)
    expert = lambda name, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(_expert_init(), axes), shape, self.param_dtype)
    weights = moe_ops.ExpertWeights(
        expert("wi", (j, d, f), ("expert", "embed", "mlp")).astype(self.dtype),
        expert("wo", (j, f, d), ("expert", "mlp", "embed")).astype(self.dtype),
        expert("wg", (j, d, f), ("expert", "embed", "mlp")).astype(self.dtype) if self.kind == "gated" else None)
    x_BTD = x_BTD.astype(self.dtype)
    routing = moe_ops.route(x_BTD, router, self.top_k, valid_BT)
    if self.capacity_factor > 0:
      y_BTD, dropped = moe_ops.capacity_moe(x_BTD, routing, weights, activation=self.activation,
                                            capacity_factor=self.capacity_factor, valid_BT=valid_BT,
                                            constrain=_expert_constraint(j))
    else:
      y_BTD, dropped = moe_ops.dropless_moe(x_BTD, routing, weights, activation=self.activation), jnp.zeros(())
    if not self.is_initializing():  # `init` returns parameters only.
      self.sow("moe", "load_balance_loss",
               moe_ops.load_balance_loss(routing.probs_BTJ, routing.experts_BTA, valid_BT))
      self.sow("moe", "router_z_loss", moe_ops.router_z_loss(routing.logits_BTJ, valid_BT))
      self.sow("moe", "dropped_fraction", jax.lax.stop_gradient(dropped))
    return y_BTD


def moe_losses(collection: Any) -> dict[str, jax.Array]:
  """The sown values of a model's "moe" collection, per name: {"load_balance_loss": [L'], ...}, one float32 entry
  per MoE layer (scanned layers' stacked values flattened). Empty names are absent."""
  found: dict[str, list[jax.Array]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(collection):
    names = [getattr(k, "key", None) for k in path]
    name = next((n for n in reversed(names) if n in LOSS_NAMES), None)
    if name is not None:
      found.setdefault(name, []).append(jnp.ravel(leaf).astype(jnp.float32))
  return {k: jnp.concatenate(v) for k, v in found.items()}
