"""Projections as single 2-D matmuls.

`flat_dot_general` is a drop-in `dot_general` for `nn.Dense` / `nn.DenseGeneral`: when the contraction is over
the trailing axes of the activation and the leading axes of the kernel (every projection here), it flattens the
activation to [rows, K] and multiplies once. XLA on CPU otherwise keeps the [B, T, ...] layout and, for the
weight gradient, physically transposes the large activation — measured at about a third of a Transformer step's
time at d_model 256 (experiments/README.md). The result is the same contraction; anything else falls through to
`lax.dot_general` unchanged.

On a CPU the flattened float32 product [rows, K] x [K, N] with K a multiple of 16 runs as the native kernel
`matmul` (`native/mlp.cc`: row blocks on all cores, the weight gradient accumulated per thread), which is 1.5-2x
XLA's dot at the projection shapes of a small Transformer (e.g. [4096, 128] x [128, 128]). `native=False` /
`SEQJAX_NATIVE=0` keep XLA's dot.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from seqjax.ops import native as native_lib


@jax.custom_vjp
def _native_matmul(x, w):
  return jax.ffi.ffi_call("seqjax_dense_fwd", jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32),
                          vmap_method="sequential")(x, w)


def _native_matmul_fwd(x, w):
  return _native_matmul(x, w), (x, w)


def _native_matmul_bwd(residuals, dy):
  x, w = residuals
  out_types = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(w.shape, jnp.float32))
  return tuple(jax.ffi.ffi_call("seqjax_dense_bwd", out_types, vmap_method="sequential")(x, w, dy))


_native_matmul.defvjp(_native_matmul_fwd, _native_matmul_bwd)


def native_matmul_supported(x: jax.Array, w: jax.Array) -> bool:
  return (x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[0] and x.dtype == jnp.float32
          and w.dtype == jnp.float32 and w.shape[0] % 16 == 0 and w.shape[1] > 0 and x.shape[0] > 0
          and native_lib.available())


def matmul(x: jax.Array, w: jax.Array, *, native: bool | None = None) -> jax.Array:
  """x [M, K] @ w [K, N]: the native kernel on a CPU where it applies (float32, K a multiple of 16)."""
  if native is False or not native_matmul_supported(x, w):
    if native is True:
      raise ValueError(f"matmul: the native kernel needs float32 [M, K] x [K, N] with K a multiple of 16 and "
                       f"the native library ({native_lib.unavailable_reason() or 'available'}); got "
                       f"{x.dtype}{x.shape} x {w.dtype}{w.shape}")
    return jnp.matmul(x, w)
  return native_lib.on_cpu(_native_matmul, jnp.matmul, x, w)


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None, **kwargs) -> jax.Array:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract = tuple(a % lhs.ndim for a in lhs_contract)
  rhs_contract = tuple(a % rhs.ndim for a in rhs_contract)
  n = len(lhs_contract)
  trailing = lhs_contract == tuple(range(lhs.ndim - n, lhs.ndim))
  leading = rhs_contract == tuple(range(n))
  if lhs_batch or rhs_batch or not trailing or not leading or lhs.ndim - n < 1:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  k = math.prod(lhs.shape[lhs.ndim - n:])
  lhs2, rhs2 = lhs.reshape(-1, k), rhs.reshape(k, -1)
  if (precision is None and preferred_element_type in (None, jnp.float32) and not kwargs
      and native_matmul_supported(lhs2, rhs2)):
    out = matmul(lhs2, rhs2)
  else:
    out = jax.lax.dot_general(lhs2, rhs2, (((1,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type, **kwargs)
  return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])
