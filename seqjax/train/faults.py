"""Fault injection for reliability tests and drills, switched on by one environment variable.

  SEQJAX_FAULTS="nan_at=6,12;slow_save=8:30;slow_eval=5;slow_step=0.1" python -m seqjax.main --config=... \
      --workdir=...

Specs (separated by ";"):
  nan_at=K[,K2...]   the batch drawn for step K gets NaN weights, so that step's loss and gradients are NaN
                     (tied to the step number, so a rollback that replays earlier steps meets it again at K).
  slow_save=S:SECS   every checkpoint saved at step >= S takes SECS seconds longer to commit *in the background*
                     (training continues meanwhile; the save stays an `*.orbax-checkpoint-tmp*` directory).
  slow_eval=SECS     every evaluation sleeps SECS seconds first (a wide window to kill a run mid-evaluation).
  slow_step=SECS     every step sleeps SECS seconds before drawing its batch (a run of tiny, fast steps then
                     lasts long enough to be killed or preempted mid-run).

Nothing here runs unless the variable is set; the trainer logs a warning naming the active faults.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp

ENV_VAR = "SEQJAX_FAULTS"


@dataclasses.dataclass(frozen=True)
class Faults:
  nan_steps: frozenset[int] = frozenset()
  slow_save_from: int = 0
  slow_save_secs: float = 0.0
  slow_eval_secs: float = 0.0
  slow_step_secs: float = 0.0

  @property
  def active(self) -> bool:
    return bool(self.nan_steps or self.slow_save_secs or self.slow_eval_secs or self.slow_step_secs)

  def poison(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch for `step`, with NaN weights if a NaN is injected at that step (a copy; the input is kept)."""
    if step not in self.nan_steps:
      return batch
    out = dict(batch)
    out["weights"] = np.full_like(batch["weights"], np.nan)
    return out

  def save_items(self, step: int) -> dict[str, Any]:
    """Extra orbax items for the checkpoint at `step` (a slow background commit), or none."""
    if self.slow_save_secs > 0 and step >= self.slow_save_from:
      return {"fault_delay": DelayedCommit(self.slow_save_secs)}
    return {}

  def before_eval(self) -> None:
    if self.slow_eval_secs > 0:
      time.sleep(self.slow_eval_secs)

  def before_step(self) -> None:
    if self.slow_step_secs > 0:
      time.sleep(self.slow_step_secs)


def parse(spec: str) -> Faults:
  """Parses a SEQJAX_FAULTS spec (see the module docstring). Raises ValueError naming the bad part."""
  fields: dict[str, Any] = {}
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    key, sep, value = part.partition("=")
    try:
      if not sep:
        raise ValueError("expected KEY=VALUE")
      if key == "nan_at":
        fields["nan_steps"] = frozenset(int(v) for v in value.split(",") if v.strip())
      elif key == "slow_save":
        start, _, secs = value.partition(":")
        fields["slow_save_from"], fields["slow_save_secs"] = int(start), float(secs)
      elif key == "slow_eval":
        fields["slow_eval_secs"] = float(value)
      elif key == "slow_step":
        fields["slow_step_secs"] = float(value)
      else:
        raise ValueError("unknown fault; known: nan_at, slow_save, slow_eval, slow_step")
    except ValueError as e:
      raise ValueError(f"{ENV_VAR}: cannot parse {part!r} ({e}); e.g. {ENV_VAR}='nan_at=6;slow_save=8:30'") from e
  return Faults(**fields)


def from_env(environ: Mapping[str, str] | None = None) -> Faults:
  return parse((os.environ if environ is None else environ).get(ENV_VAR, ""))


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint item whose commit is slow: orbax waits for its future in the background thread that finalizes the
# save, so the whole step directory stays temporary for that long while the training loop runs on.
# ----------------------------------------------------------------------------------------------------------------


class _SleepFuture:
  def __init__(self, secs: float):
    self.secs = secs

  def result(self, timeout: float | None = None) -> None:
    del timeout
    time.sleep(self.secs)

  def cancel(self) -> None:
    pass


class DelayedCommitHandler(ocp.handlers.AsyncCheckpointHandler):
  """Writes nothing; its commit future sleeps."""

  async def async_save(self, directory, args):  # pylint: disable=invalid-overridden-method
    del directory
    return [_SleepFuture(args.secs)]

  def save(self, directory, args):
    del directory
    time.sleep(args.secs)

  def restore(self, directory, args=None):
    del directory, args

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(DelayedCommitHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DelayedCommit(ocp.args.CheckpointArgs):
  secs: float = 1.0
