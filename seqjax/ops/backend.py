"""The one backend choice of `seqjax.ops`: per op family, a CPU kernel on a CPU or the op's own JAX code.

Some ops have a C++ replacement for the CPU (`seqjax.cpu_kernels`, platform code kept apart; docs/native.md). This
module is the only place in `seqjax.ops` that reaches it. An op asks `cpu_kernel(family)` for its family's binding
("attention", "mlp", "dense", "layer_norm", "recurrent"), checks that the binding covers its arguments
(`binding.supports(...)`) and calls `on_cpu(cpu_fn, jax_fn, *args)`: the same jitted program then runs the C++
kernel where it executes on a CPU and the JAX code on GPU/TPU.

One switch decides, for every family at once:

    SEQJAX_CPU_KERNELS=auto   (default) a CPU kernel wherever it is built and covers the arguments; a kernel that
                              does not build is reported by one warning and its ops run their JAX code;
    SEQJAX_CPU_KERNELS=off    the portable JAX code everywhere (e.g. to export for another platform from a CPU);
    SEQJAX_CPU_KERNELS=on     as auto, but a kernel that does not build is an error (CpuKernelBuildError).

In a program: `set_cpu_kernels(mode)` (what the config field `cpu_kernels` calls), or for a block of code, in this
thread, `with cpu_kernels_mode(mode): ...`. The mode is read when an op is traced, and it is part of JAX's jit cache
key: a function jitted once is traced again, and cached separately, for each mode it is called under, so a program
traced under one mode is never reused under another. (An ahead-of-time `jax.jit(f).lower(...).compile()` keeps the
program of the mode it was lowered under.) `SEQJAX_NATIVE` (0 / 1), the former switch, is read as `off` / `on` for
one release, with a warning.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any, Callable, ContextManager

import jax
from jax._src import config as jax_config  # the only way to make our own setting part of the jit cache key

MODES = ("auto", "off", "on")
FAMILIES = ("attention", "mlp", "dense", "layer_norm", "recurrent")
ENV = "SEQJAX_CPU_KERNELS"
_CONFIG_NAME = "seqjax_cpu_kernels"  # a JAX config option; JAX reads its default from $SEQJAX_CPU_KERNELS too


def _mode_from_environment() -> str:
  value = os.environ.get(ENV)
  if value is not None:
    if value not in MODES:
      raise ValueError(f"{ENV}={value!r}: choose one of {', '.join(MODES)}")
    return value
  legacy = os.environ.get("SEQJAX_NATIVE")
  if legacy is None:
    return "auto"
  mode = {"0": "off", "1": "on"}.get(legacy.strip(), "auto")
  warnings.warn(f"SEQJAX_NATIVE is deprecated and will be removed; it was read as {ENV}={mode}. Set {ENV} "
                f"(auto / off / on) instead.", FutureWarning, stacklevel=2)
  return mode


_MODE = jax_config.enum_state(
    _CONFIG_NAME, MODES, _mode_from_environment(),
    help="Whether seqjax ops run their C++ CPU kernels on a CPU: auto, off or on (see seqjax.ops.backend).",
    include_in_jit_key=True, include_in_trace_context=True)


def _check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"cpu_kernels: mode must be one of {MODES}, got {mode!r}")
  return mode


def set_cpu_kernels(mode: str) -> None:
  """Sets the CPU-kernel mode of the process: "auto", "off" or "on" (see the module docstring)."""
  jax.config.update(_CONFIG_NAME, _check_mode(mode))


def get_cpu_kernels() -> str:
  """The CPU-kernel mode in effect here (this thread's `cpu_kernels_mode`, else the process's)."""
  return _MODE.value


def cpu_kernels_mode(mode: str) -> ContextManager[None]:
  """A context manager: ops traced inside it, in this thread, use this CPU-kernel mode."""
  return _MODE(_check_mode(mode))


def cpu_kernel(family: str) -> ModuleType | None:
  """The `seqjax.cpu_kernels` binding of an op family, or None when the JAX code must run.

  None when the mode is "off", the trace is partitioned over several devices (`partitioned_trace`), or the
  family's kernel is unavailable here (mode "auto"; mode "on" raises CpuKernelBuildError instead). The caller still checks `binding.supports(...)` and dispatches with `on_cpu`.
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown op family {family!r}; the families with a CPU kernel are {FAMILIES}")
  mode = get_cpu_kernels()
  if mode == "off" or partitioned_trace():
    return None
  from seqjax import cpu_kernels  # pylint: disable=import-outside-toplevel  # platform code, loaded on first use
  return cpu_kernels.binding(family, required=mode == "on")


def partitioned_trace() -> bool:
  """Whether ops are being traced for a program XLA partitions over several devices: a mesh is set around the
  trace (`jax.set_mesh`) with an axis of more than one device that is not manual.

  XLA cannot partition a custom call: under such a program a CPU kernel would run on operands gathered onto every
  device (an all-gather of the activations in every layer). There the ops run their JAX code, which XLA
  partitions. Inside `shard_map` over every such axis the operands are already the local shards, and the kernels
  run per shard. (The trainer traces its step under its mesh, `seqjax.train.sharding.mesh_context`.)
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  manual = set(mesh.manual_axes)
  return any(size > 1 and name not in manual for name, size in zip(mesh.axis_names, mesh.axis_sizes))


def on_cpu(cpu_fn: Callable[..., Any], jax_fn: Callable[..., Any], *args: Any) -> Any:
  """`cpu_fn(*args)` where the computation runs on a CPU, `jax_fn(*args)` elsewhere.

  Always through `jax.lax.platform_dependent`, which picks the branch per lowering platform: a function lowered for
  an accelerator never contains a CPU custom call, even when it is lowered in a CPU-only process (`jax.export`
  for TPU or GPU from a laptop, an ahead-of-time `.lower(...)` for another platform). Both branches are traced;
  only the lowering platform's is lowered and compiled.
  """
  return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=jax_fn)
