"""Orbax checkpoints that hold everything needed to continue a run exactly.

A checkpoint at step s holds two items:
  state  the TrainState (params, optimizer state, step, rng, skipped-step count), restored into its shardings;
  data   this process's data-iterator position (one small JSON file per process, written by grain's handler).
Saves are asynchronous (training continues while arrays are written) and always waited for before exit. An
interrupted save leaves a temporary directory that orbax never lists as a checkpoint; the next save removes it.
If the newest checkpoint cannot be read, it is reported by step and reason, left in place for inspection, and the
next newest is tried.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain.checkpoint as grain_checkpoint
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class _IteratorSnapshot:
  """The data iterator's state captured at save time, so a background save never sees a later position."""

  def __init__(self, state: Any = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state.decode())

  def start_prefetch(self) -> None:  # Called by grain's handler after a restore.
    pass


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in the directory could be restored; the message lists each step and why."""


class Checkpointer:
  """Keep-N step checkpoints under `directory` (async saves, automatic restore of the newest readable one)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    self.directory = directory
    self.manager = ocp.CheckpointManager(directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Any | None) -> None:
    """Starts saving `state` (and the iterator position) as checkpoint `step`; returns before it is written."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = grain_checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, *, with_data: bool = True) -> tuple[Any, Any | None]:
    """Restores checkpoint `step` into the shapes/shardings of `abstract_state`. Returns (state, data_state)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data and "data" in self._item_names(step):
      items["data"] = grain_checkpoint.CheckpointRestore(_IteratorSnapshot())
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    data = restored["data"].state if "data" in items else None
    return restored["state"], data

  def restore_latest(self, abstract_state: Any, *, with_data: bool = True
                     ) -> tuple[int, Any, Any | None] | None:
    """Restores the newest readable checkpoint: (step, state, data_state), or None if there is none at all.

    Unreadable checkpoints are skipped with a warning naming the step and the reason; they stay on disk.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, data = self.restore(step, abstract_state, with_data=with_data)
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("checkpoint at step %d could not be restored (%s); it is left in place, trying an older "
                    "one", step, reason)
        failures.append((step, reason))
        continue
      return step, state, data
    if failures:
      listing = "; ".join(f"step {s}: {r}" for s, r in failures)
      raise CheckpointRestoreError(f"no checkpoint under {self.directory} could be restored ({listing}). They "
                                   f"were left in place; move them away to start afresh.")
    return None

  def _item_names(self, step: int) -> set[str]:
    try:
      return set(self.manager.item_metadata(step).keys())
    except Exception:  # pylint: disable=broad-except
      return {"state", "data"}

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def is_primary() -> bool:
  return jax.process_index() == 0
