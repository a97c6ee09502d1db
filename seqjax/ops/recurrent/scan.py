"""The `lax.scan` kernel of the recurrent ops: what GPUs/TPUs run, and a CPU where its C++ kernel does not apply.

Time-major: ``x [T, B, I]``, states ``([B, H], ...)`` float32; the sequence ops of `sequence.py` prepare the
layout, the reversal and the keep / reset masks. Speed (details and numbers in docs/recurrent.md):
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

Dimension legend: T steps, N chunks of C steps, B batch, I input width, H hidden width, GH = G * H.
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
def _transposed(w_GX):
  """w.T [X, GH], materialised once before the loops (the barrier keeps XLA from folding the transpose
  back into each matmul, where it re-laid-out the whole weight once per chunk)."""
  return lax.optimization_barrier(jnp.swapaxes(w_GX, 0, 1))


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
    hz_BG = recurrent_preactivation(state_in[0], w_hh_HG, b_hh_G)
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
      hz_BG = recurrent_preactivation(state_in[0], w_hh_HG, b_hh_G)
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
  keep_NCB1 = None if keep_TB is None else to_chunks(keep_TB)[..., None]
  reset_NCB1 = None if reset_TB is None else to_chunks(reset_TB)[..., None]
  ys_NCBH, state_T = _recurrent_core(pointwise, unroll, remat, to_chunks(x_TBI), states, w_ih, b_ih, w_hh, b_hh,
                                     keep_NCB1, reset_NCB1)
  return ys_NCBH.reshape((n * c,) + ys_NCBH.shape[2:])[:t], state_T
