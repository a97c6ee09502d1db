"""Soak: many kills of one run (SIGKILL mid-step, mid-save, mid-evaluation; SIGTERM), then a bitwise comparison.

Slow (a few minutes): `make test-slow` or `pytest -m slow tests/train/test_fault_soak.py -s` (prints the table).
"""

import json
import os
import random
import signal

import pytest

from tests.train import fault_harness as fh

NUM_STEPS = 60
EVAL_EVERY = 20
KILLS = 10


def _args(workdir, data_dir):
  return ["--config=configs/lm_pysrc.py:smoke", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.data.name=python_source/small", f"--config.train.num_steps={NUM_STEPS}",
          "--config.train.checkpoint_every=5", "--config.train.checkpoint_every_secs=0.7",
          f"--config.train.eval_every={EVAL_EVERY}", "--config.train.keep_checkpoints=3",
          "--config.train.log_every=1"]


@pytest.mark.slow
def test_soak_many_kills_then_bitwise_equal(tmp_path):
  # Random on purpose (a new mix of faults each time); SOAK_SEED=N repeats a printed run.
  seed = int(os.environ.get("SOAK_SEED", int.from_bytes(os.urandom(4), "little")))
  rng = random.Random(seed)
  data_dir = str(tmp_path / "tfds")
  reference = str(tmp_path / "reference")
  proc = fh.run(_args(reference, data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]

  workdir = str(tmp_path / "soak")
  table = []
  for i in range(KILLS):
    start = max(fh.checkpoint_steps(workdir), default=0)
    if start >= NUM_STEPS - 3:
      break
    kinds = ["step", "save", "sigterm"] + (["eval"] if (start // EVAL_EVERY + 1) * EVAL_EVERY < NUM_STEPS else [])
    kind = rng.choice(kinds)
    faults = {"save": "slow_save=0:30", "eval": "slow_eval=30"}.get(kind, "")
    p = fh.Proc(_args(workdir, data_dir), workdir, faults=faults, log_name=f"soak_run{i}")
    target = min(start + rng.randint(1, 8), NUM_STEPS - 2)
    # metrics.jsonl may still hold the killed run's records past `start` until the new process has resumed (it
    # drops them before logging that it resumed), so progress counts only after that line.
    p.wait_for(lambda: "resumed from the checkpoint" in p.stderr() or "initialised a new run" in p.stderr(),
               "the resume")
    if kind == "save":
      p.wait_for(lambda: fh.unfinished_saves(workdir) and fh.last_train_step(workdir) > start, "a save in flight")
    elif kind == "eval":
      next_eval = (start // EVAL_EVERY + 1) * EVAL_EVERY
      p.wait_for(lambda: fh.last_train_step(workdir) >= next_eval, f"the evaluation at step {next_eval}")
    else:
      p.wait_for(lambda: fh.last_train_step(workdir) >= target, f"step {target}")
    reached = fh.last_train_step(workdir)
    if kind == "sigterm":
      p.signal(signal.SIGTERM)
      assert p.wait() == 0, p.stderr()[-3000:]
      reached = fh.last_train_step(workdir)  # The step in flight when the signal came was finished.
    else:
      p.kill()
    saved = max(fh.checkpoint_steps(workdir), default=0)
    table.append({"kill": i + 1, "fault": kind, "resumed_from": start, "step_reached": reached,
                  "newest_finalized_checkpoint": saved, "steps_lost": max(reached - saved, 0),
                  "unfinished_saves_left": len(fh.unfinished_saves(workdir))})
    assert saved <= reached + 1
    if kind == "sigterm":
      assert saved == reached and not fh.unfinished_saves(workdir)

  proc = fh.run(_args(workdir, data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not fh.unfinished_saves(workdir)
  fh.assert_same_run(workdir, reference)
  summary = {"seed": seed, "kills": table, "bitwise_equal_to_uninterrupted": True,
             "total_steps_lost": sum(r["steps_lost"] for r in table)}
  print(json.dumps(summary, indent=1))
  with open(os.path.join(str(tmp_path), "soak_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
