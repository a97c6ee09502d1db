"""The recurrent cells (Elman RNN, LSTM, GRU): pointwise updates and single-token steps.

Layout and conventions (PyTorch / cuDNN compatible, so checkpoints port both ways): weights ``w_ih [G*H, I]``,
``w_hh [G*H, H]``, biases ``b_ih, b_hh [G*H]`` with G gates stacked: RNN G=1; LSTM G=4 ordered (i, f, g, o);
GRU G=3 ordered (r, z, n) with ``b_hn`` inside the reset product, ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
``h' = (1 - z) * n + z * h``.

Dimension legend: B batch, I input width, H hidden (state) width, G number of gates, so ``GH = G * H`` is the width
of the stacked pre-activations.
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
# Pointwise cell updates. Each maps (input pre-activation gx [B, GH], recurrent pre-activation
# hz = h @ w_hh.T + b_hh [B, GH], state) -> (new state, output y [B, H]). All float32.
# ----------------------------------------------------------------------------------------------
def lstm_pointwise(gx_BG, hz_BG, state):
  _, c_BH = state
  z_BG = gx_BG + hz_BG
  i_BH, f_BH, g_BH, o_BH = jnp.split(z_BG, 4, axis=-1)
  c_BH = jax.nn.sigmoid(f_BH) * c_BH + jax.nn.sigmoid(i_BH) * jnp.tanh(g_BH)
  h_BH = jax.nn.sigmoid(o_BH) * jnp.tanh(c_BH)
  return (h_BH, c_BH), h_BH


def gru_pointwise(gx_BG, hz_BG, state):
  (h_BH,) = state
  xr_BH, xz_BH, xn_BH = jnp.split(gx_BG, 3, axis=-1)
  hr_BH, hzz_BH, hn_BH = jnp.split(hz_BG, 3, axis=-1)
  r_BH = jax.nn.sigmoid(xr_BH + hr_BH)
  z_BH = jax.nn.sigmoid(xz_BH + hzz_BH)
  n_BH = jnp.tanh(xn_BH + r_BH * hn_BH)
  h_BH = n_BH + z_BH * (h_BH - n_BH)  # == (1 - z) * n + z * h
  return (h_BH,), h_BH


@functools.lru_cache(maxsize=None)
def rnn_pointwise(nonlinearity: str) -> Callable:
  # Cached so the same function object (a static argument of the custom_vjp) is reused and jit caches are hit.
  act = NONLINEARITIES[nonlinearity]

  def pointwise(gx_BG, hz_BG, state):
    del state
    h_BH = act(gx_BG + hz_BG)
    return (h_BH,), h_BH

  return pointwise


# ----------------------------------------------------------------------------------------------
# Pre-activations, in float32.
# ----------------------------------------------------------------------------------------------
def recurrent_preactivation(h_BH, w_hh_HG, b_hh_G):
  """Recurrent pre-activation h @ w_hh.T + b_hh in float32 (w_hh given transposed, [H, GH])."""
  return lax.dot_general(h_BH.astype(w_hh_HG.dtype), w_hh_HG, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_hh_G.astype(jnp.float32)


def input_preactivation(x_BI, w_ih_GI, b_ih_G):
  """Input pre-activation x @ w_ih.T + b_ih in float32 [B, GH] (w_ih in its stored layout, [GH, I])."""
  return lax.dot_general(x_BI.astype(w_ih_GI.dtype), w_ih_GI, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32) + b_ih_G.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Single-token steps for decoding.
# ----------------------------------------------------------------------------------------------
def lstm_step(x: Array, h: Array, c: Array, w_ih: Array, w_hh: Array, b_ih: Array,
              b_hh: Array) -> tuple[Array, Array]:
  """One LSTM step. x [B, I], h, c [B, H] -> (h', c') [B, H] float32 (h' is also the output)."""
  x, h, c, w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, (x, h, c, w_ih, w_hh, b_ih, b_hh))
  (h, c), _ = lstm_pointwise(input_preactivation(x, w_ih, b_ih), recurrent_preactivation(h, w_hh.T, b_hh),
                             (h.astype(jnp.float32), c.astype(jnp.float32)))
  return h, c


def gru_step(x: Array, h: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array) -> Array:
  """One GRU step. x [B, I], h [B, H] -> h' [B, H] float32."""
  x, h, w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, (x, h, w_ih, w_hh, b_ih, b_hh))
  (h,), _ = gru_pointwise(input_preactivation(x, w_ih, b_ih), recurrent_preactivation(h, w_hh.T, b_hh),
                          (h.astype(jnp.float32),))
  return h


def rnn_step(x: Array, h: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array, *,
             nonlinearity: str = "tanh") -> Array:
  """One Elman RNN step. x [B, I], h [B, H] -> h' [B, H] float32."""
  x, h, w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, (x, h, w_ih, w_hh, b_ih, b_hh))
  if nonlinearity not in NONLINEARITIES:
    raise ValueError(f"rnn_step: nonlinearity must be one of {sorted(NONLINEARITIES)}, "
                     f"got {nonlinearity!r}.")
  (h,), _ = rnn_pointwise(nonlinearity)(input_preactivation(x, w_ih, b_ih), recurrent_preactivation(h, w_hh.T, b_hh),
                                        (h,))
  return h
