"""The matmul [rows, k] x [k, n] as a CPU kernel (C++, XLA FFI), forward and backward (op family "dense").

Row blocks on all cores, the weight gradient accumulated per thread (`src/mlp.cc`): 1.5-2x XLA's dot at the
projection shapes of a small Transformer (e.g. [4096, 128] x [128, 128]). `seqjax.ops.dense.dot.flat_dot_general`
(every projection) and `seqjax.ops.dense.dot.matmul` run it on a CPU.

Covered: float32 [m, k] x [k, n], k a multiple of 16, m and n > 0 (any n: padded inside the kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.cpu_kernels import _build

KERNEL = "mlp"  # the matmul lives in the MLP's library


def supports(x: jax.Array, w: jax.Array) -> bool:
  """Whether `matmul` covers these arguments."""
  return (x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[0] and x.dtype == jnp.float32
          and w.dtype == jnp.float32 and w.shape[0] % 16 == 0 and w.shape[1] > 0 and x.shape[0] > 0)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [m, k] @ w [k, n] by the CPU kernel (ValueError if not covered)."""
  x, w = jnp.asarray(x), jnp.asarray(w)
  if not supports(x, w):
    raise ValueError(f"matmul (CPU kernel): needs float32 [m, k] x [k, n] with k a multiple of 16; got "
                     f"{x.dtype}{x.shape} x {w.dtype}{w.shape}")
  _build.load(KERNEL, required=True)
  return _matmul(x, w)


@jax.custom_vjp
def _matmul(x, w):
  return jax.ffi.ffi_call("seqjax_dense_fwd", jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32),
                          vmap_method="sequential")(x, w)


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  out_types = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(w.shape, jnp.float32))
  return tuple(jax.ffi.ffi_call("seqjax_dense_bwd", out_types, vmap_method="sequential")(x, w, dy))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
