"""The `lax.scan` kernel of the recurrent ops: what GPUs/TPUs run, and a CPU where its C++ kernel does not apply.

Time-major: ``x [T, B, I]``, states ``([B, R], ...)`` float32; the sequence ops of `sequence.py` prepare the
layout, the reversal and the keep / reset masks. Speed (details and numbers in docs/recurrent.md):
* the input projection ``x @ w_ih.T + b_ih`` is hoisted out of the step loop: one
  ``[C*B, I] x [I, Z*R]`` matmul per chunk of C steps, software-pipelined so that the projection of
  chunk n+1 runs concurrently with the recurrence of chunk n (they are independent);
* the scan body is one ``[B, R] x [R, Z*R]`` matmul and a fused pointwise update, unrolled;
* the backward pass is a hand-written `custom_vjp`: the reverse scan only propagates ``dh`` (one
  matmul per step) and emits per-step pre-activation gradients; the weight and input gradients
  are then large per-chunk matmuls (what cuDNN does), overlapped with the next chunk's reverse
  recurrence, instead of autodiff's ``[Z*R, R]`` outer product accumulated every step;
* ``remat=True`` (for long sequences) saves only the state entering each step and recomputes the
  projections in the backward pass: residual memory per step drops from ~(2Z + 2) B R floats to
  ~2 B R (LSTM), for extra matmuls. Residual memory is linear in T either way.

Dimension legend (docs/ARCHITECTURE.md): T steps, M chunks of C steps, B batch, I input width, R recurrent state
width, Z gates per cell, X = Z * R stacked gates.
Differentiable with `jax.grad`/`jax.vjp` (reverse mode); forward-mode (`jax.jvp`) is not supported by the custom
backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.recurrent.cells import recurrent_preactivation


# ----------------------------------------------------------------------------------------------
# The generic recurrent core with a hand-written backward pass.
# ----------------------------------------------------------------------------------------------
def _transposed(w):
  """w.T, materialised once before the loops (the barrier keeps XLA from folding the transpose
  back into each matmul, where it re-laid-out the whole weight once per chunk)."""
  return lax.optimization_barrier(jnp.swapaxes(w, 0, 1))


def _masked_step(pointwise, gx_BX, hz_BX, state_in, keep_B1):
  """One step with the length mask: invalid steps keep the state and emit zeros."""
  new_state, y_BR = pointwise(gx_BX, hz_BX, state_in)
  if keep_B1 is None:
    return new_state, y_BR
  new_state = tuple(jnp.where(keep_B1, n, s) for n, s in zip(new_state, state_in))
  return new_state, jnp.where(keep_B1, y_BR, 0.0)


def _reset(state, state0, reset_B1):
  if reset_B1 is None:
    return state
  return tuple(jnp.where(reset_B1, s0, s) for s, s0 in zip(state, state0))


def _project(x_CBI, w_ih_IX, b_ih_X):
  """Input pre-activation x @ w_ih.T + b_ih for a chunk of steps, float32 [C, B, Z*R] (w_ih given
  transposed, [I, Z*R])."""
  return lax.dot_general(x_CBI.astype(w_ih_IX.dtype), w_ih_IX, (((2,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_ih_X.astype(jnp.float32)


def _chunk_forward(pointwise, unroll, save, state, gx_CBX, state0, w_hh_RX, b_hh_X, keep_CB1,
                   reset_CB1):
  """The step loop over one chunk. `save`: None, "all" (state_in, gx, hz) or "state"."""

  def body(state, xs):
    gx_BX, keep_B1, reset_B1 = xs
    state_in = _reset(state, state0, reset_B1)
    hz_BX = recurrent_preactivation(state_in[0], w_hh_RX, b_hh_X)
    new_state, y_BR = _masked_step(pointwise, gx_BX, hz_BX, state_in, keep_B1)
    if save is None:
      return new_state, (y_BR,)
    if save == "all":
      return new_state, (y_BR, state_in, gx_BX, hz_BX)
    return new_state, (y_BR, state_in)

  return lax.scan(body, state, (gx_CBX, keep_CB1, reset_CB1), unroll=unroll)


def _forward(pointwise, unroll, save, x_MCBI, state0, w_ih_XI, b_ih_X, w_hh_XR, b_hh_X, keep_MCB1,
             reset_MCB1):
  """Scan over M chunks of C steps, software-pipelined: chunk n+1's input projection (a
  [C*B, I] x [I, Z*R] matmul) does not depend on chunk n's recurrence, so XLA runs them
  concurrently; the projection stays hoisted out of the step loop and cache-sized."""
  n = x_MCBI.shape[0]
  w_ih_IX, w_hh_RX = _transposed(w_ih_XI), _transposed(w_hh_XR)
  gx0_CBX = _project(x_MCBI[0], w_ih_IX, b_ih_X)

  def outer(carry, xs):
    state, gx_CBX = carry
    i, keep_CB1, reset_CB1 = xs
    # Chunk i + 1 read in place (no shifted copy of x); the last iteration's projection is unused.
    x_next_CBI = lax.dynamic_index_in_dim(x_MCBI, jnp.minimum(i + 1, n - 1), keepdims=False)
    gx_next_CBX = _project(x_next_CBI, w_ih_IX, b_ih_X)
    state, out = _chunk_forward(pointwise, unroll, save, state, gx_CBX, state0, w_hh_RX, b_hh_X,
                                keep_CB1, reset_CB1)
    return (state, gx_next_CBX), out

  (final_state, _), out = lax.scan(outer, (state0, gx0_CBX), (jnp.arange(n), keep_MCB1, reset_MCB1))
  return final_state, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrent_core(pointwise, unroll, remat, x_MCBI, state0, w_ih_XI, b_ih_X, w_hh_XR, b_hh_X,
                    keep_MCB1, reset_MCB1):
  final_state, (ys_MCBR,) = _forward(pointwise, unroll, None, x_MCBI, state0, w_ih_XI, b_ih_X, w_hh_XR,
                                 b_hh_X, keep_MCB1, reset_MCB1)
  return ys_MCBR, final_state


def _core_fwd(pointwise, unroll, remat, x_MCBI, state0, w_ih_XI, b_ih_X, w_hh_XR, b_hh_X,
              keep_MCB1, reset_MCB1):
  save = "state" if remat else "all"
  final_state, out = _forward(pointwise, unroll, save, x_MCBI, state0, w_ih_XI, b_ih_X, w_hh_XR,
                          b_hh_X, keep_MCB1, reset_MCB1)
  residuals = (out[1:], x_MCBI, state0, w_ih_XI, b_ih_X, w_hh_XR, b_hh_X, keep_MCB1, reset_MCB1)
  return (out[0], final_state), residuals


def _core_bwd(pointwise, unroll, remat, residuals, cotangents):
  per_step, x_MCBI, state0, w_ih_XI, b_ih_X, w_hh_XR, b_hh_X, keep_MCB1, reset_MCB1 = residuals
  dys_MCBR, dfinal_state = cotangents
  if remat:
    (states_in,), gx_MCBX, hz_MCBX = per_step, None, None
  else:
    states_in, gx_MCBX, hz_MCBX = per_step
  f32 = jnp.float32
  if remat:  # the recomputed projections use the transposed weights, as in the forward
    w_ih_IX, w_hh_RX = _transposed(w_ih_XI), _transposed(w_hh_XR)

  def step(carry, xs):
    dstate, dstate0 = carry
    gx_BX, hz_BX, dy_BR, state_in, keep_B1, reset_B1 = xs
    if hz_BX is None:
      hz_BX = recurrent_preactivation(state_in[0], w_hh_RX, b_hh_X)
    _, step_vjp = jax.vjp(lambda g, z, s: _masked_step(pointwise, g, z, s, keep_B1), gx_BX, hz_BX,
                          state_in)
    dgx_BX, dhz_BX, dstate_in = step_vjp((dstate, dy_BR))
    dh_BR = dstate_in[0] + lax.dot_general(dhz_BX.astype(w_hh_XR.dtype), w_hh_XR,
                                           (((1,), (0,)), ((), ())), preferred_element_type=f32)
    dstate_in = (dh_BR,) + tuple(dstate_in[1:])
    if reset_B1 is not None:
      dstate0 = tuple(d0 + jnp.where(reset_B1, d, 0.0) for d0, d in zip(dstate0, dstate_in))
      dstate_in = tuple(jnp.where(reset_B1, 0.0, d) for d in dstate_in)
    return (dstate_in, dstate0), (dgx_BX, dhz_BX)

  def weight_grads(grads, pending):
    """Gradient contributions of one finished chunk: large matmuls, not per-step products."""
    dw_ih, db_ih, dw_hh, db_hh = grads
    dgx_CBX, dhz_CBX, x_CBI, h_in_CBR = pending
    # Accumulated transposed ([I, Z*R], [R, Z*R]): the natural layout of these products (no copy per chunk).
    dw_ih = dw_ih + jnp.einsum("cbi,cbg->ig", x_CBI.astype(f32), dgx_CBX)
    dw_hh = dw_hh + jnp.einsum("cbh,cbg->hg", h_in_CBR.astype(f32), dhz_CBX)
    db_ih = db_ih + jnp.sum(dgx_CBX, axis=(0, 1))
    db_hh = db_hh + jnp.sum(dhz_CBX, axis=(0, 1))
    dx_CBI = lax.dot_general(dgx_CBX.astype(w_ih_XI.dtype), w_ih_XI, (((2,), (0,)), ((), ())),
                             preferred_element_type=f32)
    return (dw_ih, db_ih, dw_hh, db_hh), dx_CBI.astype(x_CBI.dtype)

  def outer(carry, xs):
    # Chunk n's backward recurrence runs while the weight gradients of chunk n+1 (independent
    # work) are formed: the same software pipeline as the forward pass.
    dstates, grads, pending = carry
    x_CBI, dys_CBR, states_in, gx_CBX, hz_CBX, keep_CB1, reset_CB1 = xs
    grads, dx_next_CBI = weight_grads(grads, pending)
    if gx_CBX is None:
      gx_CBX = _project(x_CBI, w_ih_IX, b_ih_X)
    dstates, (dgx_CBX, dhz_CBX) = lax.scan(
        step, dstates, (gx_CBX, hz_CBX, dys_CBR, states_in, keep_CB1, reset_CB1), reverse=True,
        unroll=unroll)
    return (dstates, grads, (dgx_CBX, dhz_CBX, x_CBI, states_in[0])), dx_next_CBI

  n, c, b, _ = x_MCBI.shape
  g = w_hh_XR.shape[0]
  zeros_state = tuple(jnp.zeros_like(s, dtype=f32) for s in state0)
  grads0 = (jnp.zeros(w_ih_XI.shape[::-1], f32), jnp.zeros((g,), f32), jnp.zeros(w_hh_XR.shape[::-1], f32),
            jnp.zeros((g,), f32))
  pending0 = (jnp.zeros((c, b, g), f32), jnp.zeros((c, b, g), f32), jnp.zeros_like(x_MCBI[0]),
              jnp.zeros_like(states_in[0][0]))
  carry0 = ((tuple(d.astype(f32) for d in dfinal_state), zeros_state), grads0, pending0)
  xs = (x_MCBI, dys_MCBR, states_in, gx_MCBX, hz_MCBX, keep_MCB1, reset_MCB1)
  ((dstate_first, dstate0), grads, pending), dx_shifted_MCBI = lax.scan(outer, carry0, xs,
                                                                        reverse=True)
  (dw_ih, db_ih, dw_hh, db_hh), dx0_CBI = weight_grads(grads, pending)
  dx_MCBI = jnp.concatenate([dx0_CBI[None], dx_shifted_MCBI[:-1]])
  dstate0 = tuple((a + b_).astype(s.dtype) for a, b_, s in zip(dstate0, dstate_first, state0))
  return (dx_MCBI, dstate0, dw_ih.T.astype(w_ih_XI.dtype), db_ih.astype(b_ih_X.dtype),
          dw_hh.T.astype(w_hh_XR.dtype), db_hh.astype(b_hh_X.dtype), None, None)


_recurrent_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------------------------------
# Time-major entry: pads T to whole chunks.
# ----------------------------------------------------------------------------------------------
def scan_core(pointwise, unroll, remat, chunk, x_TBI, states, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB):
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
  keep_MCB1 = None if keep_TB is None else to_chunks(keep_TB)[..., None]
  reset_MCB1 = None if reset_TB is None else to_chunks(reset_TB)[..., None]
  ys_MCBR, final_state = _recurrent_core(pointwise, unroll, remat, to_chunks(x_TBI), states, w_ih, b_ih, w_hh, b_hh,
                                     keep_MCB1, reset_MCB1)
  return ys_MCBR.reshape((n * c,) + ys_MCBR.shape[2:])[:t], final_state
