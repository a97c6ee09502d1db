"""LayerNorm over the last axis as one op: a C++ kernel on the CPU, plain JAX elsewhere.

    layer_norm(x, scale, bias, eps=1e-6) -> (x - mean) / sqrt(var + eps) * scale + bias

Statistics in float32 over the last axis (size D), scale and bias [D]. On a CPU, for float32 operands with D a
multiple of 16, the forward and backward passes each run as one call of the kernel of `seqjax.cpu_kernels.layer_norm`
(op family "layer_norm" of `seqjax.ops.backend`; rows on all cores, the forward saves the per-row mean and 1/std for
the backward) instead of XLA's reductions and element-wise passes. Elsewhere, and with `SEQJAX_CPU_KERNELS=off`, it
is `reference_layer_norm`, differentiated by JAX. It equals `flax.linen.LayerNorm` (epsilon 1e-6) to float32
rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.ops import backend


def reference_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
  x, scale, bias = jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm of x [..., D] with scale, bias [D]; the CPU kernel on a CPU for float32 operands."""
  x, scale, bias = jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)
  if scale.shape != (x.shape[-1],) or bias.shape != scale.shape:
    raise ValueError(f"layer_norm: scale and bias must be [D] = [{x.shape[-1]}], got {scale.shape}, {bias.shape}")
  jax_path = lambda x, s, b: reference_layer_norm(x, s, b, eps)  # noqa: E731
  kernel = backend.cpu_kernel("layer_norm")
  if kernel is None or not kernel.supports(x, scale, bias):
    return jax_path(x, scale, bias)
  cpu_path = lambda x, s, b: kernel.layer_norm(x, s, b, eps)  # noqa: E731
  return backend.on_cpu(cpu_path, jax_path, x, scale, bias)
