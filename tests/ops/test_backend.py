"""The one switch of the CPU kernels (`seqjax.ops.backend`): modes, the environment variable, the jit cache key,
and the behaviour of "auto" and "on" when a kernel does not build."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import attention, backend


def _run(code, **env):
  environ = {k: v for k, v in os.environ.items() if k not in ("SEQJAX_CPU_KERNELS", "SEQJAX_NATIVE")}
  return subprocess.run([sys.executable, "-c", code], env=dict(environ, JAX_PLATFORMS="cpu", **env),
                        capture_output=True, text=True, check=False)


_PROBE = ("import jax, jax.numpy as jnp; from seqjax.ops import attention, backend; q = jnp.ones((1, 8, 2, 8)); "
          "f = jax.jit(lambda q: attention.blockwise_attention(q, q, q, causal=True)); "
          "print(backend.get_cpu_kernels(), 'seqjax_flash_attention' in f.lower(q).as_text())")


def test_environment_variable_off_traces_the_jax_code():
  out = _run(_PROBE, SEQJAX_CPU_KERNELS="off")
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["off", "False"]


def test_invalid_environment_value_is_a_clear_error():
  out = _run("import seqjax.ops.backend", SEQJAX_CPU_KERNELS="maybe")
  assert out.returncode != 0 and "SEQJAX_CPU_KERNELS='maybe': choose one of auto, off, on" in out.stderr


def test_deprecated_seqjax_native_is_mapped_with_a_warning():
  out = _run(_PROBE, SEQJAX_NATIVE="0")
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["off", "False"]
  assert "FutureWarning" in out.stderr and "SEQJAX_NATIVE is deprecated" in out.stderr


def test_set_cpu_kernels_and_the_context_manager():
  initial = backend.get_cpu_kernels()
  try:
    backend.set_cpu_kernels("off")
    assert backend.get_cpu_kernels() == "off" and backend.cpu_kernel("attention") is None
    with backend.cpu_kernels_mode("on"):
      assert backend.get_cpu_kernels() == "on"
    assert backend.get_cpu_kernels() == "off"
  finally:
    backend.set_cpu_kernels(initial)
  for bad in ("native", "", None):
    with pytest.raises(ValueError, match="mode must be one of"):
      backend.set_cpu_kernels(bad)
    with pytest.raises(ValueError, match="mode must be one of"):
      backend.cpu_kernels_mode(bad)
  with pytest.raises(ValueError, match="unknown op family"):
    backend.cpu_kernel("linear")


def test_mode_is_part_of_the_jit_cache_key():
  """A function jitted once is traced once per mode and never reused across modes."""
  traced = []

  @jax.jit
  def f(x):
    traced.append(backend.get_cpu_kernels())
    return x + 1.0

  for mode in ("auto", "off", "auto", "off", "on"):
    with backend.cpu_kernels_mode(mode):
      f(jnp.ones(3))
  assert traced == ["auto", "off", "on"]


def test_modes_give_the_same_numbers():
  q, k, v = (jax.random.normal(key, (2, 24, 4, 16)) for key in jax.random.split(jax.random.key(0), 3))
  f = jax.jit(lambda q, k, v: attention.blockwise_attention(q, k, v, causal=True))
  with backend.cpu_kernels_mode("off"):
    off = f(q, k, v)
    assert "seqjax_flash_attention" not in f.lower(q, k, v).as_text()
  np.testing.assert_allclose(f(q, k, v), off, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(off, attention.reference_attention(q, k, v, causal=True), atol=2e-5, rtol=2e-5)


def test_a_kernel_that_does_not_build_warns_in_auto_and_raises_in_on(tmp_path):
  """`false` as the compiler: "auto" warns once and runs the JAX tiles; "on" raises at trace time."""
  code = ("import logging, jax, jax.numpy as jnp\n"
          "from seqjax import cpu_kernels\nfrom seqjax.ops import attention, backend\n"
          "records = []\nh = logging.Handler(); h.emit = records.append\n"
          "logging.getLogger('seqjax.cpu_kernels').addHandler(h)\n"
          "q = jnp.ones((1, 8, 2, 8))\n"
          "f = jax.jit(lambda q: attention.blockwise_attention(q, q, q, causal=True))\n"
          "print('seqjax_flash_attention' in f.lower(q).as_text(), len(records))\n"
          "with backend.cpu_kernels_mode('on'):\n"
          "  try:\n    f.lower(q)\n  except cpu_kernels.CpuKernelBuildError as e:\n    print('raised', e)\n")
  out = _run(code, CXX=shutil.which("false") or "false", SEQJAX_CACHE_DIR=str(tmp_path))
  assert out.returncode == 0, out.stderr
  first, second = out.stdout.splitlines()[:2]
  assert first == "False 1"
  assert second.startswith("raised") and "SEQJAX_CPU_KERNELS=on" in second and "flash_attention" in second
