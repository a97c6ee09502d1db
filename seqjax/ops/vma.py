"""Varying manual axes (`shard_map`'s check_vma): fresh loop carries typed like the inputs they combine with.

Inside `jax.shard_map` (default `check_vma=True`) every value carries the set of mesh axes it varies over. A loop
carry started from a constant (`jnp.zeros`, `jnp.full`) varies over none, while the loop body mixes it with the
inputs, which vary over the sharded axes: the carry's type changes across the loop and tracing fails ("carry input
and carry output must have equal types"). `vary_like(x, *refs)` marks x as varying over every axis any leaf of
`refs` varies over (a no-op outside `shard_map`), so a kernel's carries start with the type they end with and the
same kernel runs unchanged outside and inside `shard_map`.
"""

from __future__ import annotations

from typing import Any

import jax


def varying_axes(*refs: Any) -> tuple[str, ...]:
  """The mesh axes (sorted) over which some array leaf of `refs` varies; () outside `shard_map`."""
  axes: set = set()
  for leaf in jax.tree.leaves(refs):
    mat = getattr(jax.typeof(leaf), "mat", None)
    if mat is not None:
      axes |= set(mat.varying)
  return tuple(sorted(axes, key=str))


def vary_like(x: Any, *refs: Any) -> Any:
  """`x` (a pytree) marked varying over the axes any leaf of `refs` varies over and it does not yet."""
  axes = varying_axes(*refs)
  if not axes:
    return x

  def cast(leaf):
    missing = tuple(a for a in axes if a not in varying_axes(leaf))
    return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(cast, x)
