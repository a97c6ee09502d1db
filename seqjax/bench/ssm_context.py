"""Benchmark of context-parallel SSD (`seqjax.ops.ssm.context_parallel`): the two ways to combine the shards'
state maps, side by side in one run, on simulated CPU devices; with `--op=delta`, the delta rule (DeltaNet,
`seqjax.ops.linear.context_parallel.delta_rule_context_parallel`) next to XLA's own partitioning of the
single-device program (what a "seq" mesh ran before it was context-parallel).

    python -m seqjax.bench ssm_context                              # P = 2, 4, 8 at local length 1024
    python -m seqjax.bench ssm_context --local_len=256 --shards=2,4   # a quick look
    python -m seqjax.bench ssm_context --op=delta --local_len=512     # DeltaNet: results/ssm_context/delta.json

For each P and combine ("all_gather": the maps gathered once, then a local associative scan; "ppermute": a
Hillis-Steele scan of neighbour sends), Mamba-2's SSD forward+backward on the local shard [B, T, N, H]:
- collectives: the number of collective ops in the compiled program (each a latency step on a real interconnect;
  the ppermute rounds depend on each other) and the bytes they move per device, read from the HLO;
- time: the median wall time of the jitted forward+backward (simulated devices share this machine's cores: the
  ratio shows the combine's overhead next to the local scan, not a pod's speed), and the same for the local
  kernel alone (no combine, no correction: the floor);
- with `--op=delta`: also "xla" (the unsharded `delta_rule` jitted on inputs split along the sequence, partitioned
  by XLA) and each program's per-device temporary memory from `compiled.memory_analysis()`.
"""

from __future__ import annotations

import functools
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
  flags.DEFINE_enum("op", "ssd", ["ssd", "delta"], "ssd: Mamba-2's SSD; delta: the delta rule (DeltaNet), with "
                    "XLA's partitioning of the single-device program beside it (results in delta.json)",
                    flag_values=fv)


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


def _delta_program(P, local_len, combine):
  """The jitted fwd+bwd of the delta rule on P shards: combine None (each shard's kernel alone), "all_gather" /
  "ppermute" (context-parallel), or "xla" (the single-device program on inputs split along the sequence)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  from seqjax.ops.linear import delta_rule  # pylint: disable=import-outside-toplevel
  from seqjax.ops.linear.context_parallel import delta_rule_context_parallel  # pylint: disable=import-outside-toplevel
  mesh = Mesh(np.array(jax.devices()[:P]), ("seq",))
  spec = PartitionSpec(None, "seq")
  if combine == "xla":
    run = delta_rule
  else:
    local = delta_rule if combine is None else functools.partial(delta_rule_context_parallel, combine=combine)
    run = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
  fn = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a) ** 2), argnums=(0, 1, 2, 3)))
  L = P * local_len
  keys = jax.random.split(jax.random.key(0), 4)
  k = jax.random.normal(keys[1], (BATCH, L, HEADS, STATE))
  args = (jax.random.normal(keys[0], (BATCH, L, HEADS, STATE)) / 8, k / jnp.linalg.norm(k, axis=-1, keepdims=True),
          jax.random.normal(keys[2], (BATCH, L, HEADS, HEAD_DIM)),
          jax.nn.sigmoid(jax.random.normal(keys[3], (BATCH, L, HEADS))))
  return fn, jax.device_put(args, NamedSharding(mesh, spec))


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
  delta = fv.op == "delta"
  what = (f"the delta rule fwd+bwd, per device q, k [{BATCH}, {fv.local_len}, {HEADS}, {STATE}], v [{BATCH}, "
          f"{fv.local_len}, {HEADS}, {HEAD_DIM}], state [{BATCH}, {HEADS}, {STATE}, {HEAD_DIM}]" if delta else
          f"SSD fwd+bwd, per device x [{BATCH}, {fv.local_len}, {HEADS}, {HEAD_DIM}], state [{BATCH}, {HEADS}, "
          f"{HEAD_DIM}, {STATE}]")
  log(f"jax {jax.__version__}, {len(jax.devices())} simulated {jax.devices()[0].platform} devices; {what} float32 "
      f"({BATCH * HEADS * HEAD_DIM * STATE * 4 / 2**20:.2f} MiB)")
  log(f"{'P':>3} {'combine':>11} {'collectives':>12} {'MiB moved':>10} {'temp MiB':>9} {'ms':>8} {'/ local':>8}")
  rows = []
  for P in shards:
    floor = None
    for combine in (None, "all_gather", "ppermute") + (("xla",) if delta else ()):
      fn, args = (_delta_program if delta else _program)(P, fv.local_len, combine)
      compiled = fn.lower(*args).compile()
      count, nbytes = collectives(compiled.as_text())
      temp = compiled.memory_analysis().temp_size_in_bytes
      seconds = _median_time(fn, args, fv.repeats)
      floor = seconds if combine is None else floor
      row = dict(P=P, combine=combine or "local only", collectives=count, bytes=nbytes, temp_bytes=temp,
                 seconds=seconds, over_local=seconds / floor)
      rows.append(row)
      log(f"{P:>3} {row['combine']:>11} {count:>12} {nbytes / 2**20:10.2f} {temp / 2**20:9.2f} "
          f"{seconds * 1e3:8.1f} {row['over_local']:8.2f}")
  result = dict(config=dict(op=fv.op, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, state=STATE,
                            local_len=fv.local_len, dtype="float32", jax=jax.__version__), rows=rows)
  with open(os.path.join(fv.results_dir, "delta.json" if delta else "ssm_context.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
