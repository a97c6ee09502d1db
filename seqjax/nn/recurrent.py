"""Linen recurrent layers (RNN / LSTM / GRU) and the recurrent sequence mixers for the LM.

Thin wrappers over `seqjax.ops.recurrent`: they own the parameters (PyTorch layout, so checkpoints
port both ways) and call the ops. Every layer has a full-sequence `__call__` and a one-token `step`
with an explicit state, and the two agree.

Dimension legend (docs/ARCHITECTURE.md): B batch, T length, I input width, R recurrent state width, D model width,
Z gates per cell.

Initialisation: input weights LeCun-normal per gate, recurrent weights orthogonal per gate block,
biases zero except the LSTM forget gate, whose input bias is 1.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import contract, sequence_parallel
from seqjax.ops import recurrent as ops

Array = jax.Array
Dtype = Any
State = tuple[Array, ...]

CELLS = ("lstm", "gru", "rnn")
_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_MERGES = ("concat", "sum")


def _per_gate(init, gates: int):
  """Initialise a [Z*R, I or R] matrix block by block (e.g. one orthogonal matrix per gate)."""

  def f(key, shape, dtype=jnp.float32):
    rows, cols = shape
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, (rows // gates, cols), dtype) for k in keys], axis=0)

  return f


def _input_bias_init(cell: str):
  def f(key, shape, dtype=jnp.float32):
    del key
    bias = jnp.zeros(shape, dtype)
    if cell == "lstm":  # forget gate (second block of i, f, g, o) starts open
      h = shape[0] // 4
      bias = bias.at[h:2 * h].set(1.0)
    return bias

  return f


def _check_cell(cell: str, nonlinearity: str):
  if cell not in CELLS:
    raise ValueError(f"unknown recurrent cell {cell!r}; choose one of {CELLS}.")
  if nonlinearity not in ("tanh", "relu"):
    raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}.")


class RecurrentDirection(nn.Module):
  """One recurrent layer in one direction. Params: w_ih [Z*R, I], w_hh [Z*R, R], b_ih, b_hh."""

  hidden: int
  cell: str = "lstm"
  reverse: bool = False
  nonlinearity: str = "tanh"
  param_dtype: Dtype = jnp.float32
  unroll: int = ops.DEFAULT_UNROLL
  chunk: int = ops.DEFAULT_CHUNK
  remat: bool = False

  @nn.compact
  def weights(self, in_features: int) -> tuple[Array, Array, Array, Array]:
    _check_cell(self.cell, self.nonlinearity)
    g, h = _GATES[self.cell], self.hidden
    w_ih = self.param("w_ih", _per_gate(nn.initializers.lecun_normal(), g), (g * h, in_features),
                      self.param_dtype)
    w_hh = self.param("w_hh", _per_gate(nn.initializers.orthogonal(), g), (g * h, h),
                      self.param_dtype)
    b_ih = self.param("b_ih", _input_bias_init(self.cell), (g * h,), self.param_dtype)
    b_hh = self.param("b_hh", nn.initializers.zeros_init(), (g * h,), self.param_dtype)
    return w_ih, w_hh, b_ih, b_hh

  def init_state(self, batch_size: int) -> State:
    n = 2 if self.cell == "lstm" else 1
    return tuple(jnp.zeros((batch_size, self.hidden), jnp.float32) for _ in range(n))

  def __call__(self, x_BTI: Array, state: State | None = None, *, lengths: Array | None = None,
               segment_ids: Array | None = None) -> tuple[Array, State]:
    """x [B, T, I] -> (ys [B, T, R], final state). The state defaults to zeros."""
    w = self.weights(x_BTI.shape[-1])
    state = self.init_state(x_BTI.shape[0]) if state is None else tuple(state)
    kw = dict(lengths=lengths, reverse=self.reverse, segment_ids=segment_ids, unroll=self.unroll,
              chunk=self.chunk, remat=self.remat)
    if self.cell == "lstm":
      ys, st = ops.lstm(x_BTI, *state, *w, **kw)
      return ys, tuple(st)
    if self.cell == "gru":
      ys, h = ops.gru(x_BTI, *state, *w, **kw)
    else:
      ys, h = ops.rnn(x_BTI, *state, *w, nonlinearity=self.nonlinearity, **kw)
    return ys, (h,)

  def step(self, x_BI: Array, state: State) -> tuple[Array, State]:
    """One token: x [B, I], state -> (y [B, R] float32, new state)."""
    if self.reverse:
      raise ValueError("a reverse-direction layer cannot be stepped token by token.")
    w = self.weights(x_BI.shape[-1])
    if self.cell == "lstm":
      h, c = ops.lstm_step(x_BI, *state, *w)
      return h, (h, c)
    if self.cell == "gru":
      h = ops.gru_step(x_BI, *state, *w)
    else:
      h = ops.rnn_step(x_BI, *state, *w, nonlinearity=self.nonlinearity)
    return h, (h,)


class Recurrent(nn.Module):
  """Stacked (optionally bidirectional) recurrent layers with dropout between layers.

  Attributes:
    hidden: R, the state width of each direction.
    cell: "lstm", "gru" or "rnn".
    num_layers: stacked layers; layer l+1 reads layer l's (merged) outputs.
    bidirectional: add a reverse-direction layer at every level.
    merge: "concat" ([B, T, 2R]) or "sum" ([B, T, R]) of the two directions.
    dropout: rate applied to the outputs of every layer except the last (needs a "dropout" rng).
  """

  hidden: int
  cell: str = "lstm"
  num_layers: int = 1
  bidirectional: bool = False
  merge: str = "concat"
  dropout: float = 0.0
  nonlinearity: str = "tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  unroll: int = ops.DEFAULT_UNROLL
  chunk: int = ops.DEFAULT_CHUNK
  remat: bool = False

  def setup(self):
    _check_cell(self.cell, self.nonlinearity)
    if self.merge not in _MERGES:
      raise ValueError(f"merge must be one of {_MERGES}, got {self.merge!r}.")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
    make = lambda reverse, name: RecurrentDirection(
        hidden=self.hidden, cell=self.cell, reverse=reverse, nonlinearity=self.nonlinearity,
        param_dtype=self.param_dtype, unroll=self.unroll, chunk=self.chunk, remat=self.remat,
        name=name)
    self.forward_layers = [make(False, f"l{l}_fwd") for l in range(self.num_layers)]
    if self.bidirectional:
      self.backward_layers = [make(True, f"l{l}_bwd") for l in range(self.num_layers)]
    self.drop = nn.Dropout(self.dropout)

  @property
  def num_directions(self) -> int:
    return 2 if self.bidirectional else 1

  @property
  def output_features(self) -> int:
    return 2 * self.hidden if self.bidirectional and self.merge == "concat" else self.hidden

  def init_state(self, batch_size: int) -> list[State]:
    """Zero states, one per (layer, direction), ordered [l0_fwd, (l0_bwd,) l1_fwd, ...]."""
    n = 2 if self.cell == "lstm" else 1
    zero = lambda: tuple(jnp.zeros((batch_size, self.hidden), jnp.float32) for _ in range(n))
    return [zero() for _ in range(self.num_layers * self.num_directions)]

  def _merge(self, a: Array, b: Array) -> Array:
    return jnp.concatenate([a, b], axis=-1) if self.merge == "concat" else a + b

  def __call__(self, x_BTI: Array, state: Sequence[State] | None = None, *,
               lengths: Array | None = None, segment_ids: Array | None = None,
               deterministic: bool = True) -> tuple[Array, list[State]]:
    """x [B, T, I] -> (ys [B, T, output_features] in `dtype`, final states as in `init_state`)."""
    if x_BTI.ndim != 3:
      raise ValueError(f"Recurrent expects x [B, T, I], got shape {x_BTI.shape}.")
    state = self.init_state(x_BTI.shape[0]) if state is None else list(state)
    if len(state) != self.num_layers * self.num_directions:
      raise ValueError(f"expected {self.num_layers * self.num_directions} states (layers x "
                       f"directions), got {len(state)}.")
    h_BTI = x_BTI.astype(self.dtype)
    finals = []
    for l in range(self.num_layers):
      kw = dict(lengths=lengths, segment_ids=segment_ids)
      ys, st = self.forward_layers[l](h_BTI, state[l * self.num_directions], **kw)
      finals.append(st)
      if self.bidirectional:
        ys_b, st_b = self.backward_layers[l](h_BTI, state[l * 2 + 1], **kw)
        finals.append(st_b)
        ys = self._merge(ys, ys_b)
      h_BTI = ys.astype(self.dtype)
      if l < self.num_layers - 1:
        h_BTI = self.drop(h_BTI, deterministic=deterministic)
    return h_BTI, finals

  def step(self, x_BI: Array, state: Sequence[State], *,
           deterministic: bool = True) -> tuple[Array, list[State]]:
    """One token through all layers: x [B, I], states -> (y [B, R], new states)."""
    if self.bidirectional:
      raise ValueError("a bidirectional layer sees the future; it has no token-by-token step. "
                       "Use a unidirectional layer for decoding.")
    h_BI = x_BI.astype(self.dtype)
    new_state = []
    for l in range(self.num_layers):
      y, st = self.forward_layers[l].step(h_BI, state[l])
      new_state.append(st)
      h_BI = y.astype(self.dtype)
      if l < self.num_layers - 1:
        h_BI = self.drop(h_BI, deterministic=deterministic)
    return h_BI, new_state


class LSTM(Recurrent):
  cell: str = "lstm"


class GRU(Recurrent):
  cell: str = "gru"


class RNN(Recurrent):
  cell: str = "rnn"


class RecurrentMixer(nn.Module):
  """A recurrent sequence mixer for the LM: x [B, T, D] -> one recurrent layer of width
  `hidden` (default D) -> a Dense back to D. Packed documents are kept apart by resetting the
  state where `segment_ids` changes. Implements the mixer contract (`seqjax.nn.contract`); the
  state is (h, c) for the LSTM, (h,) otherwise, each [B, hidden] float32."""

  d_model: int
  hidden: int | None = None
  cell: str = "lstm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.rnn = RecurrentDirection(hidden=self.hidden or self.d_model, cell=self.cell,
                                  param_dtype=self.param_dtype, name="rnn")
    self.out = nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="out")

  def init_state(self, batch_size: int, max_len: int = 0, dtype: Dtype = None) -> State:
    """Zero state: (h, c) for the LSTM, (h,) otherwise, each [B, hidden] float32 (`max_len` and
    `dtype` do not change it). Works on an unbound module (no params needed)."""
    del max_len, dtype
    n = 2 if self.cell == "lstm" else 1
    return tuple(jnp.zeros((batch_size, self.hidden or self.d_model), jnp.float32)
                 for _ in range(n))

  def __call__(self, x_BTD: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               return_state: bool = False) -> Array | tuple[Array, State]:
    """x [B, T, D] -> y [B, T, D] (and, with `return_state`, the state after each row's last
    real token); `positions` and `deterministic` are accepted and unused."""
    del positions, deterministic
    if sequence_parallel.active():
      raise ValueError(f"{type(self).__name__} ({self.cell}): a recurrent mixer cannot run on a sequence-sharded mesh "
                       f"(mesh.seq > 1): its nonlinear state goes step by step; use mesh.seq=1")
    if x_BTD.ndim != 3 or x_BTD.shape[-1] != self.d_model:
      raise ValueError(f"{type(self).__name__} expects x [B, T, {self.d_model}], "
                       f"got {x_BTD.shape}.")
    if not return_state:
      ys_BTR, _ = self.rnn(x_BTD.astype(self.dtype), segment_ids=segment_ids)
      return self.out(ys_BTR.astype(self.dtype))
    x_BTD, segment_ids, lengths_B = contract.right_align(x_BTD, segment_ids)
    ys_BTR, state = self.rnn(x_BTD.astype(self.dtype), segment_ids=segment_ids)
    y_BTD = contract.restore(self.out(ys_BTR.astype(self.dtype)), lengths_B)
    state = contract.where_rows(lengths_B > 0, state, self.init_state(x_BTD.shape[0]))
    return y_BTD, state

  def step(self, x_BD: Array, state: State, *, deterministic: bool = True) -> tuple[Array, State]:
    """One token: x [B, D], state -> (y [B, D], new state)."""
    del deterministic
    y_BR, state = self.rnn.step(x_BD.astype(self.dtype), state)
    return self.out(y_BR.astype(self.dtype)), state


class LSTMMixer(RecurrentMixer):
  cell: str = "lstm"


class GRUMixer(RecurrentMixer):
  cell: str = "gru"


class RNNMixer(RecurrentMixer):
  cell: str = "rnn"
