"""The recurrences of `seqjax.ops.recurrent` as a CPU kernel (C++, XLA FFI): what `lstm`, `gru` and `rnn` run on a
CPU (op family "recurrent").

A JAX program cannot run a small recurrence well on a CPU: every step of a `lax.scan` is a [B, R] x [R, Z*R] matmul
plus a few fusions, each dispatched by XLA as its own thunk, on one core or split over the intra-op pool with a
hand-off per fusion. `src/recurrent.cc` runs the whole pass in one call per direction:

  forward : each step is cut into parts of U hidden units; a part computes all gates of its units,
            x_t W_ih^T + h W_hh^T, from packed slices of both weights (which stay in its core's L2 for the whole
            sequence), applies the cell and writes its units of the next state; the parts run on XLA's intra-op
            threads with one barrier per step (`Parallel::run_staged`: parts stick to a core, idle cores steal).
            Saved for the backward: the state entering each step and the cell's activations (LSTM i, f, g, o;
            GRU r, z, n, W_hn h + b_hn; RNN h), (S + A) * B * H floats per step; with `remat` the states only,
            S * B * H floats (the backward recomputes the activations, part by part, in cache);
  backward: the reverse recurrence with the same parts; per step a part forms its units of dh = dhz W_hh and its
            columns of dx = dgx W_ih from the previous step's gradients, applies the cell's gradient, and adds
            x_t^T dgx and h_in^T dhz to its weight-gradient accumulators (rank-B updates kept in its cache). The
            per-step pre-activation gradients never go to memory; bias gradients are summed on the way.

Covered: the three cells, float32 weights (any float input, computed in float32; I is zero-padded to a multiple of
16), H a multiple of 16, lengths,
reverse and segment resets (prepared by `seqjax.ops.recurrent.sequence` as keep / reset masks on time-major
arrays), remat. Same
numbers as the scan to float32 rounding (tested), bitwise deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cpu_kernels import _build

KERNEL = "recurrent"
CELLS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
_AUX = {"lstm": 4, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}  # per-step residual arrays of width H
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def supports(cell: str, x: jax.Array, w_ih: jax.Array, w_hh: jax.Array) -> bool:
  """Whether `recurrence` covers these arguments."""
  return (cell in CELLS and x.dtype in _FLOATS and w_ih.dtype == jnp.float32 and w_hh.dtype == jnp.float32
          and w_hh.ndim == 2 and w_hh.shape[1] % 16 == 0 and w_hh.shape[1] > 0)


def _forward_call(cell, x_TBI, w_ih, w_hh, b_ih, b_hh, states0, keep_TB, reset_TB, save):
  # states0: the initial (h[, c]) stacked, [1 or 2, B, R] float32.
  """save: 0 nothing, 1 the states entering each step and the activations, 2 the states only (remat)."""
  t, b, _ = x_TBI.shape
  h = w_hh.shape[1]
  s = states0.shape[0]
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((t, b, h), f32), jax.ShapeDtypeStruct((s, b, h), f32),
               jax.ShapeDtypeStruct((s, t, b, h) if save else (0,), f32),
               jax.ShapeDtypeStruct((t, b, _AUX[cell] * h) if save == 1 else (0,), f32))
  return jax.ffi.ffi_call("seqjax_rnn_fwd", out_types, vmap_method="sequential")(
      x_TBI, w_ih, w_hh, b_ih, b_hh, states0, keep_TB, reset_TB, cell=np.int64(CELLS[cell]), save=np.int64(save))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(cell, remat, x_TBI, states0, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB):
  ys, final_state, _, _ = _forward_call(cell, x_TBI, w_ih, w_hh, b_ih, b_hh, states0, keep_TB, reset_TB, save=0)
  return ys, final_state


def _recurrence_fwd(cell, remat, x_TBI, states0, w_ih, b_ih, w_hh, b_hh, keep_TB, reset_TB):
  ys, final_state, states_in, aux = _forward_call(cell, x_TBI, w_ih, w_hh, b_ih, b_hh, states0, keep_TB, reset_TB,
                                              save=2 if remat else 1)
  return (ys, final_state), (x_TBI, w_ih, w_hh, b_ih, b_hh, states_in, aux, keep_TB, reset_TB)


def _recurrence_bwd(cell, remat, residuals, cotangents):
  x_TBI, w_ih, w_hh, b_ih, b_hh, states_in, aux, keep_TB, reset_TB = residuals
  dys, dfinal_state = cotangents
  f32 = jnp.float32
  gh = w_hh.shape[0]
  out_types = (jax.ShapeDtypeStruct(x_TBI.shape, f32), jax.ShapeDtypeStruct(dfinal_state.shape, f32),
               jax.ShapeDtypeStruct(w_ih.shape, f32), jax.ShapeDtypeStruct(w_hh.shape, f32),
               jax.ShapeDtypeStruct((gh,), f32), jax.ShapeDtypeStruct((gh,), f32))
  dx, dstate0, dw_ih, dw_hh, db_ih, db_hh = jax.ffi.ffi_call("seqjax_rnn_bwd", out_types, vmap_method="sequential")(
      x_TBI, w_ih, w_hh, b_ih, b_hh, aux, states_in, keep_TB, reset_TB, dys.astype(f32), dfinal_state.astype(f32),
      cell=np.int64(CELLS[cell]), remat=np.int64(remat))
  return dx, dstate0, dw_ih, db_ih, dw_hh, db_hh, None, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def recurrence(cell: str, x_TBI: jax.Array, states: tuple[jax.Array, ...], w_ih: jax.Array,
                      b_ih: jax.Array, w_hh: jax.Array, b_hh: jax.Array, keep_TB: jax.Array | None,
                      reset_TB: jax.Array | None, remat: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Time-major recurrence with the CPU kernel: x [T, B, I], states ([B, R], ...) float32 -> (ys [T, B, R]
  float32, final states). `cell` in CELLS; `keep_TB` / `reset_TB`: bool masks or None (all kept, no resets).
  `remat`: save only the states for the backward, which recomputes each step's activations."""
  if not supports(cell, x_TBI, w_ih, w_hh):
    raise ValueError(f"recurrence (CPU kernel): needs a cell in {sorted(CELLS)}, float32 weights and H a multiple "
                     f"of 16; got {cell!r}, x {x_TBI.dtype}, w_ih {w_ih.dtype}, w_hh {w_hh.dtype}{w_hh.shape}")
  _build.load(KERNEL, required=True)
  t, b, i = x_TBI.shape
  keep = jnp.ones((t, b), jnp.uint8) if keep_TB is None else keep_TB.astype(jnp.uint8)
  reset = jnp.zeros((t, b), jnp.uint8) if reset_TB is None else reset_TB.astype(jnp.uint8)
  # The kernel computes in float32 with the input width padded to a multiple of 16 (zero columns: the same
  # products); the casts and pads are outside the custom VJP, so their gradients are JAX's.
  pad = -i % 16
  x_TBI = jnp.pad(x_TBI.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
  w_ih = jnp.pad(w_ih, ((0, 0), (0, pad)))
  ys, final_state = _recurrence(cell, bool(remat), x_TBI, jnp.stack(states), w_ih, b_ih.astype(jnp.float32), w_hh,
                            b_hh.astype(jnp.float32), keep, reset)
  return ys, tuple(final_state)
