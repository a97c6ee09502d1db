"""Test-wide set-up: 8 simulated CPU devices so sharded code is tested against unsharded, and fast XLA compiles.

`chex.set_n_cpu_devices` must run before JAX initialises its backend, hence at import time of
this conftest (pytest imports it before any test module).

The tests' programs are tiny, so the suite's time is mostly XLA compiling them. `FAST_COMPILE_FLAGS` turn LLVM's
optimisation off and use XLA's classic CPU emitters: compiles several times faster (the suite about halves), the
same functions computed, the code slower (immaterial at test sizes). `SEQJAX_TEST_XLA_DEFAULTS=1` runs the suite
with XLA's default compiler instead (e.g. to rule the flags out when a test fails). docs/testing.md.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

if os.environ.get("SEQJAX_TEST_XLA_DEFAULTS", "0") != "1":
  # Also read by the tests that start training processes with XLA_FLAGS of their own (tests/train/fault_harness.py,
  # tests/test_main.py), so that those compile fast too.
  os.environ["SEQJAX_TEST_FAST_XLA_FLAGS"] = FAST_COMPILE_FLAGS
  if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()
else:
  os.environ.pop("SEQJAX_TEST_FAST_XLA_FLAGS", None)

import chex  # noqa: E402

chex.set_n_cpu_devices(8)
