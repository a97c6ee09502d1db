"""The position-wise MLP `act(x W1) W2` as one op: a fused native kernel on the CPU, plain JAX elsewhere.

    mlp(x_BTD, w1_DF, w2_FD, activation="gelu", *, native=None) -> y_BTD

On a CPU, for float32 operands with D and F multiples of 16 and an activation in NATIVE_ACTIVATIONS, the forward
and backward passes each run as one native call (`native/mlp.cc`): every block of rows goes through both matmuls
and the activation while its [rows, F] hidden activations are in the cache, on all cores, instead of as separate
XLA dots and single-core element-wise passes over the [B*T, F] activations. The forward saves the pre-activation
h = x W1 (as XLA's autodiff would); the backward recomputes act(h) and act'(h) from it. Everywhere else, and with
`native=False` or `SEQJAX_NATIVE=0`, it is `act(flat_dot_general(x, W1)) @ W2`, differentiated by JAX. The
choice is made per lowering platform, like `blockwise_attention`'s.

"gelu" is flax.linen.gelu's default, the tanh approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops import native as native_lib
from seqjax.ops.linear import flat_dot_general

ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu, "silu": nn.silu}
NATIVE_ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2}


def reference_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array, activation: str = "gelu") -> jax.Array:
  """act(x W1) W2 in plain JAX (what the native kernel is tested against)."""
  contract = (((x.ndim - 1,), (0,)), ((), ()))
  h = ACTIVATIONS[activation](flat_dot_general(x, w1, contract))
  return flat_dot_general(h, w2, (((h.ndim - 1,), (0,)), ((), ())))


def native_mlp_supported(x: jax.Array, w1: jax.Array, w2: jax.Array, activation: str) -> bool:
  D, F = w1.shape
  return (activation in NATIVE_ACTIVATIONS and all(a.dtype == jnp.float32 for a in (x, w1, w2))
          and D % 16 == 0 and F % 16 == 0 and x.shape[-1] == D and w2.shape == (F, D) and native_lib.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native_mlp(x, w1, w2, act):
  return _call_forward(x, w1, w2, act)[0]


def _call_forward(x, w1, w2, act):
  M, (D, F) = int(np.prod(x.shape[:-1])), w1.shape
  out_types = (jax.ShapeDtypeStruct((M, D), jnp.float32), jax.ShapeDtypeStruct((M, F), jnp.float32))
  y, h = jax.ffi.ffi_call("seqjax_mlp_fwd", out_types, vmap_method="sequential")(
      x.reshape(M, D), w1, w2, activation=np.int64(act))
  return y.reshape(x.shape), h


def _native_fwd(x, w1, w2, act):
  y, h = _call_forward(x, w1, w2, act)
  return y, (x, w1, w2, h)


def _native_bwd(act, residuals, dy):
  x, w1, w2, h = residuals
  M, D = h.shape[0], x.shape[-1]
  out_types = (jax.ShapeDtypeStruct((M, D), jnp.float32), jax.ShapeDtypeStruct(w1.shape, jnp.float32),
               jax.ShapeDtypeStruct(w2.shape, jnp.float32))
  dx, dw1, dw2 = jax.ffi.ffi_call("seqjax_mlp_bwd", out_types, vmap_method="sequential")(
      x.reshape(M, D), w1, w2, h, dy.reshape(M, D), activation=np.int64(act))
  return dx.reshape(x.shape), dw1, dw2


_native_mlp.defvjp(_native_fwd, _native_bwd)


def mlp(x: jax.Array, w1: jax.Array, w2: jax.Array, activation: str = "gelu", *,
        native: bool | None = None) -> jax.Array:
  """act(x W1) W2 for x [..., D], W1 [D, F], W2 [F, D]; the fused native kernel on a CPU where it applies.

  Args:
    native: None: the native kernel where it applies (see the module docstring); False: plain JAX; True:
      require the native kernel (ValueError if it does not apply here).
  """
  if activation not in ACTIVATIONS:
    raise ValueError(f"mlp: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
  if w1.ndim != 2 or w2.ndim != 2 or x.shape[-1] != w1.shape[0] or w2.shape != (w1.shape[1], w1.shape[0]):
    raise ValueError(f"mlp: expected x [..., D], W1 [D, F], W2 [F, D]; got {x.shape}, {w1.shape}, {w2.shape}")
  jax_path = lambda x, w1, w2: reference_mlp(x, w1, w2, activation)  # noqa: E731
  if native is False:
    return jax_path(x, w1, w2)
  supported = native_mlp_supported(x, w1, w2, activation)
  if native is True and not supported:
    raise ValueError(f"mlp: the native kernel needs float32 operands, D and F multiples of 16, an activation in "
                     f"{sorted(NATIVE_ACTIVATIONS)} and the native library "
                     f"({native_lib.unavailable_reason() or 'available'}); got x {x.dtype}{x.shape}, "
                     f"W1 {w1.dtype}{w1.shape}, activation {activation!r}")
  if not supported:
    return jax_path(x, w1, w2)
  native_path = lambda x, w1, w2: _native_mlp(x, w1, w2, NATIVE_ACTIVATIONS[activation])  # noqa: E731
  return native_lib.on_cpu(native_path, jax_path, x, w1, w2)
