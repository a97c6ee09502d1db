"""What the selective scan, SSD and the S4D/S5 recurrences share: the segment-reset mask of packed sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_mask(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """[B, T] float32: 0 where the state resets (the id differs from the previous position's), else 1.

  Position 0 is always 1: it continues from the initial state. Shared by every SSM kernel in `seqjax.ops.ssm`.
  """
  if segment_ids is None:
    return jnp.ones((batch, length), jnp.float32)
  segment_ids = jnp.asarray(segment_ids)
  changed_BT = segment_ids[:, 1:] != segment_ids[:, :-1]
  keep_BT = jnp.concatenate([jnp.ones((batch, 1), bool), ~changed_BT], axis=1)
  return keep_BT.astype(jnp.float32)


def as_arrays(*xs):
  """Each argument as a jax array (None stays None): the ops accept any array-like, NumPy arrays included."""
  return tuple(None if x is None else jnp.asarray(x) for x in xs)
