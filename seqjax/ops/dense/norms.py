"""LayerNorm over the last axis as one op: a native kernel on the CPU, plain JAX elsewhere.

    layer_norm(x, scale, bias, eps=1e-6, *, native=None) -> (x - mean) / sqrt(var + eps) * scale + bias

Statistics in float32 over the last axis (size D), scale and bias [D]. On a CPU, for float32 operands with D a
multiple of 16, the forward
and backward passes each run as one native call (`native/norm.cc`, rows on all cores; the forward saves the
per-row mean and 1/std for the backward) instead of XLA's reductions and element-wise passes. Elsewhere, and with
`native=False` / `SEQJAX_NATIVE=0`, it is `reference_layer_norm`, differentiated by JAX. It equals
`flax.linen.LayerNorm` (epsilon 1e-6) to float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops import native as native_lib


def reference_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def _forward(x, scale, bias, eps):
  D = x.shape[-1]
  M = x.size // D
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((M, D), f32), jax.ShapeDtypeStruct((M,), f32), jax.ShapeDtypeStruct((M,), f32))
  y, mean, rstd = jax.ffi.ffi_call("seqjax_layer_norm_fwd", out_types, vmap_method="sequential")(
      x.reshape(M, D), scale, bias, eps=np.float32(eps))
  return y.reshape(x.shape), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native_layer_norm(x, scale, bias, eps):
  return _forward(x, scale, bias, eps)[0]


def _native_fwd(x, scale, bias, eps):
  y, mean, rstd = _forward(x, scale, bias, eps)
  return y, (x, scale, mean, rstd)


def _native_bwd(eps, residuals, dy):
  del eps
  x, scale, mean, rstd = residuals
  D = x.shape[-1]
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((x.size // D, D), f32), jax.ShapeDtypeStruct((D,), f32),
               jax.ShapeDtypeStruct((D,), f32))
  dx, dscale, dbias = jax.ffi.ffi_call("seqjax_layer_norm_bwd", out_types, vmap_method="sequential")(
      x.reshape(-1, D), scale, mean, rstd, dy.reshape(-1, D))
  return dx.reshape(x.shape), dscale, dbias


_native_layer_norm.defvjp(_native_fwd, _native_bwd)


def native_layer_norm_supported(x: jax.Array, scale: jax.Array, bias: jax.Array) -> bool:
  return (x.ndim >= 1 and x.size > 0 and all(a.dtype == jnp.float32 for a in (x, scale, bias))
          and x.shape[-1] % 16 == 0 and scale.shape == (x.shape[-1],) and bias.shape == scale.shape
          and native_lib.available())


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6, *,
               native: bool | None = None) -> jax.Array:
  """LayerNorm of x [..., D] with scale, bias [D]; the native kernel on a CPU for float32 operands."""
  if scale.shape != (x.shape[-1],) or bias.shape != scale.shape:
    raise ValueError(f"layer_norm: scale and bias must be [D] = [{x.shape[-1]}], got {scale.shape}, {bias.shape}")
  supported = native_layer_norm_supported(x, scale, bias)
  if native is True and not supported:
    raise ValueError(f"layer_norm: the native kernel needs float32 operands, D a multiple of 16 and the native library "
                     f"({native_lib.unavailable_reason() or 'available'}); got {x.dtype}, {scale.dtype}")
  jax_path = lambda x, s, b: reference_layer_norm(x, s, b, eps)  # noqa: E731
  if native is False or not supported:
    return jax_path(x, scale, bias)
  native_path = lambda x, s, b: _native_layer_norm(x, s, b, float(eps))  # noqa: E731
  return native_lib.on_cpu(native_path, jax_path, x, scale, bias)
