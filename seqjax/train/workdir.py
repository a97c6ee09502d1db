"""The run's directory, shared by every task: its config check, metric truncation, JSON writers, preemption, and
the state fingerprint.

WORKDIR holds config.json (the config of the run in it), checkpoints/, metrics.jsonl, tensorboard/, curves.png,
final_metrics.json and, when something happened, config_changes.jsonl, nonfinite.jsonl, nonfinite_report.json.
Only process 0 writes files here (orbax writes checkpoints collectively).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
from typing import Any

import jax
import numpy as np

from seqjax import config as config_lib
from seqjax.config import Config, ConfigError

log = logging.getLogger(__name__)


def write_json(path: str, payload: dict) -> None:
  """Replaces `path` atomically (written beside it, then renamed)."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def append_jsonl(path: str, payload: dict) -> None:
  if jax.process_index() != 0:
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(payload, sort_keys=True) + "\n")


def json_float(x: float) -> float | str:
  """A float for JSON: non-finite values as strings ("nan", "inf")."""
  return float(x) if math.isfinite(x) else str(float(x))


# ----------------------------------------------------------------------------------------------------------------
# The workdir's config: resuming with another config is refused unless allowed.
# ----------------------------------------------------------------------------------------------------------------

# Fields that may differ between a workdir's config.json and the config resuming it, without
# train.allow_config_change: they change how long, how often or where, not what a step computes. The resumed steps
# stay bitwise those of an uninterrupted run, except: num_steps moves the learning-rate schedule's horizon (later
# steps follow the new schedule), and the mesh, grad_accum_steps, cpu_kernels and the attention kernel
# (model.attention.implementation: e.g. blockwise here, "auto" on a pod) change only the summation order (equal to
# float tolerance). Every other field (model, data, optimizer, batch size, seed, task) refuses.
# "section.*": all fields of that section.
RESUMABLE_FIELDS = frozenset({
    "train.num_steps", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.checkpoint_every_secs", "train.keep_checkpoints", "train.log_every", "train.async_checkpointing",
    "train.on_nan", "train.max_rollbacks", "train.allow_config_change", "train.grad_accum_steps",
    "train.stop_when",
    "data.data_dir", "data.eval_split", "data.eval_splits", "mesh.*", "sample.*", "cpu_kernels",
    "model.attention.implementation",
})


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}.{key}" if prefix else key
    if isinstance(value, dict):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


def _resumable(field: str) -> bool:
  return field in RESUMABLE_FIELDS or f"{field.split('.')[0]}.*" in RESUMABLE_FIELDS


def check_workdir_config(config: Config, workdir: str) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the run already in `workdir` (its config.json), before anything is built.

  Returns the changed fields {name: (saved, new)}. Raises ConfigError if any of them is not in RESUMABLE_FIELDS
  and train.allow_config_change is off. A field missing from config.json (written before the field existed)
  counts as its default.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      saved = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"--workdir={workdir}: its config.json cannot be read ({e}); repair or remove it, or use "
                      f"another --workdir") from e
  defaults = _flatten(json.loads(json.dumps(config_lib.to_dict(Config()))))
  current = _flatten(json.loads(json.dumps(config_lib.to_dict(config))))
  changed = {}
  for field, value in current.items():
    before = saved.get(field, defaults.get(field))
    if before != value:
      changed[field] = (before, value)
  refused = {k: v for k, v in changed.items() if not _resumable(k)}
  if refused and not config.train.allow_config_change:
    listing = ", ".join(f"config.{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(refused.items()))
    raise ConfigError(f"--workdir={workdir} holds a run of another config ({listing}). Use another --workdir, "
                      f"or pass --config.train.allow_config_change=True to continue that run with these values")
  return changed


def record_config(config: Config, workdir: str, changes: dict[str, tuple[Any, Any]], step: int) -> None:
  """Writes the config a (resumed) run continues with to WORKDIR/config.json, and its allowed changes to
  config_changes.jsonl. Called only once the run is known to continue (a failed resume leaves config.json)."""
  write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
  if changes:
    log.warning("resuming with a changed config: %s", ", ".join(f"{k}: {a!r} -> {b!r}"
                                                                  for k, (a, b) in sorted(changes.items())))
    append_jsonl(os.path.join(workdir, "config_changes.jsonl"),
                 {"step": step, "changed": {k: list(v) for k, v in changes.items()}})


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl records after `step` (the resumed run recomputes them) and any torn last line."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
        ok = line.endswith("\n") and int(record["step"]) <= step
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        kept.append(line)
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)


def state_fingerprint(state: Any) -> str:
  """SHA-256 of every leaf of the state (values, dtypes, shapes): equal fingerprints mean bitwise-equal runs."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if not getattr(leaf, "is_fully_addressable", True):
      return "n/a (state spans processes)"
    x = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}".encode())
    digest.update(np.ascontiguousarray(x).tobytes())
  return digest.hexdigest()


class Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (finish the step, save, exit 0)."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # A second signal: stop now (an in-flight save is still waited for on the way out).
      raise KeyboardInterrupt(f"second signal {signum}: exiting without a new checkpoint")
    log.warning("received signal %d: finishing the current step, saving a checkpoint, then exiting", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
