"""The recurrent cells (Elman RNN, LSTM, GRU): pointwise updates and single-token steps.

Layout and conventions (PyTorch / cuDNN compatible, so checkpoints port both ways): weights ``w_ih [Z*R, I]``,
``w_hh [Z*R, R]``, biases ``b_ih, b_hh [Z*R]`` with Z gates stacked: RNN Z=1; LSTM Z=4 ordered (i, f, g, o);
GRU Z=3 ordered (r, z, n) with ``b_hn`` inside the reset product, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
``h' = (1 - z) * n + z * h``.

Dimension legend (the codebase's one, docs/ARCHITECTURE.md): B batch, I input width, R recurrent state width, Z gates
per cell, X = Z * R the fused axis of the stacked pre-activations (``gx_BX``, ``w_ih_XI``).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

NUM_GATES = {"rnn": 1, "lstm": 4, "gru": 3}
NONLINEARITIES = {"tanh": jnp.tanh, "relu": jax.nn.relu}


# ----------------------------------------------------------------------------------------------
# Pointwise cell updates. Each maps (input pre-activation gx [B, Z*R], recurrent pre-activation
# hz = h @ w_hh.T + b_hh [B, Z*R], state) -> (new state, output y [B, R]). All float32.
# ----------------------------------------------------------------------------------------------
def lstm_pointwise(gx_BX, hz_BX, state):
  _, c_BR = state
  z_BX = gx_BX + hz_BX
  i_BR, f_BR, g_BR, o_BR = jnp.split(z_BX, 4, axis=-1)
  c_BR = jax.nn.sigmoid(f_BR) * c_BR + jax.nn.sigmoid(i_BR) * jnp.tanh(g_BR)
  h_BR = jax.nn.sigmoid(o_BR) * jnp.tanh(c_BR)
  return (h_BR, c_BR), h_BR


def gru_pointwise(gx_BX, hz_BX, state):
  (h_BR,) = state
  xr_BR, xz_BR, xn_BR = jnp.split(gx_BX, 3, axis=-1)
  hr_BR, hzz_BR, hn_BR = jnp.split(hz_BX, 3, axis=-1)
  r_BR = jax.nn.sigmoid(xr_BR + hr_BR)
  z_BR = jax.nn.sigmoid(xz_BR + hzz_BR)
  n_BR = jnp.tanh(xn_BR + r_BR * hn_BR)
  h_BR = n_BR + z_BR * (h_BR - n_BR)  # == (1 - z) * n + z * h
  return (h_BR,), h_BR


@functools.lru_cache(maxsize=None)
def rnn_pointwise(nonlinearity: str) -> Callable:
  # Cached so the same function object (a static argument of the custom_vjp) is reused and jit caches are hit.
  act = NONLINEARITIES[nonlinearity]

  def pointwise(gx_BX, hz_BX, state):
    del state
    h_BR = act(gx_BX + hz_BX)
    return (h_BR,), h_BR

  return pointwise


# ----------------------------------------------------------------------------------------------
# Pre-activations, in float32.
# ----------------------------------------------------------------------------------------------
def recurrent_preactivation(h_BR, w_hh_RX, b_hh_X):
  """Recurrent pre-activation h @ w_hh.T + b_hh in float32 (w_hh given transposed, [R, Z*R])."""
  return lax.dot_general(h_BR.astype(w_hh_RX.dtype), w_hh_RX, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_hh_X.astype(jnp.float32)


def input_preactivation(x_BI, w_ih_XI, b_ih_X):
  """Input pre-activation x @ w_ih.T + b_ih in float32 [B, Z*R] (w_ih in its stored layout, [Z*R, I])."""
  return lax.dot_general(x_BI.astype(w_ih_XI.dtype), w_ih_XI, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_ih_X.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Single-token steps for decoding.
# ----------------------------------------------------------------------------------------------
def lstm_step(x: Array, h: Array, c: Array, w_ih: Array, w_hh: Array, b_ih: Array,
              b_hh: Array) -> tuple[Array, Array]:
  """One LSTM step. x [B, I], h, c [B, R] -> (h', c') [B, R] float32 (h' is also the output)."""
  x, h, c, w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, (x, h, c, w_ih, w_hh, b_ih, b_hh))
  (h, c), _ = lstm_pointwise(input_preactivation(x, w_ih, b_ih), recurrent_preactivation(h, w_hh.T, b_hh),
                             (h.astype(jnp.float32), c.astype(jnp.float32)))
  return h, c


def gru_step(x: Array, h: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array) -> Array:
  """One GRU step. x [B, I], h [B, R] -> h' [B, R] float32."""
  x, h, w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, (x, h, w_ih, w_hh, b_ih, b_hh))
  (h,), _ = gru_pointwise(input_preactivation(x, w_ih, b_ih), recurrent_preactivation(h, w_hh.T, b_hh),
                          (h.astype(jnp.float32),))
  return h


def rnn_step(x: Array, h: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
             nonlinearity: str = "tanh") -> Array:
  """One Elman RNN step. x [B, I], h [B, R] -> h' [B, R] float32."""
  x, h, w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, (x, h, w_ih, w_hh, b_ih, b_hh))
  if nonlinearity not in NONLINEARITIES:
    raise ValueError(f"rnn_step: nonlinearity must be one of {sorted(NONLINEARITIES)}, "
                     f"got {nonlinearity!r}.")
  (h,), _ = rnn_pointwise(nonlinearity)(input_preactivation(x, w_ih, b_ih), recurrent_preactivation(h, w_hh.T, b_hh),
                                        (h,))
  return h
