"""The recurrent ops over sequences: `lstm`, `gru`, `rnn` (batch-major, with lengths, reversal, segment resets).

Batch-major sequences: ``x [B, T, I]`` in, ``ys [B, T, R]`` out; weights and gate order as in `cells.py`.

Masking: ``lengths [B]`` makes steps ``t >= lengths[b]`` leave the state unchanged and emit zeros;
``reverse=True`` runs each sequence backwards from its own last valid step (padding is at the end).
``segment_ids [B, T]`` (packed rows) resets the state to the initial state wherever the id changes
between consecutive steps (in the scan direction), so packed segments run independently.

Kernels: on a CPU the whole step loop, forward or backward, runs in one C++ call (`seqjax.cpu_kernels.recurrent`,
op family "recurrent" of `seqjax.ops.backend`) wherever it applies (float32 weights, H a multiple of 16); elsewhere,
and with `SEQJAX_CPU_KERNELS=off`, the chunked `lax.scan` kernel of `scan.py`. `unroll` and `chunk` tune the scan
only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqjax.ops import backend
from seqjax.ops.recurrent import cells
from seqjax.ops.recurrent.cells import NONLINEARITIES, NUM_GATES
from seqjax.ops.recurrent.scan import scan_core

Array = jax.Array

DEFAULT_UNROLL = 4
DEFAULT_CHUNK = 8


# ----------------------------------------------------------------------------------------------
# Input checking and the shared driver.
# ----------------------------------------------------------------------------------------------
def _check(kind, x, states, w_ih, w_hh, b_ih, b_hh, lengths, segment_ids):
  g = NUM_GATES[kind]
  if x.ndim != 3:
    raise ValueError(f"{kind}: x must be batch-major [B, T, I], got shape {x.shape}.")
  b, t, i = x.shape
  if w_hh.ndim != 2 or w_hh.shape[0] % g or w_hh.shape[0] // g != w_hh.shape[1]:
    raise ValueError(f"{kind}: w_hh must be [{g}*R, R] (gates stacked on axis 0, PyTorch layout), "
                     f"got {w_hh.shape}.")
  h = w_hh.shape[1]
  if w_ih.shape != (g * h, i):
    raise ValueError(f"{kind}: w_ih must be [{g}*R, I] = {(g * h, i)} for x {x.shape} and "
                     f"w_hh {w_hh.shape}, got {w_ih.shape}.")
  for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
    if bias.shape != (g * h,):
      raise ValueError(f"{kind}: {name} must be [{g}*R] = {(g * h,)}, got {bias.shape}.")
  for n, s in enumerate(states):
    if s.shape != (b, h):
      raise ValueError(f"{kind}: initial state #{n} must be [B, R] = {(b, h)}, got {s.shape}.")
  if lengths is not None and lengths.shape != (b,):
    raise ValueError(f"{kind}: lengths must be [B] = {(b,)}, got {lengths.shape}.")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"{kind}: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}.")


def _run(kind, pointwise, x_BTI, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, segment_ids,
         unroll, remat, chunk, cell):
  x_BTI, w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, (x_BTI, w_ih, w_hh, b_ih, b_hh))
  states = tuple(map(jnp.asarray, states))
  lengths = None if lengths is None else jnp.asarray(lengths)
  segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
  _check(kind, x_BTI, states, w_ih, w_hh, b_ih, b_hh, lengths, segment_ids)
  if chunk < 1 or unroll < 1:
    raise ValueError(f"{kind}: chunk and unroll must be >= 1, got chunk={chunk}, unroll={unroll}.")
  kernel = backend.cpu_kernel("recurrent")
  if kernel is not None and not kernel.supports(cell, x_BTI, w_ih, w_hh):
    kernel = None
  b, t, _ = x_BTI.shape
  # Time-major; `reverse` flips time so the core always runs forwards. With padding at the end,
  # a flipped sequence first meets its padding (which keeps the initial state), then its last
  # valid step: each sequence runs backwards from its own last valid step.
  x_TBI = jnp.swapaxes(x_BTI, 0, 1)
  keep_TB = None if lengths is None else jnp.arange(t)[:, None] < lengths[None, :]
  seg_TB = None if segment_ids is None else jnp.swapaxes(segment_ids, 0, 1)
  flip = (lambda a: None if a is None else jnp.flip(a, 0)) if reverse else (lambda a: a)
  x_TBI, keep_TB, seg_TB = flip(x_TBI), flip(keep_TB), flip(seg_TB)
  reset_TB = None
  if seg_TB is not None:
    reset_TB = jnp.concatenate([jnp.zeros_like(seg_TB[:1], bool), seg_TB[1:] != seg_TB[:-1]])
  states = tuple(s.astype(jnp.float32) for s in states)
  scan = functools.partial(scan_core, pointwise, int(unroll), bool(remat), chunk)
  if kernel is not None:
    ys_TBR, final_state = backend.on_cpu(functools.partial(kernel.recurrence, cell, remat=bool(remat)), scan, x_TBI,
                                     states, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB)
  else:
    ys_TBR, final_state = scan(x_TBI, states, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB)
  return jnp.swapaxes(flip(ys_TBR), 0, 1).astype(x_BTI.dtype), final_state


def lstm(x: Array, h0: Array, c0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
         lengths: Array | None = None, reverse: bool = False, segment_ids: Array | None = None,
         unroll: int = DEFAULT_UNROLL, chunk: int = DEFAULT_CHUNK,
         remat: bool = False) -> tuple[Array, tuple[Array, Array]]:
  """LSTM over a batch-major sequence (PyTorch gate order i, f, g, o).

  Args:
    x: inputs [B, T, I].
    h0, c0: initial hidden and cell state [B, R].
    w_ih: [4R, I]; w_hh: [4R, R]; b_ih, b_hh: [4R].
    lengths: optional int [B]; steps t >= lengths[b] keep the state and emit zeros.
    reverse: run each sequence backwards from its last valid step.
    segment_ids: optional int [B, T]; the state is reset to (h0, c0) where the id changes.
    unroll: unroll factor of the step loop inside a chunk.
    chunk: steps per chunk of the hoisted, pipelined input projection (T is padded up to a
      multiple with state-keeping steps).
    remat: save only the per-step state; recompute the rest in the backward pass.

  Returns:
    ys [B, T, R] in x.dtype and the final state (h_T, c_T), each [B, R] float32 (for `reverse`,
    the state after the first step).
  """
  ys, (h, c) = _run("lstm", cells.lstm_pointwise, x, (h0, c0), w_ih, w_hh, b_ih, b_hh, lengths,
                    reverse, segment_ids, unroll, remat, chunk, "lstm")
  return ys, (h, c)


def gru(x: Array, h0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
        lengths: Array | None = None, reverse: bool = False, segment_ids: Array | None = None,
        unroll: int = DEFAULT_UNROLL, chunk: int = DEFAULT_CHUNK,
        remat: bool = False) -> tuple[Array, Array]:
  """GRU over a batch-major sequence (PyTorch gate order r, z, n; b_hn inside the reset product).

  Args: as `lstm` with w_ih [3R, I], w_hh [3R, R], b_ih, b_hh [3R] and one state h0 [B, R].

  Returns:
    ys [B, T, R] in x.dtype and the final state h_T [B, R] float32.
  """
  ys, (h,) = _run("gru", cells.gru_pointwise, x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                  segment_ids, unroll, remat, chunk, "gru")
  return ys, h


def rnn(x: Array, h0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
        nonlinearity: str = "tanh", lengths: Array | None = None, reverse: bool = False,
        segment_ids: Array | None = None, unroll: int = DEFAULT_UNROLL,
        chunk: int = DEFAULT_CHUNK, remat: bool = False) -> tuple[Array, Array]:
  """Elman RNN, h' = act(W_ih x + b_ih + W_hh h + b_hh), act in {"tanh", "relu"}.

  Args: as `gru` with w_ih [R, I], w_hh [R, R], b_ih, b_hh [R].

  Returns:
    ys [B, T, R] in x.dtype and the final state h_T [B, R] float32.
  """
  if nonlinearity not in NONLINEARITIES:
    raise ValueError(f"rnn: nonlinearity must be one of {sorted(NONLINEARITIES)}, "
                     f"got {nonlinearity!r}.")
  ys, (h,) = _run("rnn", cells.rnn_pointwise(nonlinearity), x, (h0,), w_ih, w_hh, b_ih, b_hh,
                  lengths, reverse, segment_ids, unroll, remat, chunk, f"rnn_{nonlinearity}")
  return ys, h
