"""Native CPU kernels: C++ sources built on first use into a per-machine cache, then registered as XLA FFI targets.

`load()` returns the loaded library (a `ctypes.CDLL`) or None when native kernels are unavailable, with the
reason in `unavailable_reason()`. Nothing here is needed for correctness: every caller falls back to its pure-JAX
path (and GPUs/TPUs never use these kernels).

Build. The sources in this folder are compiled with the C++ compiler `$CXX` (default `c++`, then `g++`, then
`clang++`) against the XLA FFI headers that ship with jaxlib (`jax.ffi.include_dir()`), with `-O3 -march=native`
(the library is built on, and for, the machine that runs it). The result is cached under
`$SEQJAX_CACHE_DIR` (default `$XDG_CACHE_HOME/seqjax` or `~/.cache/seqjax`), keyed by a hash of the sources,
the compiler, the flags, the jaxlib version and the CPU, so a home directory shared by different machines gets one
library per kind of CPU. Concurrent builds (pytest-xdist, several processes on a host) are serialised with a file
lock and each writes to a temporary file that is renamed into place. `make env` builds it once up front.

Controls: `SEQJAX_NATIVE=0` disables the native kernels (every caller uses its JAX path); `SEQJAX_NATIVE=1`
makes a failed build an error instead of a warning.
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

SOURCES = ("flash_attention.cc", "mlp.cc", "norm.cc", "recurrent.cc")
HEADERS = ("kernels.h",)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
TARGETS = {  # FFI target name -> exported handler symbol
    "seqjax_flash_attention_fwd": "SeqjaxFlashForward",
    "seqjax_flash_attention_bwd": "SeqjaxFlashBackward",
    "seqjax_mlp_fwd": "SeqjaxMlpForward",
    "seqjax_mlp_bwd": "SeqjaxMlpBackward",
    "seqjax_dense_fwd": "SeqjaxDenseForward",
    "seqjax_dense_bwd": "SeqjaxDenseBackward",
    "seqjax_layer_norm_fwd": "SeqjaxLayerNormForward",
    "seqjax_layer_norm_bwd": "SeqjaxLayerNormBackward",
    "seqjax_rnn_fwd": "SeqjaxRnnForward",
    "seqjax_rnn_bwd": "SeqjaxRnnBackward",
}

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}


class NativeBuildError(RuntimeError):
  """The native kernels could not be built or loaded (and SEQJAX_NATIVE=1 asked for them)."""


def enabled() -> bool:
  """False when the user switched native kernels off with SEQJAX_NATIVE=0."""
  return os.environ.get("SEQJAX_NATIVE", "auto").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
  if os.environ.get("SEQJAX_CACHE_DIR"):
    return Path(os.environ["SEQJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "seqjax"


def _compiler() -> str | None:
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


def _library_path(compiler: str, include: str) -> Path:
  import jaxlib
  here = Path(__file__).parent
  digest = hashlib.sha256()
  for name in SOURCES + HEADERS:
    digest.update((here / name).read_bytes())
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
  for part in (version, " ".join(FLAGS), jaxlib.__version__, include, _cpu_signature()):
    digest.update(part.encode())
  return cache_dir() / f"libseqjax_native_{digest.hexdigest()[:16]}.so"


def _build(compiler: str, include: str, target: Path) -> None:
  here = Path(__file__).parent
  target.parent.mkdir(parents=True, exist_ok=True)
  with open(target.parent / ".build.lock", "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    if target.exists():  # built by another process while we waited
      return
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [compiler, *FLAGS, "-isystem", include, "-I", str(here), *(str(here / s) for s in SOURCES), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      os.unlink(tmp)
      raise NativeBuildError(f"compiling the native kernels failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, target)


def _load() -> ctypes.CDLL:
  import jax
  compiler = _compiler()
  if compiler is None:
    raise NativeBuildError("no C++ compiler found (set CXX, or install g++ / clang++)")
  include = jax.ffi.include_dir()
  target = _library_path(compiler, include)
  if not target.exists():
    _build(compiler, include, target)
  lib = ctypes.cdll.LoadLibrary(str(target))
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


def load() -> ctypes.CDLL | None:
  """The native library, built and registered on first call; None if disabled or unavailable (warns once)."""
  with _lock:
    if "lib" not in _state:
      _state["lib"], _state["reason"] = None, None
      if not enabled():
        _state["reason"] = "disabled by SEQJAX_NATIVE=0"
      else:
        try:
          _state["lib"] = _load()
        except (NativeBuildError, OSError, AttributeError) as e:
          _state["reason"] = f"{type(e).__name__}: {e}"
          if os.environ.get("SEQJAX_NATIVE", "").strip() == "1":
            raise NativeBuildError(f"SEQJAX_NATIVE=1 but the native kernels are unavailable: {e}") from e
          _log.warning("seqjax native CPU kernels unavailable, using the JAX kernels instead: %s", e)
    return _state["lib"]


def on_cpu(native_fn, jax_fn, *args):
  """`native_fn(*args)` where the computation runs on the CPU, `jax_fn(*args)` elsewhere.

  In a process whose default backend is the CPU the native call is emitted directly (no other platform to lower
  for, and the JAX path is not traced); otherwise `jax.lax.platform_dependent` picks per lowering platform.
  """
  import jax
  if jax.default_backend() == "cpu":
    return native_fn(*args)
  return jax.lax.platform_dependent(*args, cpu=native_fn, default=jax_fn)


def available() -> bool:
  return load() is not None


def unavailable_reason() -> str | None:
  load()
  return _state.get("reason")
