"""The position-wise MLP `act(x W1) W2` as one op: a fused C++ kernel on the CPU, plain JAX elsewhere.

    mlp(x_BTD, w1_DF, w2_FD, activation="gelu") -> y_BTD

On a CPU, for float32 operands with D and F multiples of 16 and an activation the kernel has, the forward and
backward passes each run as one call of the kernel of `seqjax.cpu_kernels.mlp` (op family "mlp" of
`seqjax.ops.backend`): every block of rows goes through both matmuls and the activation while its [rows, F] hidden
activations are in the cache, on all cores, instead of as separate XLA dots and single-core element-wise passes over
the [B*T, F] activations. Everywhere else, and with `SEQJAX_CPU_KERNELS=off`, it is `reference_mlp`,
`act(flat_dot_general(x, W1)) @ W2`, differentiated by JAX. The choice is made per lowering platform, like
`blockwise_attention`'s.

"gelu" is the tanh approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (flax.linen.gelu's default).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from seqjax.ops import backend
from seqjax.ops.dense.dot import flat_dot_general

ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=True), "relu": jax.nn.relu, "silu": jax.nn.silu}


def reference_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array, activation: str = "gelu") -> jax.Array:
  """act(x W1) W2 in plain JAX (what the CPU kernel is tested against)."""
  x, w1, w2 = jnp.asarray(x), jnp.asarray(w1), jnp.asarray(w2)
  contract = (((x.ndim - 1,), (0,)), ((), ()))
  h = ACTIVATIONS[activation](flat_dot_general(x, w1, contract))
  return flat_dot_general(h, w2, (((h.ndim - 1,), (0,)), ((), ())))


def mlp(x: jax.Array, w1: jax.Array, w2: jax.Array, activation: str = "gelu") -> jax.Array:
  """act(x W1) W2 for x [..., D], W1 [D, F], W2 [F, D]; the fused CPU kernel on a CPU where it applies."""
  x, w1, w2 = jnp.asarray(x), jnp.asarray(w1), jnp.asarray(w2)
  if activation not in ACTIVATIONS:
    raise ValueError(f"mlp: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
  if w1.ndim != 2 or w2.ndim != 2 or x.shape[-1] != w1.shape[0] or w2.shape != (w1.shape[1], w1.shape[0]):
    raise ValueError(f"mlp: expected x [..., D], W1 [D, F], W2 [F, D]; got {x.shape}, {w1.shape}, {w2.shape}")
  jax_path = lambda x, w1, w2: reference_mlp(x, w1, w2, activation)  # noqa: E731
  kernel = backend.cpu_kernel("mlp")
  if kernel is None or not kernel.supports(x, w1, w2, activation):
    return jax_path(x, w1, w2)
  cpu_path = lambda x, w1, w2: kernel.mlp(x, w1, w2, activation)  # noqa: E731
  return backend.on_cpu(cpu_path, jax_path, x, w1, w2)
