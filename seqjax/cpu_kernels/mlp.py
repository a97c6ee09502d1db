"""The position-wise MLP `act(x W1) W2` as one CPU kernel (C++, XLA FFI), forward and backward (op family "mlp").

Every block of rows goes through both matmuls and the activation while its [rows, F] hidden activations are in
the cache, on all cores (`src/mlp.cc`), instead of separate XLA dots and single-core element-wise passes over the
[B*T, F] activations. The forward saves the pre-activation h = x W1 (as XLA's autodiff would); the backward
recomputes act(h) and act'(h) from it. "gelu" is the tanh approximation.

Covered: float32 operands, D and F multiples of 16, an activation in ACTIVATIONS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cpu_kernels import _build

KERNEL = "mlp"
ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2}  # name -> the kernel's activation code


def supports(x: jax.Array, w1: jax.Array, w2: jax.Array, activation: str) -> bool:
  """Whether `mlp` covers these arguments."""
  D, F = w1.shape
  return (activation in ACTIVATIONS and all(a.dtype == jnp.float32 for a in (x, w1, w2))
          and D % 16 == 0 and F % 16 == 0 and x.shape[-1] == D and w2.shape == (F, D))


def mlp(x: jax.Array, w1: jax.Array, w2: jax.Array, activation: str = "gelu") -> jax.Array:
  """act(x W1) W2 for float32 x [..., D], W1 [D, F], W2 [F, D] by the CPU kernel (ValueError if not covered)."""
  x, w1, w2 = jnp.asarray(x), jnp.asarray(w1), jnp.asarray(w2)
  if w1.ndim != 2 or w2.ndim != 2 or not supports(x, w1, w2, activation):
    raise ValueError(f"mlp (CPU kernel): needs float32 operands, D and F multiples of 16 and an activation in "
                     f"{sorted(ACTIVATIONS)}; got x {x.dtype}{x.shape}, W1 {w1.dtype}{w1.shape}, W2 "
                     f"{w2.dtype}{w2.shape}, activation {activation!r}")
  _build.load(KERNEL, required=True)
  return _mlp(x, w1, w2, ACTIVATIONS[activation])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlp(x, w1, w2, act):
  return _call_forward(x, w1, w2, act)[0]


def _call_forward(x, w1, w2, act):
  rows, (D, F) = int(np.prod(x.shape[:-1])), w1.shape
  out_types = (jax.ShapeDtypeStruct((rows, D), jnp.float32), jax.ShapeDtypeStruct((rows, F), jnp.float32))
  y, h = jax.ffi.ffi_call("seqjax_mlp_fwd", out_types, vmap_method="sequential")(
      x.reshape(rows, D), w1, w2, activation=np.int64(act))
  return y.reshape(x.shape), h


def _mlp_fwd(x, w1, w2, act):
  y, h = _call_forward(x, w1, w2, act)
  return y, (x, w1, w2, h)


def _mlp_bwd(act, residuals, dy):
  x, w1, w2, h = residuals
  rows, D = h.shape[0], x.shape[-1]
  out_types = (jax.ShapeDtypeStruct((rows, D), jnp.float32), jax.ShapeDtypeStruct(w1.shape, jnp.float32),
               jax.ShapeDtypeStruct(w2.shape, jnp.float32))
  dx, dw1, dw2 = jax.ffi.ffi_call("seqjax_mlp_bwd", out_types, vmap_method="sequential")(
      x.reshape(rows, D), w1, w2, h, dy.reshape(rows, D), activation=np.int64(act))
  return dx.reshape(x.shape), dw1, dw2


_mlp.defvjp(_mlp_fwd, _mlp_bwd)
