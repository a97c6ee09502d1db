"""CPU kernels: C++ replacements, called through the XLA FFI, for JAX code of `seqjax.ops` on a CPU.

This package is platform code, kept apart from the portable kernels: `seqjax.ops` reaches it only through
`seqjax.ops.backend`, which picks, per op family, this package's binding on a CPU and the op's own JAX code on
GPU/TPU (and whenever the switch `SEQJAX_CPU_KERNELS` / `seqjax.ops.backend.set_cpu_kernels` says "off", a
kernel does not build, or it does not cover the arguments). docs/native.md describes the kernels.

Layout:
  src/*.cc, src/kernels.h   one source per kernel, each built into its own library (`_build`);
  attention.py              flash attention fwd/bwd (`flash_attention.cc`), family "attention";
  mlp.py                    the fused MLP fwd/bwd (`mlp.cc`), family "mlp";
  dense.py                  the [rows, k] x [k, n] matmul fwd/bwd (`mlp.cc`), family "dense";
  layer_norm.py             LayerNorm fwd/bwd (`norm.cc`), family "layer_norm";
  recurrent.py              the LSTM / GRU / RNN recurrences fwd/bwd (`recurrent.cc`), family "recurrent".

Each binding module names the library it needs (`KERNEL`), says which arguments it covers (`supports(...)`) and
exposes the kernel as a differentiable JAX function (a `jax.custom_vjp` over `jax.ffi.ffi_call`s).

`python -m seqjax.cpu_kernels` builds every kernel and prints which ones are available (`make env` runs it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from seqjax.cpu_kernels._build import (KERNELS, CpuKernelBuildError, available, cache_dir, compiler, load,
                                       unavailable_reason)

FAMILIES = ("attention", "mlp", "dense", "layer_norm", "recurrent")  # binding modules, named by op family

__all__ = ["FAMILIES", "KERNELS", "CpuKernelBuildError", "available", "binding", "cache_dir", "compiler", "load",
           "status", "unavailable_reason"]


def binding(family: str, *, required: bool = False) -> ModuleType | None:
  """The binding module of an op family with its kernel loaded, or None when the kernel is unavailable.

  `required=True` raises CpuKernelBuildError instead of returning None.
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown op family {family!r}; the families with a CPU kernel are {FAMILIES}")
  module = importlib.import_module(f"seqjax.cpu_kernels.{family}")
  return module if load(module.KERNEL, required=required) is not None else None


def status() -> dict[str, str | None]:
  """Builds every kernel; kernel name -> None if it is available, else the reason it is not."""
  return {kernel: unavailable_reason(kernel) for kernel in KERNELS}
