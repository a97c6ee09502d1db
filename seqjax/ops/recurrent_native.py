"""The recurrences of `seqjax.ops.recurrent` as a native CPU kernel (C++, XLA FFI): what `lstm`, `gru` and `rnn`
run on a CPU.

A JAX program cannot run a small recurrence well on a CPU: every step of a `lax.scan` is a [B, H] x [H, GH] matmul
plus a few fusions, each dispatched by XLA as its own thunk, on one core or split over the intra-op pool with a
hand-off per fusion. `native/recurrent.cc` runs the whole step loop in one call: each step is cut into parts of U
hidden units (a part computes all gates of its units from a packed slice of W_hh and applies the cell), the parts
run on XLA's intra-op threads with one barrier per step, and the weights stay in the cores' caches for the whole
sequence. What is not serial stays outside as big matmuls on all cores (`seqjax.ops.linear`):

  forward : gx = x W_ih^T (one [T*B, I] x [I, GH] matmul), then the kernel: ys, the final state and, for the
            backward, the state entering each step and the cell's activations (LSTM i, f, g, o; GRU r, z, n,
            W_hn h + b_hn; RNN h) — (S + A) * B * H floats per step, the same as the `remat=True` scan saves;
  backward: the kernel's reverse recurrence gives dgx (and for the GRU dhz) per step and the bias gradients; then
            dx = dgx W_ih and dW_ih = x^T dgx in one call, dW_hh = h_in^T dhz in another.

Covered: the three cells, float32 weights (any float input, computed in float32), H a multiple of 16, lengths,
reverse and segment resets (prepared by `recurrent._run` as keep / reset masks on time-major arrays). `remat=True`
runs the `lax.scan` kernel. Same numbers as the scan to float32 rounding (tested), bitwise deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops import linear
from seqjax.ops import native

CELLS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_AUX = {"lstm": 4, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}  # per-step residual arrays of width H
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def native_supported(cell: str, x: jax.Array, w_ih: jax.Array, w_hh: jax.Array) -> bool:
  """Whether the native kernel covers these inputs (and the library is available)."""
  return (cell in CELLS and x.dtype in _FLOATS and w_ih.dtype == jnp.float32 and w_hh.dtype == jnp.float32
          and w_hh.ndim == 2 and w_hh.shape[1] % 16 == 0 and w_hh.shape[1] > 0 and native.available())


def _forward_call(cell, x_TBI, w_ih, w_hh, b_ih, b_hh, state0_SBH, keep_TB, reset_TB, save):
  t, b, _ = x_TBI.shape
  h = w_hh.shape[1]
  s = state0_SBH.shape[0]
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((t, b, h), f32), jax.ShapeDtypeStruct((s, b, h), f32),
               jax.ShapeDtypeStruct((s, t, b, h) if save else (0,), f32),
               jax.ShapeDtypeStruct((t, b, _AUX[cell] * h) if save else (0,), f32))
  return jax.ffi.ffi_call("seqjax_rnn_fwd", out_types, vmap_method="sequential")(
      x_TBI.astype(jnp.float32), w_ih, w_hh, b_ih, b_hh, state0_SBH, keep_TB, reset_TB, cell=np.int64(CELLS[cell]), save=np.int64(save))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recurrence(cell, x_TBI, state0_SBH, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB):
  ys, state_T, _, _ = _forward_call(cell, x_TBI, w_ih, w_hh, b_ih, b_hh, state0_SBH, keep_TB, reset_TB, save=False)
  return ys, state_T


def _recurrence_fwd(cell, x_TBI, state0_SBH, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB):
  ys, state_T, states_in, aux = _forward_call(cell, x_TBI, w_ih, w_hh, b_ih, b_hh, state0_SBH, keep_TB, reset_TB,
                                              save=True)
  return (ys, state_T), (x_TBI, w_ih, w_hh, states_in, aux, keep_TB, reset_TB)


def _recurrence_bwd(cell, residuals, cotangents):
  x_TBI, w_ih, w_hh, states_in, aux, keep_TB, reset_TB = residuals
  dys, dstate_T = cotangents
  t, b, i = x_TBI.shape
  gh, h = w_hh.shape
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((t, b, gh), f32),
               jax.ShapeDtypeStruct((t, b, gh) if cell == "gru" else (0,), f32),
               jax.ShapeDtypeStruct(dstate_T.shape, f32), jax.ShapeDtypeStruct((gh,), f32),
               jax.ShapeDtypeStruct((gh,), f32))
  dgx, dhz, dstate0, db_ih, db_hh = jax.ffi.ffi_call("seqjax_rnn_bwd", out_types, vmap_method="sequential")(
      w_hh, aux, states_in, keep_TB, reset_TB, dys.astype(f32), dstate_T.astype(f32), cell=np.int64(CELLS[cell]))
  dgx2 = dgx.reshape(t * b, gh)
  dhz2 = dhz.reshape(t * b, gh) if cell == "gru" else dgx2
  x2 = x_TBI.reshape(t * b, i).astype(f32)
  dx2, dw_ih_IG = linear.matmul_grads(x2, jnp.swapaxes(w_ih, 0, 1), dgx2)
  dw_hh_HG = linear.weight_grad(states_in[0].reshape(t * b, h), dhz2)
  return (dx2.reshape(t, b, i).astype(x_TBI.dtype), dstate0, dw_ih_IG.T, db_ih, dw_hh_HG.T, db_hh, None, None)


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def native_recurrence(cell: str, x_TBI: jax.Array, states: tuple[jax.Array, ...], w_ih: jax.Array,
                      b_ih: jax.Array, w_hh: jax.Array, b_hh: jax.Array, keep_TB: jax.Array | None,
                      reset_TB: jax.Array | None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Time-major recurrence with the native kernel: x [T, B, I], states ([B, H], ...) float32 -> (ys [T, B, H]
  float32, final states). `keep_TB` / `reset_TB`: bool masks or None (all kept, no resets)."""
  t, b, _ = x_TBI.shape
  keep = jnp.ones((t, b), jnp.uint8) if keep_TB is None else keep_TB.astype(jnp.uint8)
  reset = jnp.zeros((t, b), jnp.uint8) if reset_TB is None else reset_TB.astype(jnp.uint8)
  ys, state_T = _recurrence(cell, x_TBI, jnp.stack(states), w_ih, b_ih.astype(jnp.float32), w_hh,
                            b_hh.astype(jnp.float32), keep, reset)
  return ys, tuple(state_T)
