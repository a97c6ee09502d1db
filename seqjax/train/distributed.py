"""Multi-host start-up: one process per host (TPU pod slices, GPU clusters, several CPU processes on one machine).

JAX's multi-controller runtime runs the same program in every process; `jax.distributed.initialize` connects
them before any device is touched, after which `jax.devices()` lists every device of every process and a mesh
spans hosts. Everything else in seqjax is already written for it: the data pipeline reads a disjoint slice of
each global batch per process (`jax.process_index()`), batches are assembled with
`jax.make_array_from_process_local_data`, orbax checkpoints are written collectively (each process saves its
own data-iterator position), and only process 0 writes metrics, plots and final_metrics.json.

    # explicit (any cluster; the workdir must be on a file system every process sees):
    python -m seqjax.main --config=... --workdir=DIR --coordinator_address=HOST0:1234 --num_processes=4 \
        --process_id=$RANK
    # auto-detected (Cloud TPU VMs, SLURM, Open MPI):
    python -m seqjax.main --config=... --workdir=DIR --distributed
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)


class DistributedConfigError(ValueError):
  """The multi-process flags are inconsistent (the user's to fix)."""


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """How to join the multi-process runtime. `auto` lets JAX detect the cluster; otherwise all three are set."""

  auto: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def enabled(self) -> bool:
    return self.auto or self.coordinator_address is not None


def make_spec(*, auto: bool, coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> DistributedSpec:
  """Validates the flags into a spec; raises DistributedConfigError naming what is wrong."""
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if auto and given:
    raise DistributedConfigError(f"--distributed auto-detects the cluster; do not combine it with "
                                 f"{', '.join(given)} (give either --distributed or all three explicit flags)")
  if given and len(given) != 3:
    missing = [name for name in explicit if name not in given]
    raise DistributedConfigError(f"multi-process runs need --coordinator_address, --num_processes and "
                                 f"--process_id together; missing {', '.join(missing)}")
  if given:
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise DistributedConfigError(f"--coordinator_address must be HOST:PORT (process 0's address), got "
                                   f"{coordinator_address!r}")
    if num_processes < 1:
      raise DistributedConfigError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
      raise DistributedConfigError(f"--process_id must be in [0, {num_processes}) for --num_processes="
                                   f"{num_processes}, got {process_id}")
  return DistributedSpec(auto, coordinator_address, num_processes, process_id)


def initialize(spec: DistributedSpec, *, timeout_s: int = 300) -> None:
  """Joins the multi-process runtime described by `spec` (a no-op when it is not enabled).

  Must run before anything initialises a JAX backend (`jax.devices()`, the first computation).
  """
  if not spec.enabled:
    return
  import jax  # pylint: disable=import-outside-toplevel

  if spec.auto:
    jax.distributed.initialize(initialization_timeout=timeout_s)
  else:
    jax.distributed.initialize(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                               process_id=spec.process_id, initialization_timeout=timeout_s)
  log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
