"""The mixer contract: the one interface every sequence mixer registered in `seqjax.nn.mixers` implements.

Legend (the one of docs/ARCHITECTURE.md): B batch, T length, D model width (and, in the states below, K kv heads,
H head dim, S cache slots, R recurrent state width, E expanded width, P state size, N heads, W conv width).

A mixer maps x[B, T, D] to y[B, T, D] along the sequence and carries a **state** from token to token. It has
three methods, each called through `module.apply(variables, ..., method=...)`:

    y_BTD = mixer(x_BTD, *, segment_ids=None, positions=None, deterministic=True)            # parallel form
    y_BTD, state = mixer(x_BTD, ..., return_state=True)                                      # prefill
    state = mixer.init_state(batch_size, max_len, dtype=None)                                # the empty state
    y_BD, state = mixer.step(x_BD, state, *, deterministic=True)                             # one token per row

- `segment_ids` int [B, T] separate packed documents (nothing flows between them); id 0 is padding. `positions`
  int [B, T] restart at 0 at every document (None: 0, 1, 2, ...).
- `return_state=True` also returns the state after each row's **last real token** (the last position whose
  segment id is not 0), ready for `step`: rows may be right-padded, and the state is the one the unpadded row
  gives (independent of the padding). When a row packs several documents, it is the last document's state — the
  step continues that document.
- `init_state` is the state before any token (no parameters needed; it also works on an unbound module).
  `max_len` is the longest context a state must hold (only a KV cache depends on it); `dtype` is the dtype of
  stored activations (KV cache, conv window; None: the mixer's compute dtype). Recurrent and SSM states are
  float32 (complex64 for S4D/S5) whatever the dtype.
- `step` consumes one token per row. Whatever it needs about the token's place in the sequence (a KV cache's
  fill level, the RoPE position) is carried in the state per row, so rows may sit at different positions (ragged
  prompts). Prefill of T tokens followed by k steps equals the parallel form over T + k tokens.
- A state is a plain pytree of arrays (no flax collections) with the batch on axis 0 of every leaf, so it passes
  through `jax.jit`, `lax.while_loop` and `nn.scan` as an ordinary argument.

States of the built-in mixers (tests/nn/test_mixer_contract.py checks all of them, and every newly registered
mixer, against the parallel form):

    attention        KVCache(key [B, K, S, H], value [B, K, S, H] compute dtype, index int32 [B], position int32 [B])
                     S = max_len, or the window when model.attention.window > 0 (a ring buffer)
    lstm             (h [B, R], c [B, R]) float32
    gru, rnn         (h [B, R],) float32
    s4d              h complex64 [B, D, P]
    s5               h complex64 [B, P]
    mamba            {"conv": [B, W - 1, E] compute dtype, "ssm": float32 [B, E, P]}
    mamba2           {"conv": [B, W - 1, E + 2P] compute dtype, "ssm": float32 [B, N, H, P]}
    linear, retnet,  {"kv": float32 [B, N, P, H] (P key width or Performer features, H value width; H + 1 for
    gla, deltanet,    normalised "linear" and "performer"), "position": int32 [B]}
    performer,
    gated_deltanet
    longformer,      KVCache of max_len slots, as attention (reformer: the normalised shared keys, float32);
    bigbird,         a step sees the slots its sparse pattern allows (docs/sparse_attention.md)
    reformer
    rwkv             {"kv": float32 [B, N, P, H], "shift": [B, D], "channel_shift": [B, D] compute dtype}
    based            {"linear": {"kv": float32 [B, N, 1 + P + P^2, H + 1], "position"}, "window": KVCache (W slots)}

`register_mixer` checks a new mixer's module against this contract (`contract_problems`) when it is registered.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

State = Any  # a pytree of arrays, batch on axis 0


@runtime_checkable
class Mixer(Protocol):
  """What a registered mixer module provides (see the module docstring for the semantics)."""

  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True,
               return_state: bool = False) -> jax.Array | tuple[jax.Array, State]:
    ...

  def init_state(self, batch_size: int, max_len: int, dtype: Any = None) -> State:
    ...

  def step(self, x_BD: jax.Array, state: State, *, deterministic: bool = True) -> tuple[jax.Array, State]:
    ...


# (method, positional parameters after self, keyword parameters) that the contract calls.
_REQUIRED = (
    ("__call__", ("x_BTD",), ("segment_ids", "positions", "deterministic", "return_state")),
    ("init_state", ("batch_size", "max_len", "dtype"), ()),
    ("step", ("x_BD", "state"), ("deterministic",)),
)


def _signature_problems(name: str, fn: Any, positional: tuple[str, ...], keywords: tuple[str, ...]) -> list[str]:
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return [f"{name} has no inspectable signature"]
  if params and params[0].name == "self":
    params = params[1:]
  var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
  var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
  by_position = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  by_name = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  problems = []
  if len(by_position) < len(positional) and not var_positional:
    problems.append(f"{name} takes {len(by_position)} positional argument(s), the contract passes "
                    f"{len(positional)} ({', '.join(positional)})")
  missing = [k for k in keywords if k not in by_name]
  if missing and not var_keyword:
    problems.append(f"{name} lacks the keyword argument(s) {', '.join(missing)}")
  return problems


def contract_problems(module: Any) -> list[str]:
  """What `module` lacks of the mixer contract (empty if nothing): missing methods or arguments.

  Only inspects methods and signatures; nothing is traced or compiled.
  """
  problems = []
  for method, positional, keywords in _REQUIRED:
    fn = getattr(type(module), method, None)
    if fn is None or not callable(fn):
      args = ", ".join(positional + tuple(f"{k}=..." for k in keywords))
      problems.append(f"no method {method}({args})")
      continue
    problems += _signature_problems(method, fn, positional, keywords)
  return problems


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by the mixers' `return_state` paths.
# ----------------------------------------------------------------------------------------------------------------


def last_token_lengths(segment_ids_BT: jax.Array | None, batch: int, length: int) -> jax.Array:
  """int32 [B]: one past each row's last real token (segment id != 0); `length` for every row if None."""
  if segment_ids_BT is None:
    return jnp.full((batch,), length, jnp.int32)
  t_BT = jnp.arange(1, length + 1, dtype=jnp.int32)[None]
  return jnp.max(jnp.where(segment_ids_BT != 0, t_BT, 0), axis=1).astype(jnp.int32)


