"""Orbax checkpoints that hold everything needed to continue a run exactly.

A checkpoint at step s holds two items:
  state  the TrainState (params, optimizer state, step, rng, skipped-step count), restored into its shardings;
  data   this process's data-iterator position (one small JSON file per process, written by grain's handler),
         captured right after the batch of step s was drawn, i.e. at the same step as the state.
Saves are asynchronous (training continues while arrays are written; orbax copies the arrays to host memory
before `save` returns, so the next step may donate and overwrite the device buffers) and always waited for before
exit. A save lives in a `<step>.orbax-checkpoint-tmp*` directory until it is complete and renamed to `<step>`, so
an interrupted save is never listed as a checkpoint; such leftovers are deleted when the next Checkpointer opens
the directory. If the newest checkpoint cannot be read (truncated file, missing item, shapes of another config),
it is reported by step and reason, left in place for inspection, and the next newest is tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Mapping

import grain.checkpoint as grain_checkpoint
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

TMP_MARKER = ".orbax-checkpoint-tmp"
_ITEMS = ("state", "data")


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


def _path_str(path: tuple[Any, ...]) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {_path_str(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def describe_shape_mismatch(stored: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                            limit: int = 8) -> str:
  """One line naming the parameters whose shapes differ, that are missing, or that are unexpected ("" if none)."""
  differ = [f"{k} {stored[k]} in the checkpoint vs {expected[k]} in this config"
            for k in sorted(set(stored) & set(expected)) if tuple(stored[k]) != tuple(expected[k])]
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  parts = []
  for title, items in (("shapes differ", differ), ("not in the checkpoint", missing),
                       ("not in this config", extra)):
    if items:
      more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
      parts.append(f"{title}: {', '.join(items[:limit])}{more}")
  return "; ".join(parts)


class Checkpointer:
  """Keep-N step checkpoints under `directory` (async saves, automatic restore of the newest readable one)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = directory
    self.removed_unfinished = self._remove_unfinished_saves()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True, create=True)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def _remove_unfinished_saves(self) -> list[str]:
    """Deletes `*.orbax-checkpoint-tmp*` directories left by a process killed while saving."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return []
    removed = []
    for name in sorted(os.listdir(self.directory)):
      if TMP_MARKER in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        removed.append(name)
    if removed:
      log.warning("removed unfinished checkpoint saves (the process was killed while writing them): %s",
                  ", ".join(removed))
    return removed

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: Any | None,
           extra_items: Mapping[str, Any] | None = None) -> None:
    """Starts saving `state` (and the iterator position) as checkpoint `step`; returns before it is written.

    `extra_items` are further orbax args saved beside them (e.g. `seqjax.train.faults` items).
    """
    self._set_aside_unreadable(step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = grain_checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
    items.update(extra_items or {})
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _set_aside_unreadable(self, step: int) -> None:
    """A checkpoint already at `step` on disk is one restore skipped as unreadable (the run resumed from an
    older one and has come back to this step). It is renamed to `<step>.unreadable[-N]`, kept for inspection."""
    path = self.step_dir(step)
    if jax.process_index() != 0 or not os.path.isdir(path):
      return
    self.manager.wait_until_finished()
    target, n = f"{path}.unreadable", 1
    while os.path.exists(target):
      n += 1
      target = f"{path}.unreadable-{n}"
    os.rename(path, target)
    self.manager.reload()
    log.warning("the unreadable checkpoint at step %d was renamed to %s (kept for inspection) before saving "
                "this step again", step, target)

  def restore(self, step: int, abstract_state: Any, *, with_data: bool = True) -> tuple[Any, Any | None]:
    """Restores checkpoint `step` into the shapes/shardings of `abstract_state`. Returns (state, data_state).

    With `with_data`, a checkpoint without the data item is an error (resuming the iterator from its start would
    silently train on other batches than the interrupted run).
    """
    missing = [name for name in (_ITEMS if with_data else _ITEMS[:1])
               if not os.path.isdir(os.path.join(self.step_dir(step), name))]
    if missing:
      raise FileNotFoundError(f"item(s) {', '.join(missing)} missing from the checkpoint directory")
    # Checked from the metadata first: cheaper than a failing restore, and names the parameters.
    mismatch = self.params_mismatch(step, abstract_state) if hasattr(abstract_state, "params") else ""
    if mismatch:
      raise ValueError(f"its parameters do not match the current config (a checkpoint of another config?): "
                       f"{mismatch}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = grain_checkpoint.CheckpointRestore(_IteratorSnapshot())
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    data = restored["data"].state if with_data else None
    return restored["state"], data

  def params_mismatch(self, step: int, abstract_state: Any) -> str:
    """Names the parameters of checkpoint `step` whose shapes differ from `abstract_state.params` ("" if none)."""
    try:
      meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_dir(step)) / "state")
      stored = meta.tree["params"]
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: nothing to compare)
      return ""
    return describe_shape_mismatch(_shapes(stored), _shapes(abstract_state.params))

  def _diagnose(self, error: Exception) -> str:
    if isinstance(error, ValueError) and str(error).startswith("its parameters do not match"):
      return str(error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    first = first.split(" See full TensorStore details")[0]  # The rest is a repr of the reader's spec.
    return f"{type(error).__name__}: {first[:400]}"

  def restore_latest(self, abstract_state: Any, *, with_data: bool = True, before: int | None = None
                     ) -> tuple[int, Any, Any | None] | None:
    """Restores the newest readable checkpoint: (step, state, data_state), or None if there is none at all.

    Only checkpoints at steps < `before` are considered if it is given. Unreadable checkpoints are skipped with a
    warning naming the step and the reason; they stay on disk. If every checkpoint is unreadable, raises
    CheckpointRestoreError listing them all.
    """
    failures = []
    for step in reversed(self.all_steps()):
      if before is not None and step >= before:
        continue
      try:
        state, data = self.restore(step, abstract_state, with_data=with_data)
      except Exception as e:  # pylint: disable=broad-except
        reason = self._diagnose(e)
        log.warning("checkpoint at step %d could not be restored and is left in place for inspection (%s); "
                    "trying an older one", step, reason)
        failures.append((step, reason))
        continue
      if failures:
        log.warning("resuming from the checkpoint at step %d instead", step)
      return step, state, data
    if failures:
      by_reason: dict[str, list[int]] = {}
      for s, r in failures:
        by_reason.setdefault(r, []).append(s)
      listing = "; ".join(f"step {', '.join(map(str, steps))}: {r}" for r, steps in by_reason.items())
      raise CheckpointRestoreError(f"no checkpoint under {self.directory} could be restored ({listing}). They "
                                   f"were left in place; move them away (or use another --workdir) to start "
                                   f"afresh.")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def is_primary() -> bool:
  return jax.process_index() == 0
