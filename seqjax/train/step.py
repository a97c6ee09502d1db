"""The jitted train step: a pure function of (state, batch), the same for every task.

A task (seqjax.train.task) gives the step its loss as a function

    loss_sum(params, batch, rng, deterministic) -> (sum, weight)     # float32 scalars

the weighted sum of its per-example (or per-token) losses and the total weight; the step trains on their ratio,
the weighted mean. A loss may also return a third value, a dict of weighted sums of other scalars to log (e.g. the
mixture-of-experts auxiliary losses times the weight): the step divides each by the total weight and returns them
in metrics["extras"], which the loop logs with the loss. `rng` is the step's key, fold_in(state.rng, state.step) (dropout, scheduled sampling, ...);
`deterministic` is False in training. Gradient accumulation splits every leaf of the batch along its first axis
into `grad_accum_steps` micro-batches, sums loss, weight and gradients (float32) over them and divides once by the
total weight, so it is exactly the full-batch gradient up to summation order.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from seqjax.train import sharding
from seqjax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array, bool], tuple[jax.Array, jax.Array]]


def _micro_batches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...], micro-batch j holding rows j, j+n, ... (each device keeps its own rows)."""
  def split(x):
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss_sum: LossFn, optimizer: optax.GradientTransformation, *, grad_accum_steps: int = 1,
                    on_nan: Literal["stop", "skip", "rollback"] = "stop"
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Returns `step(state, batch) -> (state, metrics)` (not yet jitted; see `jit_train_step`) minimising the
  weighted mean of `loss_sum` (see the module docstring) with `optimizer`.

  Non-finite loss or gradients are detected inside the step, at no extra host sync: the update is then dropped
  (params and optimizer state keep their old values), `state.step` still advances and `state.skipped_steps`
  counts it. metrics["finite"] says whether the update was applied; metrics["grads_finite"] and
  metrics["params_finite"] are bool[num_leaves] vectors (leaf order of `state.params`, see `leaf_names`) saying
  which gradients, and which parameters as the update would have left them, are finite — read on the host with
  the other metrics, one step late, for the non-finite report. Every `on_nan` mode runs this same program (so
  their results are bitwise comparable); the mode only decides what the host does next: "skip" goes on, "stop"
  writes a report and stops, "rollback" reloads the last checkpoint and skips the batch.
  """
  if on_nan not in ("stop", "skip", "rollback"):
    raise ValueError(f"on_nan must be 'stop', 'skip' or 'rollback', got {on_nan!r}")

  def train_loss(params, batch, rng):
    total, weight, *extras = loss_sum(params, batch, rng, False)
    extras = {k: v.astype(jnp.float32) for k, v in (extras[0] if extras else {}).items()}
    return total.astype(jnp.float32), (weight.astype(jnp.float32), extras)

  grad_fn = jax.value_and_grad(train_loss, has_aux=True)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      (total, (weight, extras)), grads = grad_fn(state.params, batch, rng)
    else:
      def body(carry, xs):
        micro, i = xs
        (l, (w, e)), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
        acc_l, acc_w, acc_e, acc_g = carry
        return (acc_l + l, acc_w + w, jax.tree.map(jnp.add, acc_e, e), jax.tree.map(jnp.add, acc_g, g)), None
      micro_batches = _micro_batches(batch, grad_accum_steps)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      extras_shape = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches), rng)[0][1][1]
      zero_extras = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), extras_shape)
      (total, weight, extras, grads), _ = jax.lax.scan(
          body, (jnp.zeros(()), jnp.zeros(()), zero_extras, zeros),
          (micro_batches, jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params_finite = _leaves_finite(params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(params_finite)
    keep_old = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, params=jax.tree.map(keep_old, params, state.params),
                              opt_state=jax.tree.map(keep_old, opt_state, state.opt_state),
                              skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": weight, "finite": finite,
               "grads_finite": _leaves_finite(grads), "params_finite": params_finite,
               "extras": {k: v / denom for k, v in extras.items()}}
    return new_state, metrics

  return step


def _leaves_finite(tree: Any) -> jax.Array:
  """bool[num_leaves]: whether each leaf of `tree` is entirely finite."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])


def leaf_names(tree: Any) -> list[str]:
  """"/"-joined key paths of the leaves of `tree`, in `jax.tree.leaves` order (e.g. "layer_0/mlp/wi/kernel")."""
  names = []
  for path, _ in jax.tree_util.tree_leaves_with_path(tree):
    names.append("/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path))
  return names


def skip_step(state: TrainState) -> TrainState:
  """The step a rollback takes for the batch it skips: no update, the step counted as skipped (as if the step
  had dropped a non-finite update), so a rolled-back run matches an on_nan="skip" run bitwise."""
  return state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the leaves of `tree` that hold a NaN or an infinity (for reports; syncs with the host)."""
  bad = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if not bool(jnp.all(jnp.isfinite(x))):
      bad.append(jax.tree_util.keystr(path))
  return bad


def jit_train_step(step: Callable, state_shardings: Any, batch_sharding: Any) -> Callable:
  """Jits with the state's shardings pinned and its buffers donated (updated in place). On a mesh of more than one
  device the step is traced and run under `jax.set_mesh` (`sharding.mesh_context`): on a sequence-sharded mesh
  attention and the SSM layers run context-parallel, and no CPU kernel gathers its operands (the ops' JAX code)."""
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))
  mesh = getattr(batch_sharding, "mesh", None)
  if mesh is None or mesh.devices.size == 1:
    return jitted

  @functools.wraps(step)
  def run(state, batch):
    with sharding.mesh_context(mesh):
      return jitted(state, batch)

  run.jitted = jitted
  return run