def next_positions(positions_BT: jax.Array | None, lengths_B: jax.Array) -> jax.Array:
  """int32 [B]: the position of the token after each row's last real one (0 for an empty row)."""
  if positions_BT is None:
    return lengths_B
  last_B = jnp.take_along_axis(positions_BT, jnp.maximum(lengths_B - 1, 0)[:, None], axis=1)[:, 0]
  return jnp.where(lengths_B > 0, last_B + 1, 0).astype(jnp.int32)


def roll_rows(x_BT: jax.Array, shift_B: jax.Array) -> jax.Array:
  """Rotates each row b of x [B, T, ...] right by shift[b] along axis 1 (row content at t moves to t + shift)."""
  length = x_BT.shape[1]
  source_BT = jnp.mod(jnp.arange(length, dtype=jnp.int32)[None] - shift_B[:, None], length)
  source = source_BT.reshape(source_BT.shape + (1,) * (x_BT.ndim - 2))
  return jnp.take_along_axis(x_BT, source, axis=1)


def right_align(x_BTD: jax.Array, segment_ids_BT: jax.Array | None):
  """Rows rotated so that each row's last real token sits at T - 1: (x, segment ids, lengths [B]).

  A scan returns the state after position T - 1; run on the rotated rows it returns each row's state after its
  last real token. The padding moves to the front, as a segment of its own (id 0) that the first real token resets
  (every scan here resets where the segment id changes). `restore` rotates outputs back. Without segment ids every
  row is full and nothing moves.
  """
  batch, length = x_BTD.shape[:2]
  lengths_B = last_token_lengths(segment_ids_BT, batch, length)
  if segment_ids_BT is None:
    return x_BTD, None, lengths_B
  shift_B = length - lengths_B
  return roll_rows(x_BTD, shift_B), roll_rows(segment_ids_BT, shift_B), lengths_B


def restore(y_BTD: jax.Array, lengths_B: jax.Array) -> jax.Array:
  """Undoes `right_align` on an output [B, T, ...]."""
  return roll_rows(y_BTD, lengths_B - y_BTD.shape[1])


def where_rows(pick_B: jax.Array, a: State, b: State) -> State:
  """Per row b: the state `a` where pick[b], else `b` (two states of the same structure)."""
  def select(x, y):
    return jnp.where(pick_B.reshape(pick_B.shape + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(select, a, b)
