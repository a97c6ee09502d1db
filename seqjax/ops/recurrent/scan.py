"""Recurrent cells as pure `lax.scan` kernels: Elman RNN, LSTM, GRU.

Layout and conventions (PyTorch / cuDNN compatible, so checkpoints port both ways):

* Batch-major sequences: ``x [B, T, I]`` in, ``ys [B, T, H]`` out.
* Weights ``w_ih [G*H, I]``, ``w_hh [G*H, H]``, biases ``b_ih, b_hh [G*H]`` with G gates stacked:
  RNN G=1; LSTM G=4 ordered (i, f, g, o); GRU G=3 ordered (r, z, n) with ``b_hn`` inside the reset
  product, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h``.

Dimension legend: B batch, T sequence length, I input width, H hidden (state) width (``Hd`` in the
issue), G number of gates, so ``GH = G * H`` is the width of the stacked pre-activations.

Speed (details and numbers in docs/recurrent.md). On a CPU the ops run the native kernel of
`seqjax.ops.recurrent_native` (the whole step loop, forward or backward, in one C++ call; `native=None`), which
replaces the `lax.scan` kernel below wherever it applies. The `lax.scan` kernel (GPU/TPU,
`native=False`, shapes the native one does not cover):
* the input projection ``x @ w_ih.T + b_ih`` is hoisted out of the step loop: one
  ``[C*B, I] x [I, GH]`` matmul per chunk of C steps, software-pipelined so that the projection of
  chunk n+1 runs concurrently with the recurrence of chunk n (they are independent);
* the scan body is one ``[B, H] x [H, GH]`` matmul and a fused pointwise update, unrolled;
* the backward pass is a hand-written `custom_vjp`: the reverse scan only propagates ``dh`` (one
  matmul per step) and emits per-step pre-activation gradients; the weight and input gradients
  are then large per-chunk matmuls (what cuDNN does), overlapped with the next chunk's reverse
  recurrence, instead of autodiff's ``[GH, H]`` outer product accumulated every step;
* ``remat=True`` (for long sequences) saves only the state entering each step and recomputes the
  projections in the backward pass: residual memory per step drops from ~(2G + 2) B H floats to
  ~2 B H (LSTM), for extra matmuls. Residual memory is linear in T either way.

Masking: ``lengths [B]`` makes steps ``t >= lengths[b]`` leave the state unchanged and emit zeros;
``reverse=True`` runs each sequence backwards from its own last valid step (padding is at the end).
``segment_ids [B, T]`` (packed rows) resets the state to the initial state wherever the id changes
between consecutive steps (in the scan direction), so packed segments run independently.

The scan is differentiable with `jax.grad`/`jax.vjp` (reverse mode); forward-mode (`jax.jvp`) is not
supported by the custom backward.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops import native as native_lib
from seqjax.ops import recurrent_native

Array = jax.Array

_NUM_GATES = {"rnn": 1, "lstm": 4, "gru": 3}
_NONLINEARITIES = {"tanh": jnp.tanh, "relu": jax.nn.relu}
DEFAULT_UNROLL = 4
DEFAULT_CHUNK = 8


# ----------------------------------------------------------------------------------------------
# Pointwise cell updates. Each maps (input pre-activation gx [B, GH], recurrent pre-activation
# hz = h @ w_hh.T + b_hh [B, GH], state) -> (new state, output y [B, H]). All float32.
# ----------------------------------------------------------------------------------------------
def _lstm_pointwise(gx_BG, hz_BG, state):
  _, c_BH = state
  z_BG = gx_BG + hz_BG
  i_BH, f_BH, g_BH, o_BH = jnp.split(z_BG, 4, axis=-1)
  c_BH = jax.nn.sigmoid(f_BH) * c_BH + jax.nn.sigmoid(i_BH) * jnp.tanh(g_BH)
  h_BH = jax.nn.sigmoid(o_BH) * jnp.tanh(c_BH)
  return (h_BH, c_BH), h_BH


def _gru_pointwise(gx_BG, hz_BG, state):
  (h_BH,) = state
  xr_BH, xz_BH, xn_BH = jnp.split(gx_BG, 3, axis=-1)
  hr_BH, hzz_BH, hn_BH = jnp.split(hz_BG, 3, axis=-1)
  r_BH = jax.nn.sigmoid(xr_BH + hr_BH)
  z_BH = jax.nn.sigmoid(xz_BH + hzz_BH)
  n_BH = jnp.tanh(xn_BH + r_BH * hn_BH)
  h_BH = n_BH + z_BH * (h_BH - n_BH)  # == (1 - z) * n + z * h
  return (h_BH,), h_BH


def _rnn_pointwise(nonlinearity: str):
  act = _NONLINEARITIES[nonlinearity]

  def pointwise(gx_BG, hz_BG, state):
    del state
    h_BH = act(gx_BG + hz_BG)
    return (h_BH,), h_BH

  return pointwise


# ----------------------------------------------------------------------------------------------
# The generic recurrent core with a hand-written backward pass.
# ----------------------------------------------------------------------------------------------
def _transposed(w_GX):
  """w.T [X, GH], materialised once before the loops (the barrier keeps XLA from folding the transpose
  back into each matmul, where it re-laid-out the whole weight once per chunk)."""
  return lax.optimization_barrier(jnp.swapaxes(w_GX, 0, 1))


def _hz(h_BH, w_hh_HG, b_hh_G):
  """Recurrent pre-activation h @ w_hh.T + b_hh in float32 (w_hh given transposed, [H, GH])."""
  return lax.dot_general(h_BH.astype(w_hh_HG.dtype), w_hh_HG, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_hh_G.astype(jnp.float32)


def _masked_step(pointwise, gx_BG, hz_BG, state_in, keep_B1):
  """One step with the length mask: invalid steps keep the state and emit zeros."""
  new_state, y_BH = pointwise(gx_BG, hz_BG, state_in)
  if keep_B1 is None:
    return new_state, y_BH
  new_state = tuple(jnp.where(keep_B1, n, s) for n, s in zip(new_state, state_in))
  return new_state, jnp.where(keep_B1, y_BH, 0.0)


def _reset(state, state0, reset_B1):
  if reset_B1 is None:
    return state
  return tuple(jnp.where(reset_B1, s0, s) for s, s0 in zip(state, state0))


def _project(x_CBI, w_ih_IG, b_ih_G):
  """Input pre-activation x @ w_ih.T + b_ih for a chunk of steps, float32 [C, B, GH] (w_ih given
  transposed, [I, GH])."""
  return lax.dot_general(x_CBI.astype(w_ih_IG.dtype), w_ih_IG, (((2,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_ih_G.astype(jnp.float32)


def _chunk_forward(pointwise, unroll, save, state, gx_CBG, state0, w_hh_HG, b_hh_G, keep_CB1,
                   reset_CB1):
  """The step loop over one chunk. `save`: None, "all" (state_in, gx, hz) or "state"."""

  def body(state, xs):
    gx_BG, keep_B1, reset_B1 = xs
    state_in = _reset(state, state0, reset_B1)
    hz_BG = _hz(state_in[0], w_hh_HG, b_hh_G)
    new_state, y_BH = _masked_step(pointwise, gx_BG, hz_BG, state_in, keep_B1)
    if save is None:
      return new_state, (y_BH,)
    if save == "all":
      return new_state, (y_BH, state_in, gx_BG, hz_BG)
    return new_state, (y_BH, state_in)

  return lax.scan(body, state, (gx_CBG, keep_CB1, reset_CB1), unroll=unroll)


def _forward(pointwise, unroll, save, x_NCBI, state0, w_ih_GI, b_ih_G, w_hh_GH, b_hh_G, keep_NCB1,
             reset_NCB1):
  """Scan over N chunks of C steps, software-pipelined: chunk n+1's input projection (a
  [C*B, I] x [I, GH] matmul) does not depend on chunk n's recurrence, so XLA runs them
  concurrently; the projection stays hoisted out of the step loop and cache-sized."""
  n = x_NCBI.shape[0]
  w_ih_IG, w_hh_HG = _transposed(w_ih_GI), _transposed(w_hh_GH)
  gx0_CBG = _project(x_NCBI[0], w_ih_IG, b_ih_G)

  def outer(carry, xs):
    state, gx_CBG = carry
    i, keep_CB1, reset_CB1 = xs
    # Chunk i + 1 read in place (no shifted copy of x); the last iteration's projection is unused.
    x_next_CBI = lax.dynamic_index_in_dim(x_NCBI, jnp.minimum(i + 1, n - 1), keepdims=False)
    gx_next_CBG = _project(x_next_CBI, w_ih_IG, b_ih_G)
    state, out = _chunk_forward(pointwise, unroll, save, state, gx_CBG, state0, w_hh_HG, b_hh_G,
                                keep_CB1, reset_CB1)
    return (state, gx_next_CBG), out

  (state_T, _), out = lax.scan(outer, (state0, gx0_CBG), (jnp.arange(n), keep_NCB1, reset_NCB1))
  return state_T, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrent_core(pointwise, unroll, remat, x_NCBI, state0, w_ih_GI, b_ih_G, w_hh_GH, b_hh_G,
                    keep_NCB1, reset_NCB1):
  state_T, (ys_NCBH,) = _forward(pointwise, unroll, None, x_NCBI, state0, w_ih_GI, b_ih_G, w_hh_GH,
                                 b_hh_G, keep_NCB1, reset_NCB1)
  return ys_NCBH, state_T


def _core_fwd(pointwise, unroll, remat, x_NCBI, state0, w_ih_GI, b_ih_G, w_hh_GH, b_hh_G,
              keep_NCB1, reset_NCB1):
  save = "state" if remat else "all"
  state_T, out = _forward(pointwise, unroll, save, x_NCBI, state0, w_ih_GI, b_ih_G, w_hh_GH,
                          b_hh_G, keep_NCB1, reset_NCB1)
  residuals = (out[1:], x_NCBI, state0, w_ih_GI, b_ih_G, w_hh_GH, b_hh_G, keep_NCB1, reset_NCB1)
  return (out[0], state_T), residuals


def _core_bwd(pointwise, unroll, remat, residuals, cotangents):
  per_step, x_NCBI, state0, w_ih_GI, b_ih_G, w_hh_GH, b_hh_G, keep_NCB1, reset_NCB1 = residuals
  dys_NCBH, dstate_T = cotangents
  if remat:
    (states_in,), gx_NCBG, hz_NCBG = per_step, None, None
  else:
    states_in, gx_NCBG, hz_NCBG = per_step
  f32 = jnp.float32
  if remat:  # the recomputed projections use the transposed weights, as in the forward
    w_ih_IG, w_hh_HG = _transposed(w_ih_GI), _transposed(w_hh_GH)

  def step(carry, xs):
    dstate, dstate0 = carry
    gx_BG, hz_BG, dy_BH, state_in, keep_B1, reset_B1 = xs
    if hz_BG is None:
      hz_BG = _hz(state_in[0], w_hh_HG, b_hh_G)
    _, step_vjp = jax.vjp(lambda g, z, s: _masked_step(pointwise, g, z, s, keep_B1), gx_BG, hz_BG,
                          state_in)
    dgx_BG, dhz_BG, dstate_in = step_vjp((dstate, dy_BH))
    dh_BH = dstate_in[0] + lax.dot_general(dhz_BG.astype(w_hh_GH.dtype), w_hh_GH,
                                           (((1,), (0,)), ((), ())), preferred_element_type=f32)
    dstate_in = (dh_BH,) + tuple(dstate_in[1:])
    if reset_B1 is not None:
      dstate0 = tuple(d0 + jnp.where(reset_B1, d, 0.0) for d0, d in zip(dstate0, dstate_in))
      dstate_in = tuple(jnp.where(reset_B1, 0.0, d) for d in dstate_in)
    return (dstate_in, dstate0), (dgx_BG, dhz_BG)

  def weight_grads(grads, pending):
    """Gradient contributions of one finished chunk: large matmuls, not per-step products."""
    dw_ih, db_ih, dw_hh, db_hh = grads
    dgx_CBG, dhz_CBG, x_CBI, h_in_CBH = pending
    # Accumulated transposed ([I, GH], [H, GH]): the natural layout of these products (no copy per chunk).
    dw_ih = dw_ih + jnp.einsum("cbi,cbg->ig", x_CBI.astype(f32), dgx_CBG)
    dw_hh = dw_hh + jnp.einsum("cbh,cbg->hg", h_in_CBH.astype(f32), dhz_CBG)
    db_ih = db_ih + jnp.sum(dgx_CBG, axis=(0, 1))
    db_hh = db_hh + jnp.sum(dhz_CBG, axis=(0, 1))
    dx_CBI = lax.dot_general(dgx_CBG.astype(w_ih_GI.dtype), w_ih_GI, (((2,), (0,)), ((), ())),
                             preferred_element_type=f32)
    return (dw_ih, db_ih, dw_hh, db_hh), dx_CBI.astype(x_CBI.dtype)

  def outer(carry, xs):
    # Chunk n's backward recurrence runs while the weight gradients of chunk n+1 (independent
    # work) are formed: the same software pipeline as the forward pass.
    dstates, grads, pending = carry
    x_CBI, dys_CBH, states_in_C, gx_CBG, hz_CBG, keep_CB1, reset_CB1 = xs
    grads, dx_next_CBI = weight_grads(grads, pending)
    if gx_CBG is None:
      gx_CBG = _project(x_CBI, w_ih_IG, b_ih_G)
    dstates, (dgx_CBG, dhz_CBG) = lax.scan(
        step, dstates, (gx_CBG, hz_CBG, dys_CBH, states_in_C, keep_CB1, reset_CB1), reverse=True,
        unroll=unroll)
    return (dstates, grads, (dgx_CBG, dhz_CBG, x_CBI, states_in_C[0])), dx_next_CBI

  n, c, b, _ = x_NCBI.shape
  g = w_hh_GH.shape[0]
  zeros_state = tuple(jnp.zeros_like(s, dtype=f32) for s in state0)
  grads0 = (jnp.zeros(w_ih_GI.shape[::-1], f32), jnp.zeros((g,), f32), jnp.zeros(w_hh_GH.shape[::-1], f32),
            jnp.zeros((g,), f32))
  pending0 = (jnp.zeros((c, b, g), f32), jnp.zeros((c, b, g), f32), jnp.zeros_like(x_NCBI[0]),
              jnp.zeros_like(states_in[0][0]))
  carry0 = ((tuple(d.astype(f32) for d in dstate_T), zeros_state), grads0, pending0)
  xs = (x_NCBI, dys_NCBH, states_in, gx_NCBG, hz_NCBG, keep_NCB1, reset_NCB1)
  ((dstate_first, dstate0), grads, pending), dx_shifted_NCBI = lax.scan(outer, carry0, xs,
                                                                        reverse=True)
  (dw_ih, db_ih, dw_hh, db_hh), dx0_CBI = weight_grads(grads, pending)
  dx_NCBI = jnp.concatenate([dx0_CBI[None], dx_shifted_NCBI[:-1]])
  dstate0 = tuple((a + b_).astype(s.dtype) for a, b_, s in zip(dstate0, dstate_first, state0))
  return (dx_NCBI, dstate0, dw_ih.T.astype(w_ih_GI.dtype), db_ih.astype(b_ih_G.dtype),
          dw_hh.T.astype(w_hh_GH.dtype), db_hh.astype(b_hh_G.dtype), None, None)


_recurrent_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------
# Input checking and the shared driver.
# ----------------------------------------------------------------------------------------------
def _check(kind, x, states, w_ih, w_hh, b_ih, b_hh, lengths, segment_ids):
  g = _NUM_GATES[kind]
  if x.ndim != 3:
    raise ValueError(f"{kind}: x must be batch-major [B, T, I], got shape {x.shape}.")
  b, t, i = x.shape
  if w_hh.ndim != 2 or w_hh.shape[0] % g or w_hh.shape[0] // g != w_hh.shape[1]:
    raise ValueError(f"{kind}: w_hh must be [{g}*H, H] (gates stacked on axis 0, PyTorch layout), "
                     f"got {w_hh.shape}.")
  h = w_hh.shape[1]
  if w_ih.shape != (g * h, i):
    raise ValueError(f"{kind}: w_ih must be [{g}*H, I] = {(g * h, i)} for x {x.shape} and "
                     f"w_hh {w_hh.shape}, got {w_ih.shape}.")
  for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
    if bias.shape != (g * h,):
      raise ValueError(f"{kind}: {name} must be [{g}*H] = {(g * h,)}, got {bias.shape}.")
  for n, s in enumerate(states):
    if s.shape != (b, h):
      raise ValueError(f"{kind}: initial state #{n} must be [B, H] = {(b, h)}, got {s.shape}.")
  if lengths is not None and lengths.shape != (b,):
    raise ValueError(f"{kind}: lengths must be [B] = {(b,)}, got {lengths.shape}.")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"{kind}: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}.")


def _run(kind, pointwise, x_BTI, states, w_ih, w_hh, b_ih, b_hh, lengths, reverse, segment_ids,
         unroll, remat, chunk, native, cell):
  _check(kind, x_BTI, states, w_ih, w_hh, b_ih, b_hh, lengths, segment_ids)
  if chunk < 1 or unroll < 1:
    raise ValueError(f"{kind}: chunk and unroll must be >= 1, got chunk={chunk}, unroll={unroll}.")
  use_native = native is not False and recurrent_native.native_supported(cell, x_BTI, w_ih, w_hh)
  if native is True and not use_native:
    raise ValueError(f"{kind}: native=True needs float32 weights, H a multiple of 16 and the native library "
                     f"({native_lib.unavailable_reason() or 'available'}); got w_ih {w_ih.dtype}, w_hh "
                     f"{w_hh.dtype}{w_hh.shape}.")
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
  scan = functools.partial(_scan_core, pointwise, int(unroll), bool(remat), chunk)
  if use_native:
    ys_TBH, state_T = native_lib.on_cpu(
        functools.partial(recurrent_native.native_recurrence, cell, remat=bool(remat)), scan, x_TBI, states, w_ih,
        b_ih, w_hh, b_hh, keep_TB, reset_TB)
  else:
    ys_TBH, state_T = scan(x_TBI, states, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB)
  return jnp.swapaxes(flip(ys_TBH), 0, 1).astype(x_BTI.dtype), state_T


def _scan_core(pointwise, unroll, remat, chunk, x_TBI, states, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB):
  """The `lax.scan` kernel on time-major arrays: pads T to a multiple of the chunk with masked (state-keeping)
  steps and runs the chunked, pipelined core."""
  t, b, _ = x_TBI.shape
  if t == 0:  # no steps: no outputs, the final state is the initial one
    return jnp.zeros((0, b, w_hh.shape[1]), jnp.float32), states
  c = min(chunk, t)
  n = -(-t // c)
  pad = n * c - t
  if pad:
    if keep_TB is None:
      keep_TB = jnp.ones((t, b), bool)
    x_TBI = jnp.pad(x_TBI, ((0, pad), (0, 0), (0, 0)))
    keep_TB = jnp.pad(keep_TB, ((0, pad), (0, 0)))
    if reset_TB is not None:
      reset_TB = jnp.pad(reset_TB, ((0, pad), (0, 0)))
  to_chunks = lambda a: None if a is None else a.reshape((n, c) + a.shape[1:])
  keep_NCB1 = None if keep_TB is None else to_chunks(keep_TB)[..., None]
  reset_NCB1 = None if reset_TB is None else to_chunks(reset_TB)[..., None]
  ys_NCBH, state_T = _recurrent_core(pointwise, unroll, remat, to_chunks(x_TBI), states, w_ih, b_ih, w_hh, b_hh,
                                     keep_NCB1, reset_NCB1)
  return ys_NCBH.reshape((n * c,) + ys_NCBH.shape[2:])[:t], state_T


def lstm(x: Array, h0: Array, c0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
         lengths: Array | None = None, reverse: bool = False, segment_ids: Array | None = None,
         unroll: int = DEFAULT_UNROLL, chunk: int = DEFAULT_CHUNK, remat: bool = False,
         native: bool | None = None) -> tuple[Array, tuple[Array, Array]]:
  """LSTM over a batch-major sequence (PyTorch gate order i, f, g, o).

  Args:
    x: inputs [B, T, I].
    h0, c0: initial hidden and cell state [B, H].
    w_ih: [4H, I]; w_hh: [4H, H]; b_ih, b_hh: [4H].
    lengths: optional int [B]; steps t >= lengths[b] keep the state and emit zeros.
    reverse: run each sequence backwards from its last valid step.
    segment_ids: optional int [B, T]; the state is reset to (h0, c0) where the id changes.
    unroll: unroll factor of the step loop inside a chunk.
    chunk: steps per chunk of the hoisted, pipelined input projection (T is padded up to a
      multiple with state-keeping steps).
    remat: save only the per-step state; recompute the rest in the backward pass.
    native: None runs the native CPU kernel (`seqjax.ops.recurrent_native`) where it applies (a CPU, float32
      weights, H a multiple of 16) and the `lax.scan` kernel elsewhere; False always the scan;
      True the native kernel or a ValueError. `unroll` and `chunk` tune the scan only.

  Returns:
    ys [B, T, H] in x.dtype and the final state (h_T, c_T), each [B, H] float32 (for `reverse`,
    the state after the first step).
  """
  ys, (h, c) = _run("lstm", _lstm_pointwise, x, (h0, c0), w_ih, w_hh, b_ih, b_hh, lengths,
                    reverse, segment_ids, unroll, remat, chunk, native, "lstm")
  return ys, (h, c)


def gru(x: Array, h0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
        lengths: Array | None = None, reverse: bool = False, segment_ids: Array | None = None,
        unroll: int = DEFAULT_UNROLL, chunk: int = DEFAULT_CHUNK, remat: bool = False,
        native: bool | None = None) -> tuple[Array, Array]:
  """GRU over a batch-major sequence (PyTorch gate order r, z, n; b_hn inside the reset product).

  Args: as `lstm` with w_ih [3H, I], w_hh [3H, H], b_ih, b_hh [3H] and one state h0 [B, H].

  Returns:
    ys [B, T, H] in x.dtype and the final state h_T [B, H] float32.
  """
  ys, (h,) = _run("gru", _gru_pointwise, x, (h0,), w_ih, w_hh, b_ih, b_hh, lengths, reverse,
                  segment_ids, unroll, remat, chunk, native, "gru")
  return ys, h


def rnn(x: Array, h0: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
        nonlinearity: str = "tanh", lengths: Array | None = None, reverse: bool = False,
        segment_ids: Array | None = None, unroll: int = DEFAULT_UNROLL,
        chunk: int = DEFAULT_CHUNK, remat: bool = False,
        native: bool | None = None) -> tuple[Array, Array]:
  """Elman RNN, h' = act(W_ih x + b_ih + W_hh h + b_hh), act in {"tanh", "relu"}.

  Args: as `gru` with w_ih [H, I], w_hh [H, H], b_ih, b_hh [H].

  Returns:
    ys [B, T, H] in x.dtype and the final state h_T [B, H] float32.
  """
  if nonlinearity not in _NONLINEARITIES:
    raise ValueError(f"rnn: nonlinearity must be one of {sorted(_NONLINEARITIES)}, "
                     f"got {nonlinearity!r}.")
  ys, (h,) = _run("rnn", _rnn_pointwise_cached(nonlinearity), x, (h0,), w_ih, w_hh, b_ih, b_hh,
                  lengths, reverse, segment_ids, unroll, remat, chunk, native, f"rnn_{nonlinearity}")
  return ys, h


@functools.lru_cache(maxsize=None)
def _rnn_pointwise_cached(nonlinearity: str) -> Callable:
  # Cached so the same function object (a static argument of the custom_vjp) is reused and jit
  # caches are hit.
  return _rnn_pointwise(nonlinearity)


# ----------------------------------------------------------------------------------------------
# Single-token steps for decoding.
# ----------------------------------------------------------------------------------------------
def _gx(x_BI, w_ih, b_ih):
  return lax.dot_general(x_BI.astype(w_ih.dtype), w_ih, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_ih.astype(jnp.float32)


def lstm_step(x: Array, h: Array, c: Array, w_ih: Array, w_hh: Array, b_ih: Array,
              b_hh: Array) -> tuple[Array, Array]:
  """One LSTM step. x [B, I], h, c [B, H] -> (h', c') [B, H] float32 (h' is also the output)."""
  (h, c), _ = _lstm_pointwise(_gx(x, w_ih, b_ih), _hz(h, w_hh.T, b_hh),
                              (h.astype(jnp.float32), c.astype(jnp.float32)))
  return h, c


def gru_step(x: Array, h: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array) -> Array:
  """One GRU step. x [B, I], h [B, H] -> h' [B, H] float32."""
  (h,), _ = _gru_pointwise(_gx(x, w_ih, b_ih), _hz(h, w_hh.T, b_hh), (h.astype(jnp.float32),))
  return h


def rnn_step(x: Array, h: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
             nonlinearity: str = "tanh") -> Array:
  """One Elman RNN step. x [B, I], h [B, H] -> h' [B, H] float32."""
  if nonlinearity not in _NONLINEARITIES:
    raise ValueError(f"rnn_step: nonlinearity must be one of {sorted(_NONLINEARITIES)}, "
                     f"got {nonlinearity!r}.")
  (h,), _ = _rnn_pointwise_cached(nonlinearity)(_gx(x, w_ih, b_ih), _hz(h, w_hh.T, b_hh), (h,))
  return h
