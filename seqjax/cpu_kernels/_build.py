"""Building and loading the CPU kernels: one shared library per C++ source, cached per machine, FFI targets registered.

Each kernel is one source in `src/` (with the shared `src/kernels.h`) built into its own library, so a compile error
in one source disables that kernel only (one warning giving the compiler's message); the others still load.

Build. Compiled with the C++ compiler `$CXX` (default `c++`, then `g++`, then `clang++`) against the XLA FFI headers
that ship with jaxlib (`jax.ffi.include_dir()`), with `-O3 -march=native` (a library is built on, and for, the
machine that runs it). Cached under `$SEQJAX_CACHE_DIR` (default `$XDG_CACHE_HOME/seqjax` or `~/.cache/seqjax`),
keyed by a hash of the kernel's source and the header, the compiler, the flags, the jaxlib version and the CPU, so a
home directory shared by different machines holds one library per kind of CPU. Concurrent builds (pytest-xdist,
several processes on a host) are serialised with a file lock and each writes a temporary file renamed into place.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "src"
HEADERS = ("kernels.h",)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
KERNELS = {  # kernel name -> (source, {FFI target name: exported handler symbol})
    "flash_attention": ("flash_attention.cc", {
        "seqjax_flash_attention_fwd": "SeqjaxFlashForward",
        "seqjax_flash_attention_bwd": "SeqjaxFlashBackward",
    }),
    "mlp": ("mlp.cc", {  # the fused MLP and the dense matmul
        "seqjax_mlp_fwd": "SeqjaxMlpForward",
        "seqjax_mlp_bwd": "SeqjaxMlpBackward",
        "seqjax_dense_fwd": "SeqjaxDenseForward",
        "seqjax_dense_bwd": "SeqjaxDenseBackward",
    }),
    "norm": ("norm.cc", {
        "seqjax_layer_norm_fwd": "SeqjaxLayerNormForward",
        "seqjax_layer_norm_bwd": "SeqjaxLayerNormBackward",
    }),
    "recurrent": ("recurrent.cc", {
        "seqjax_rnn_fwd": "SeqjaxRnnForward",
        "seqjax_rnn_bwd": "SeqjaxRnnBackward",
    }),
}

_log = logging.getLogger("seqjax.cpu_kernels")
_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}
_warned: set[str] = set()


class CpuKernelBuildError(RuntimeError):
  """A CPU kernel could not be built or loaded (raised when it was required: `load(..., required=True)`)."""


def cache_dir() -> Path:
  if os.environ.get("SEQJAX_CACHE_DIR"):
    return Path(os.environ["SEQJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "seqjax"


def compiler() -> str | None:
  """The C++ compiler the kernels are built with, or None when there is none."""
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_signature() -> str:
  try:
    text = Path("/proc/cpuinfo").read_text()
    keys = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))][:2]
  except OSError:
    keys = []
  return "|".join([platform.machine(), platform.processor(), *keys])


def library_path(kernel: str, cxx: str, include: str) -> Path:
  """Where the library of `kernel` built by `cxx` for this machine is cached."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  for name in (KERNELS[kernel][0],) + HEADERS:
    digest.update((SOURCE_DIR / name).read_bytes())
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  for part in (version, " ".join(FLAGS), jaxlib.__version__, include, _cpu_signature()):
    digest.update(part.encode())
  return cache_dir() / f"libseqjax_{kernel}_{digest.hexdigest()[:16]}.so"


def _build(kernel: str, cxx: str, include: str, target: Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target.parent / ".build.lock", "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    if target.exists():  # built by another process while we waited
      return
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cxx, *FLAGS, "-isystem", include, "-I", str(SOURCE_DIR), str(SOURCE_DIR / KERNELS[kernel][0]), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      os.unlink(tmp)
      raise CpuKernelBuildError(f"compiling {KERNELS[kernel][0]} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, target)


def _load(kernel: str) -> ctypes.CDLL:
  import jax  # pylint: disable=import-outside-toplevel
  cxx = compiler()
  if cxx is None:
    raise CpuKernelBuildError("no C++ compiler found (set CXX, or install g++ / clang++)")
  include = jax.ffi.include_dir()
  target = library_path(kernel, cxx, include)
  if not target.exists():
    _build(kernel, cxx, include, target)
  lib = ctypes.cdll.LoadLibrary(str(target))
  for name, symbol in KERNELS[kernel][1].items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


def load(kernel: str, *, required: bool = False) -> ctypes.CDLL | None:
  """The library of `kernel` (a key of KERNELS), built and registered on first call; None if it is unavailable.

  A kernel that cannot be built or loaded is reported once, by one warning giving the reason (the other kernels are
  unaffected); with `required=True` it raises CpuKernelBuildError instead.
  """
  if kernel not in KERNELS:
    raise ValueError(f"unknown CPU kernel {kernel!r}; the kernels are {sorted(KERNELS)}")
  with _lock:
    if kernel not in _libraries:
      try:
        _libraries[kernel] = _load(kernel)
      except (CpuKernelBuildError, OSError, AttributeError) as e:
        _libraries[kernel] = None
        _reasons[kernel] = f"{type(e).__name__}: {e}"
    lib = _libraries[kernel]
    if lib is None:
      if required:
        raise CpuKernelBuildError(f"the CPU kernel {kernel!r} is required (SEQJAX_CPU_KERNELS=on) but unavailable: "
                                  f"{_reasons[kernel]}")
      if kernel not in _warned:
        _warned.add(kernel)
        _log.warning("seqjax CPU kernel %r unavailable, its callers use their JAX code instead: %s", kernel,
                     _reasons[kernel])
    return lib


def available(kernel: str) -> bool:
  """Whether `kernel` builds and loads here (built on first call)."""
  return load(kernel) is not None


def unavailable_reason(kernel: str) -> str | None:
  """Why `kernel` is unavailable (None if it is available)."""
  available(kernel)
  return _reasons.get(kernel)
