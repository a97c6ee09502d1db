"""LayerNorm over the last axis as a CPU kernel (C++, XLA FFI), forward and backward (op family "layer_norm").

Rows on all cores (`src/norm.cc`); the forward saves the per-row mean and 1/std for the backward, instead of
XLA's reductions and element-wise passes. Equals `seqjax.ops.dense.norms.reference_layer_norm` to float32 rounding.

Covered: float32 x [..., D], scale and bias [D], D a multiple of 16, x not empty.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cpu_kernels import _build

KERNEL = "norm"


def supports(x: jax.Array, scale: jax.Array, bias: jax.Array) -> bool:
  """Whether `layer_norm` covers these arguments."""
  return (x.ndim >= 1 and x.size > 0 and all(a.dtype == jnp.float32 for a in (x, scale, bias))
          and x.shape[-1] % 16 == 0 and scale.shape == (x.shape[-1],) and bias.shape == scale.shape)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm of x [..., D] with scale, bias [D] by the CPU kernel (ValueError if not covered)."""
  x, scale, bias = jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)
  if not supports(x, scale, bias):
    raise ValueError(f"layer_norm (CPU kernel): needs float32 operands, D a multiple of 16 and scale, bias [D]; "
                     f"got x {x.dtype}{x.shape}, scale {scale.dtype}{scale.shape}, bias {bias.dtype}{bias.shape}")
  _build.load(KERNEL, required=True)
  return _layer_norm(x, scale, bias, float(eps))


def _forward(x, scale, bias, eps):
  D = x.shape[-1]
  rows = x.size // D
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((rows, D), f32), jax.ShapeDtypeStruct((rows,), f32),
               jax.ShapeDtypeStruct((rows,), f32))
  y, mean, rstd = jax.ffi.ffi_call("seqjax_layer_norm_fwd", out_types, vmap_method="sequential")(
      x.reshape(rows, D), scale, bias, eps=np.float32(eps))
  return y.reshape(x.shape), mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  return _forward(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  y, mean, rstd = _forward(x, scale, bias, eps)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, residuals, dy):
  del eps
  x, scale, mean, rstd = residuals
  D = x.shape[-1]
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((x.size // D, D), f32), jax.ShapeDtypeStruct((D,), f32),
               jax.ShapeDtypeStruct((D,), f32))
  dx, dscale, dbias = jax.ffi.ffi_call("seqjax_layer_norm_bwd", out_types, vmap_method="sequential")(
      x.reshape(-1, D), scale, mean, rstd, dy.reshape(-1, D))
  return dx.reshape(x.shape), dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
