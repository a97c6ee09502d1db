"""Test-wide set-up: 8 simulated CPU devices so sharded code is tested against unsharded.

`chex.set_n_cpu_devices` must run before JAX initialises its backend, hence at import time of
this conftest (pytest imports it before any test module).
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import chex  # noqa: E402

chex.set_n_cpu_devices(8)
