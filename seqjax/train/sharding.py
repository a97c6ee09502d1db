"""Device meshes with named axes and the logical-axis rules that place parameters and batches on them.

Parameters carry logical axis names (`nn.with_logical_partitioning`: "vocab", "embed", "mlp", "heads", ...);
`LOGICAL_AXIS_RULES` maps each to a mesh axis. The mesh has four named axes, ("data", "fsdp", "tensor", "seq"):
data parallel replicas, fully-sharded data parallel (parameters and optimizer state split over "fsdp", batch
split over "data" x "fsdp"), tensor parallel (MLP hidden, heads, vocabulary) and sequence parallel.
A dimension that an axis does not divide is left replicated along that axis rather than failing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqjax.config import MeshConfig
from seqjax.nn.moe import EXPERT_MESH_AXIS
from seqjax.ops import backend

MESH_AXES = ("data", "fsdp", "tensor", "seq")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", "seq"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("head_dim", None),
    ("layers", None),
    ("expert", EXPERT_MESH_AXIS),  # Mixture-of-experts weights [J, ...]: experts split over "data" (seqjax.nn.moe).
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Axis sizes with -1 resolved; raises ValueError if the product does not match the device count."""
  sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.seq]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"config.mesh: the fixed axes {dict(zip(MESH_AXES, sizes))} multiply to {fixed}, which "
                       f"does not divide the {num_devices} available devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh: axes {dict(zip(MESH_AXES, sizes))} need {math.prod(sizes)} devices but "
                     f"{num_devices} are available; set one axis to -1 to take the rest")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
  """A mesh over all (or the given) devices with axes ("data", "fsdp", "tensor", "seq")."""
  devices = list(jax.devices()) if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from `spec` wherever they do not divide the dimension they shard."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for a in axes:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree that may hold `nn.LogicallyPartitioned` boxes (from `jax.eval_shape`).

  The result has the structure of the *unboxed* tree.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, LOGICAL_AXIS_RULES)
  shapes = nn.unbox(abstract_tree)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s, x.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a [B, T] batch split over ("data", "fsdp"); the length axis split over "seq" when it has more than
  one device (context parallelism), else kept whole."""
  return NamedSharding(mesh, P(BATCH_AXES, "seq") if sequence_sharded(mesh) else P(BATCH_AXES))


def sequence_sharded(mesh: Mesh) -> bool:
  """Whether the mesh splits sequences: its "seq" axis has more than one device."""
  return dict(zip(mesh.axis_names, mesh.devices.shape)).get("seq", 1) > 1


def mesh_context(mesh: Mesh):
  """The context to trace and run a train step in: `jax.set_mesh(mesh)` on a mesh of more than one device, else
  nothing. On a sequence-sharded mesh attention and the SSM layers then run context-parallel inside `shard_map`
  over it (`seqjax.nn.attention`, `seqjax.nn.sequence_parallel`); on any multi-device mesh the ops run their JAX
  code instead of CPU kernels, which XLA cannot partition (`seqjax.ops.backend.partitioned_trace`)."""
  return jax.set_mesh(mesh) if mesh.devices.size > 1 else contextlib.nullcontext()


def without_cpu_kernels_if_partitioned(fn, mesh: Mesh):
  """`fn` (a jitted step run outside `mesh_context`, e.g. evaluation) called with the CPU kernels off on a mesh of
  more than one device: XLA cannot partition a custom call and would gather its operands onto every device."""
  if mesh.devices.size == 1:
    return fn

  def run(*args, **kwargs):
    with backend.cpu_kernels_mode("off"):
      return fn(*args, **kwargs)

  return run


def eval_in_mesh_context(fn, mesh: Mesh, layout: str = "contiguous"):
  """`fn(params, batch, ...)` (a jitted evaluation step) traced and run under `mesh_context(mesh)`, like the train
  step: on a sequence-sharded mesh attention and the SSM / linear layers run context-parallel (and the LM deals the
  batch in `layout`'s order), and the CPU kernels are off on any multi-device mesh. A batch whose length the "seq"
  devices do not split (times 2 for "zigzag"; e.g. a synthetic task's longer evaluation split) runs outside the
  context instead (XLA partitions it, the CPU kernels off: `without_cpu_kernels_if_partitioned`)."""
  if mesh.devices.size == 1:
    return fn
  outside = without_cpu_kernels_if_partitioned(fn, mesh)
  shards = dict(zip(mesh.axis_names, mesh.devices.shape)).get("seq", 1) * (2 if layout == "zigzag" else 1)

  def run(params, batch, *args, **kwargs):
    lengths = {np.shape(v)[1] for v in batch.values() if v is not None and np.ndim(v) >= 2}
    if any(length % shards for length in lengths):
      return outside(params, batch, *args, **kwargs)
    with mesh_context(mesh):
      return fn(params, batch, *args, **kwargs)

  return run


def process_rows(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process's devices hold row block `index` of `count` equal blocks of every global batch.

  Rows are split over the batch axes ("data" x "fsdp"), so the block is read from the batch-axis coordinates of
  this process's devices. Usually (index, count) = (process index, process count); when another axis spans
  processes (e.g. "seq" over two hosts) several processes hold the same rows (each a part of the columns), and
  the data pipeline must give all of them those rows: it slices global batches by this, not by process index.
  """
  devices = mesh.devices
  batch_dims = [mesh.axis_names.index(a) for a in BATCH_AXES if a in mesh.axis_names]
  num_blocks = math.prod(devices.shape[d] for d in batch_dims)
  blocks = set()
  for coord in np.ndindex(devices.shape):
    if devices[coord].process_index == jax.process_index():
      block = 0
      for d in batch_dims:
        block = block * devices.shape[d] + coord[d]
      blocks.add(block)
  lo, width = min(blocks), len(blocks)
  if max(blocks) - lo + 1 != width or lo % width or num_blocks % width:
    raise ValueError(f"mesh {dict(zip(mesh.axis_names, devices.shape))}: the devices of process "
                     f"{jax.process_index()} hold the row blocks {sorted(blocks)} of {num_blocks}, not one aligned "
                     f"contiguous range; order the devices so each process holds whole row blocks")
  return lo // width, num_blocks // width


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's rows: row block `process_rows(mesh)` of the global batch, which
  the data pipeline gives each process (all of each row: when "seq" spans processes, each device takes its
  columns from them)."""
  sharding = batch_sharding(mesh)
  index, count = process_rows(mesh)
  if (index, count) == (jax.process_index(), jax.process_count()):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
  return {k: _from_row_block(sharding, np.asarray(v), index, count) for k, v in batch.items()}


def _from_row_block(sharding: NamedSharding, rows: np.ndarray, index: int, count: int) -> jax.Array:
  global_shape = (rows.shape[0] * count, *rows.shape[1:])
  first = index * rows.shape[0]

  def piece(idx):
    start, stop, _ = idx[0].indices(global_shape[0])
    return rows[(slice(start - first, stop - first), *idx[1:])]

  return jax.make_array_from_callback(global_shape, sharding, piece)
