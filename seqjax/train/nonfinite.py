"""What the host does about a non-finite step (train.on_nan): the one place for "stop", "skip" and "rollback".

The jitted step has already dropped the update (seqjax.train.step); the loop reads its metrics one step late and
hands a non-finite step to `NonFiniteHandler`, which
  "skip":     logs it to WORKDIR/nonfinite.jsonl and returns (the run goes on);
  "rollback": logs it and raises `Rollback` (the loop reloads the newest checkpoint before that step, replays up to
              it and skips that step's batch), at most train.max_rollbacks times without a save after the last
              bad step — then it stops like "stop";
  "stop":     writes WORKDIR/nonfinite_report.json (step, loss, non-finite gradients and parameters, the batch's
              shape and non-finite inputs, the data position that reproduces the batch) and the batch
              (nonfinite_batch_step_S.npz), then raises `NonFiniteError` (exit status 3 in seqjax.main).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from seqjax.train.workdir import append_jsonl, json_float, write_json

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Training stopped because the loss or gradients became NaN/inf (config.train.on_nan="stop")."""


class Rollback(Exception):
  """Raised inside the loop when on_nan="rollback" meets a non-finite step."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


def nonfinite_record(step: int, host: dict, names: list[str], seen: tuple[Any, dict] | None) -> dict:
  """What went wrong at `step`: loss, which gradients/parameters are non-finite, which batch it was.

  `host` holds the step's metrics on the host; `names` the parameter leaf names (`seqjax.train.step.leaf_names`);
  `seen` (data position before the batch, the host batch) if the loop still has them.
  """
  record = {
      "step": step, "loss": json_float(float(host["loss"])), "grad_norm": json_float(float(host["grad_norm"])),
      "nonfinite_gradients": [n for n, ok in zip(names, host["grads_finite"]) if not ok],
      "nonfinite_parameters_after_update": [n for n, ok in zip(names, host["params_finite"]) if not ok],
  }
  if seen is not None:
    position, batch = seen
    first = batch.get("inputs", next(iter(batch.values())))
    record["batch"] = {
        "iterator_state_before": position,  # The task's train stream at this position gives the batch again.
        "shape": list(np.shape(first)),
        "nonfinite_inputs": sorted(k for k, v in batch.items()
                                   if np.issubdtype(np.asarray(v).dtype, np.floating) and
                                   not np.all(np.isfinite(v))),
    }
  return record


class NonFiniteHandler:
  """The host's reaction to a non-finite step, by train.on_nan (see the module docstring)."""

  def __init__(self, workdir: str, on_nan: str, max_rollbacks: int, leaf_names: list[str]):
    if on_nan not in ("stop", "skip", "rollback"):
      raise ValueError(f"on_nan must be 'stop', 'skip' or 'rollback', got {on_nan!r}")
    self.workdir = workdir
    self.on_nan = on_nan
    self.max_rollbacks = max_rollbacks
    self.names = leaf_names
    self.rollbacks = 0  # Rollbacks since the last save after the newest rolled-back step.
    self.last_rollback = 0

  def _path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def __call__(self, step: int, host: dict, seen: tuple[Any, dict] | None, last_checkpoint: int | None) -> None:
    """Handles non-finite step `step`: returns ("skip"), or raises Rollback or NonFiniteError."""
    record = nonfinite_record(step, host, self.names, seen)
    record["last_checkpoint"] = last_checkpoint
    if self.on_nan == "skip":
      log.warning("step %d: non-finite loss or gradients (%s); the update was dropped and counted as skipped",
                  step, ", ".join(record["nonfinite_gradients"][:4]) or f"loss={record['loss']}")
      append_jsonl(self._path("nonfinite.jsonl"), {**record, "action": "skipped"})
      return
    if self.on_nan == "rollback" and self.rollbacks < self.max_rollbacks:
      append_jsonl(self._path("nonfinite.jsonl"), {**record, "action": "rolled back"})
      raise Rollback(step)
    action = ("stopped" if self.on_nan == "stop" else
              f"stopped after {self.rollbacks} rollbacks (train.max_rollbacks)")
    append_jsonl(self._path("nonfinite.jsonl"), {**record, "action": action})
    report = self._path("nonfinite_report.json")
    if seen is not None and jax.process_index() == 0:
      batch_file = self._path(f"nonfinite_batch_step_{step}.npz")
      np.savez(batch_file, **seen[1])
      record["batch"]["file"] = batch_file
    write_json(report, {**record, "action": action})
    bad = record["nonfinite_gradients"]
    raise NonFiniteError(
        f"non-finite loss or gradients at step {step} (loss={record['loss']}; non-finite gradients: "
        f"{', '.join(bad[:4]) + (' ...' if len(bad) > 4 else '') if bad else 'none'}); {action}. Report: "
        f"{report}. The checkpoints (newest: step {last_checkpoint}) are intact: fix the cause (e.g. "
        f"lower optim.learning_rate, inspect the batch) and rerun to resume, or set train.on_nan='skip' or "
        f"'rollback'")

  def rolled_back(self, step: int) -> None:
    """Counts a rollback for non-finite step `step`."""
    self.rollbacks += 1
    self.last_rollback = step

  def saved(self, step: int) -> None:
    """A checkpoint was saved at `step`: past the last bad step, the rollback budget is whole again."""
    if step > self.last_rollback:
      self.rollbacks = 0
