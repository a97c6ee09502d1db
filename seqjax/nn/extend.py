"""Multi-token extension of a mixer's state, and committing a prefix of it: what speculative decoding verifies with.

    y_BTD, pending = extend(mixer, x_BTD, state)     # T new tokens per row, from `state`; `state` is not changed
    state = commit(state, pending, count_B)          # the state after the first count[b] of them (1 <= count <= T)

`extend` gives the outputs that T `step`s from `state` give (tests/nn/test_extend.py checks every registered mixer)
and something from which the state after any prefix of the T tokens can be taken, so a row that keeps only its first
count[b] tokens (the ones the target accepted) gets exactly the state those tokens leave, whatever came after them.

- A mixer with its own `extend(x_BTD, state, *, deterministic)` method returns (y_BTD, pending) itself: attention
  (`seqjax.nn.mixers.AttentionMixer`) attends the T tokens over its KV cache and causally over each other in one
  parallel pass and returns their keys and values (`NewKeys`); committing writes the first count[b] of them into
  the cache. The cache is read before anything is written, so a sliding window's ring buffer loses nothing.
- Every other mixer (recurrent, SSM, linear attention) runs T cached `step`s (unrolled: T is small) and keeps the
  state after each (`StepStates`, every leaf [B, T, ...]); committing picks the one after token count[b] - 1. These
  states are small (no KV cache), so keeping T of them costs little, and a recurrence has no parallel form over an
  arbitrary initial state in the contract.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.nn.attention import KVCache


class NewKeys(NamedTuple):
  """An attention extension's pending tokens: keys (after RoPE) and values [B, T, K, H]."""

  key: jax.Array
  value: jax.Array


class StepStates(NamedTuple):
  """A stepped extension's pending states: the state after each new token, every leaf [B, T, ...]."""

  states: Any


def extend(mixer: Any, x_BTD: jax.Array, state: Any, *, deterministic: bool = True) -> tuple[jax.Array, Any]:
  """T new tokens per row through a (bound) mixer from `state`: (y [B, T, D], pending). See the module docstring."""
  if hasattr(mixer, "extend"):
    return mixer.extend(x_BTD, state, deterministic=deterministic)
  return stepped(mixer, x_BTD, state, deterministic=deterministic)


def stepped(mixer: Any, x_BTD: jax.Array, state: Any, *, deterministic: bool = True) -> tuple[jax.Array, StepStates]:
  """`extend` by T cached steps, keeping the state after each (any mixer; what one without `extend` gets)."""
  ys, states = [], []
  for t in range(x_BTD.shape[1]):
    y_BD, state = mixer.step(x_BTD[:, t], state, deterministic=deterministic)
    ys.append(y_BD)
    states.append(state)
  return jnp.stack(ys, axis=1), StepStates(jax.tree.map(lambda *leaves: jnp.stack(leaves, axis=1), *states))


def commit(state: Any, pending: Any, count_B: jax.Array) -> Any:
  """The state after the first count[b] (>= 1) tokens of an extension of each row b from `state`."""
  count_B = jnp.asarray(count_B, jnp.int32)
  if isinstance(pending, NewKeys):
    if not isinstance(state, KVCache):
      raise TypeError(f"commit: attention keys pending for a state of type {type(state).__name__}")
    return state.extend(pending.key, pending.value, count_B)
  if isinstance(pending, StepStates):
    def pick(leaf_BT):
      index = (count_B - 1).reshape((-1, 1) + (1,) * (leaf_BT.ndim - 2))
      return jnp.take_along_axis(leaf_BT, index, axis=1)[:, 0]
    return jax.tree.map(pick, pending.states)
  raise TypeError(f"commit: unknown pending extension {type(pending).__name__} (expected NewKeys or StepStates)")
