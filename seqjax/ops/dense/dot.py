"""Projections as single 2-D matmuls.

`flat_dot_general` is a drop-in `dot_general` for `nn.Dense` / `nn.DenseGeneral`: when the contraction is over
the trailing axes of the activation and the leading axes of the kernel (every projection here), it flattens the
activation to [rows, K] and multiplies once. XLA on CPU otherwise keeps the [B, T, ...] layout and, for the
weight gradient, physically transposes the large activation — measured at about a third of a Transformer step's
time at d_model 256 (experiments/README.md). The result is the same contraction; anything else falls through to
`lax.dot_general` unchanged.

On a CPU the flattened float32 product [rows, K] x [K, N] with k a multiple of 16 runs as the C++ kernel of
`seqjax.cpu_kernels.dense` (op family "dense" of `seqjax.ops.backend`: row blocks on all cores, the weight gradient
accumulated per thread), which is 1.5-2x XLA's dot at the projection shapes of a small Transformer (e.g.
[4096, 128] x [128, 128]). `SEQJAX_CPU_KERNELS=off` keeps XLA's dot.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from seqjax.ops import backend


def _cpu_kernel(x: jax.Array, w: jax.Array):
  """The dense CPU binding when it covers x [m, k] @ w [k, n] here, else None."""
  kernel = backend.cpu_kernel("dense")
  return kernel if kernel is not None and kernel.supports(x, w) else None


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [m, k] @ w [k, n]: the CPU kernel on a CPU where it applies (float32, k a multiple of 16), else jnp.matmul."""
  x, w = jnp.asarray(x), jnp.asarray(w)
  kernel = _cpu_kernel(x, w)
  if kernel is None:
    return jnp.matmul(x, w)
  return backend.on_cpu(kernel.matmul, jnp.matmul, x, w)


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                     preferred_element_type=None, **kwargs) -> jax.Array:
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
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
  kernel = (_cpu_kernel(lhs2, rhs2) if precision is None and preferred_element_type in (None, jnp.float32)
            and not kwargs else None)
  if kernel is not None:
    out = backend.on_cpu(kernel.matmul, jnp.matmul, lhs2, rhs2)
  else:
    out = jax.lax.dot_general(lhs2, rhs2, (((1,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type, **kwargs)
  return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])
