"""Symmetric int8 quantization of weights with one scale per output channel (pure jax.numpy).

    values_int8, scale = quantize_int8(w, reduce_axes)    # scale = max|w| / 127 over reduce_axes (kept, size 1)
    w_approx = dequantize_int8(values_int8, scale, dtype)  # values * scale

Every entry is within scale / 2 of the original (round to nearest), and the largest |w| of each channel is
represented exactly up to rounding of the scale (it maps to +-127). A channel of zeros gets scale 1 (all values 0).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def quantize_int8(w: jax.Array, reduce_axes: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """(int8 values, float32 scale) with w ~ values * scale; the scale has size 1 on `reduce_axes` (the axes a
  channel spans: a Dense kernel's input axes, an embedding row's features)."""
  w32 = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=tuple(reduce_axes), keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return values, scale


def dequantize_int8(values: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """values * scale in `dtype` (computed in float32)."""
  return (values.astype(jnp.float32) * scale).astype(dtype)
