"""Time and memory of a mixer against sequence length: the cost curve a researcher compares variants by.

For each length the jitted forward + backward of the mixer (batch 1, model width 64 unless overridden) is timed
(median of repeats after a compile run) and its temporary memory read from XLA's `memory_analysis()` of the
compiled program (what the program allocates besides inputs and outputs). Quadratic attention shows ~4x per
doubling in time and memory at long lengths; linear-time mixers ~2x.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.config import override
from seqjax.nn.mixers import make_mixer


@dataclasses.dataclass(frozen=True)
class Point:
  length: int
  seconds: float  # forward + backward, median
  temp_bytes: int  # XLA temporary allocation of the compiled forward + backward


def profile(name: str, cfg, lengths: Sequence[int] = (256, 512, 1024, 2048, 4096), *, repeats: int = 3,
            overrides: Mapping[str, Any] | None = None) -> list[Point]:
  """Measures `name` (at `cfg` with `overrides`) at each length; returns one `Point` per length."""
  cfg = override(cfg, overrides) if overrides else cfg
  module = make_mixer(name, cfg)
  points = []
  for length in lengths:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, length, cfg.d_model)), jnp.float32)
    params = module.lazy_init(jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))["params"]

    def loss(params, x):
      return jnp.sum(module.apply({"params": params}, x).astype(jnp.float32) ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = step.lower(params, x).compile()
    analysis = compiled.memory_analysis()
    temp = int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, x))
      times.append(time.perf_counter() - start)
    points.append(Point(length, statistics.median(times), temp))
  return points


def plot(curves: Mapping[str, Sequence[Point]], path: str) -> None:
  """Writes one PNG with time (left) and temporary memory (right) against length, log-log, one line per mixer."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
  for name, points in curves.items():
    lengths = [p.length for p in points]
    ax_time.plot(lengths, [p.seconds * 1e3 for p in points], marker="o", label=name)
    ax_mem.plot(lengths, [max(p.temp_bytes, 1) / 2**20 for p in points], marker="o", label=name)
  for ax, label in ((ax_time, "forward + backward (ms)"), (ax_mem, "XLA temporary memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  ax_time.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
