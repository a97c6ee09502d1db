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


InitFn = Callable[[jax.Array], Any]  # rng -> the model's parameters (possibly nn.LogicallyPartitioned boxes).


def token_init(model: nn.Module, seq_len: int) -> InitFn:
  """The parameters of a model applied to tokens [B, T] (a decoder LM), initialised from a [1, seq_len] sample."""
  return lambda rng: model.init({"params": rng}, jnp.zeros((1, seq_len), jnp.int32))["params"]


def _init_boxed(init_params: InitFn, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  params = init_params(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=state_rng, skipped_steps=jnp.zeros((), jnp.int32))


def init_train_state(init_params: InitFn, optimizer: optax.GradientTransformation, *, seed: int,
                     mesh: Mesh) -> tuple[TrainState, Any]:
  """Initialises the state directly into its sharded layout. Returns (state, state_shardings)."""
  init: Callable[[jax.Array], TrainState] = lambda r: _init_boxed(init_params, optimizer, r)  # noqa: E731
  rng = jax.random.PRNGKey(seed)
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng), mesh)
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(init_params: InitFn, optimizer: optax.GradientTransformation, *, mesh: Mesh
                   ) -> tuple[TrainState, Any]:
  """Shapes, dtypes and shardings of the state without allocating it (the target of a checkpoint restore)."""
  boxed = jax.eval_shape(lambda r: _init_boxed(init_params, optimizer, r), jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed),
                          shardings)
  return abstract, shardings


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation, *, seq_len: int, seed: int,
                       mesh: Mesh) -> tuple[TrainState, Any]:
  """`init_train_state` of a model applied to tokens [B, T] (`token_init`)."""
  return init_train_state(token_init(model, seq_len), optimizer, seed=seed, mesh=mesh)


def abstract_train_state(model: nn.Module, optimizer: optax.GradientTransformation, *, seq_len: int,
                         mesh: Mesh) -> tuple[TrainState, Any]:
  """`abstract_state` of a model applied to tokens [B, T] (`token_init`)."""
  return abstract_state(token_init(model, seq_len), optimizer, mesh=mesh)


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
