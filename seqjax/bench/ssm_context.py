"""Benchmark of context-parallel SSD (`seqjax.ops.ssm.context_parallel`): the two ways to combine the shards'
state maps, side by side in one run, on simulated CPU devices.

    python -m seqjax.bench ssm_context                              # P = 2, 4, 8 at local length 1024
    python -m seqjax.bench ssm_context --local_len=256 --shards=2,4   # a quick look

For each P and combine ("all_gather": the maps gathered once, then a local associative scan; "ppermute": a
Hillis-Steele scan of neighbour sends), Mamba-2's SSD forward+backward on the local shard [B, T, N, H]:
- collectives: the number of collective ops in the compiled program (each a latency step on a real interconnect;
  the ppermute rounds depend on each other) and the bytes they move per device, read from the HLO;
- time: the median wall time of the jitted forward+backward (simulated devices share this machine's cores: the
  ratio shows the combine's overhead next to the local scan, not a pod's speed), and the same for the local
  kernel alone (no combine, no correction: the floor).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Sequence

from absl import flags

from seqjax.bench.ring import _shape_bytes, simulated_devices

BATCH, HEADS, HEAD_DIM, STATE = 1, 8, 64, 64
COLLECTIVES = ("all-gather", "collective-permute", "all-reduce", "reduce-scatter")


def _define_flags(fv):
  flags.DEFINE_integer("local_len", 1024, "tokens per device (the global length is P times this)", flag_values=fv)
  flags.DEFINE_list("shards", ["2", "4", "8"], "numbers of devices P on the seq axis", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "timed runs per program (the median is reported)", flag_values=fv)
  flags.DEFINE_string("results_dir", "results/ssm_context", "where ssm_context.json goes", flag_values=fv)


def _program(P, local_len, combine):
  """The jitted fwd+bwd of SSD on P shards (combine None: each shard's local kernel alone) and its inputs."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, PartitionSpec  # pylint: disable=import-outside-toplevel

  from seqjax.ops.ssm import ssd  # pylint: disable=import-outside-toplevel
  from seqjax.ops.ssm.context_parallel import ssd_context_parallel  # pylint: disable=import-outside-toplevel
  mesh = Mesh(np.array(jax.devices()[:P]), ("seq",))
  spec = PartitionSpec(None, "seq")

  def local(x, dt, B, C, A):
    if combine is None:
      return ssd(x, dt, jax.lax.pcast(A, "seq", to="varying"), B, C)
    return ssd_context_parallel(x, dt, A, B, C, combine=combine)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4 + (PartitionSpec(),), out_specs=spec)
  fn = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a) ** 2), argnums=(0, 1, 2, 3, 4)))
  L = P * local_len
  keys = jax.random.split(jax.random.key(0), 5)
  args = (jax.random.normal(keys[0], (BATCH, L, HEADS, HEAD_DIM)),
          jax.nn.softplus(jax.random.normal(keys[1], (BATCH, L, HEADS))) * 0.1,
          jax.random.normal(keys[2], (BATCH, L, STATE)) / 8, jax.random.normal(keys[3], (BATCH, L, STATE)) / 8,
          -jnp.exp(jax.random.normal(keys[4], (HEADS,))))
  return fn, args


def collectives(hlo_text: str) -> tuple[int, int]:
  """(number of collective ops, bytes of their results) in a compiled HLO module (async pairs counted once)."""
  count = nbytes = 0
  for line in hlo_text.splitlines():
    match = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if match:
      count += 1
      nbytes += _shape_bytes(match.group(1))
  return count, nbytes


def _median_time(fn, args, repeats):
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark; `argv` holds the flags only (as `python -m seqjax.bench ssm_context` passes them)."""
  fv = flags.FlagValues()
  _define_flags(fv)
  fv(["python -m seqjax.bench ssm_context"] + list(sys.argv[1:] if argv is None else argv))
  shards = [int(p) for p in fv.shards]
  if min(shards) < 1 or fv.local_len < 1 or fv.repeats < 1:
    raise ValueError("bad flags: --shards >= 1, --local_len >= 1, --repeats >= 1")
  jax = simulated_devices(max(shards))
  os.makedirs(fv.results_dir, exist_ok=True)
  log = lambda msg: print(msg, flush=True)  # noqa: E731
  log(f"jax {jax.__version__}, {len(jax.devices())} simulated {jax.devices()[0].platform} devices; SSD fwd+bwd, per "
      f"device x [{BATCH}, {fv.local_len}, {HEADS}, {HEAD_DIM}], state [{BATCH}, {HEADS}, {HEAD_DIM}, {STATE}] "
      f"float32 ({BATCH * HEADS * HEAD_DIM * STATE * 4 / 2**20:.2f} MiB)")
  log(f"{'P':>3} {'combine':>11} {'collectives':>12} {'MiB moved':>10} {'ms':>8} {'/ local':>8}")
  rows = []
  for P in shards:
    floor = None
    for combine in (None, "all_gather", "ppermute"):
      fn, args = _program(P, fv.local_len, combine)
      count, nbytes = collectives(fn.lower(*args).compile().as_text())
      seconds = _median_time(fn, args, fv.repeats)
      floor = seconds if combine is None else floor
      row = dict(P=P, combine=combine or "local only", collectives=count, bytes=nbytes, seconds=seconds,
                 over_local=seconds / floor)
      rows.append(row)
      log(f"{P:>3} {row['combine']:>11} {count:>12} {nbytes / 2**20:10.2f} {seconds * 1e3:8.1f} "
          f"{row['over_local']:8.2f}")
  result = dict(config=dict(batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, state=STATE, local_len=fv.local_len,
                            dtype="float32", jax=jax.__version__), rows=rows)
  with open(os.path.join(fv.results_dir, "ssm_context.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
