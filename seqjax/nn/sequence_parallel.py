"""The SSM layers on a sequence-sharded mesh: their sequence ops inside `shard_map` over the mesh axis "seq".

When the trainer traces a step under a mesh whose "seq" axis has more than one device (`jax.set_mesh`, see
`seqjax.train.sharding.mesh_context`), the activations are split along the sequence, contiguously (shard r holds
positions [r T, (r + 1) T)). The per-token parts of a block (projections, gates, norms) are partitioned by XLA as
they are; the parts that read along the sequence run here on the local shards:
- the causal depthwise convolution of Mamba / Mamba-2 takes its (W - 1)-token halo from the left neighbour
  (`halo_conv`);
- the scans (SSD, selective scan, S4D, S5) run `seqjax.ops.ssm.context_parallel`: each shard scans its tokens from
  a zero state, the shards' affine state maps are combined across "seq", and the incoming state is added.
Rows are split over the mesh's other axes except "tensor" (as in context-parallel attention); parameters enter
replicated.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from seqjax.nn.attention import context_parallel_shards
from seqjax.ops.ssm import context_parallel as cp

AXIS = "seq"


def active() -> bool:
  """Whether the current trace runs under a mesh whose "seq" axis has more than one device."""
  return context_parallel_shards() > 1


def shard_sequence(fn: Callable, sharded: tuple, replicated: tuple = (), num_outputs: int = 1):
  """`fn(*sharded_local, *replicated)` inside `shard_map` over "seq": the [B, T, ...] arrays of `sharded` split by
  rows (the mesh's other axes except "tensor") and by sequence, `replicated` whole; outputs [B, T, ...] split the
  same way (`num_outputs` of them; 1: a single array). A None in `sharded` stays None."""
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = tuple(a for a in mesh.axis_names if a not in (AXIS, "tensor") and mesh.shape[a] > 1) or None
  spec = PartitionSpec(batch_axes, AXIS)
  present = [i for i, x in enumerate(sharded) if x is not None]

  def local(*args):
    full = [None] * len(sharded)
    for i, x in zip(present, args[:len(present)]):
      full[i] = x
    return fn(*full, *args[len(present):])

  out_specs = spec if num_outputs == 1 else (spec,) * num_outputs
  in_specs = (spec,) * len(present) + (PartitionSpec(),) * len(replicated)
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(
      *(sharded[i] for i in present), *replicated)


def halo_conv(conv: Callable, x_BTE: jax.Array, kernel_WE: jax.Array, bias_E: jax.Array,
              segment_ids: jax.Array | None) -> jax.Array:
  """The causal depthwise convolution `conv(x, kernel, bias, segment_ids)` on the local shard, its W - 1 earlier
  inputs (and their segment ids) taken from the left neighbour; the first shard sees zeros before the sequence."""
  halo = kernel_WE.shape[0] - 1
  if halo == 0:
    return conv(x_BTE, kernel_WE, bias_E, segment_ids)
  x_ext = jnp.concatenate([cp.from_left(x_BTE, halo, AXIS), x_BTE], axis=1)
  seg_ext = None
  if segment_ids is not None:
    seg_left = cp.from_left(segment_ids, halo, AXIS)
    seg_left = jnp.where(lax.axis_index(AXIS) == 0, -1, seg_left)  # nothing before the sequence
    seg_ext = jnp.concatenate([seg_left, segment_ids], axis=1)
  return conv(x_ext, kernel_WE, bias_E, seg_ext)[:, halo:]
