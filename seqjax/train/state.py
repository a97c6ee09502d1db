"""The train state: everything a step reads and writes, and everything a checkpoint must hold to continue."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from seqjax.train import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2]: the run's base key; step t uses fold_in(rng, t), so resuming needs no rng stream.
  skipped_steps: jax.Array  # int32 scalar: updates dropped because the loss or gradients were not finite.


def _init_boxed(model: nn.Module, optimizer: optax.GradientTransformation, sample_inputs: jax.Array,
                rng: jax.Array) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  params = model.init({"params": init_rng}, sample_inputs)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=state_rng, skipped_steps=jnp.zeros((), jnp.int32))


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation, *, seq_len: int, seed: int,
                       mesh: Mesh) -> tuple[TrainState, Any]:
  """Initialises the state directly into its sharded layout. Returns (state, state_shardings)."""
  sample = jnp.zeros((1, seq_len), jnp.int32)
  init: Callable[[jax.Array], TrainState] = lambda r: _init_boxed(model, optimizer, sample, r)  # noqa: E731
  rng = jax.random.PRNGKey(seed)
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng), mesh)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_train_state(model: nn.Module, optimizer: optax.GradientTransformation, *, seq_len: int,
                         mesh: Mesh) -> tuple[TrainState, Any]:
  """Shapes, dtypes and shardings of the state without allocating it (the target of a checkpoint restore)."""
  sample = jnp.zeros((1, seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda r: _init_boxed(model, optimizer, sample, r), jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                          shardings)
  return abstract, shardings


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
