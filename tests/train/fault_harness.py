"""Runs real training processes for the fault-injection tests: start, watch progress, kill, resume, compare.

Progress is read from the workdir (metrics.jsonl with log_every=1, checkpoint directories), never from fixed
sleeps, so the kill points hold on a loaded machine; every wait has a generous deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 600.0  # Seconds any one process may take (a loaded 2-core machine is slow).

# The run every fault test uses, for each task: 16 steps, a checkpoint every 4 (all kept), evaluations at 8 and 16,
# the loss of every step in metrics.jsonl. Sizes are pinned (the tests name some shapes) so that retuning a smoke
# variant does not break them.
NUM_STEPS = 16
CHECKPOINT_EVERY = 4
TASKS = ("lm", "seq2seq", "classify")
# The fault tests' parametrisation: classification shares the LM's loop, checkpoint and data-iterator code, and its
# own exact resume is checked by tests/train/test_synthetic_train.py, so its fault runs are in `make test-slow`.
TASK_PARAMS = ("lm", "seq2seq", pytest.param("classify", marks=pytest.mark.slow))

_COMMON = [f"--config.train.num_steps={NUM_STEPS}", f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
           "--config.train.eval_every=8", "--config.train.keep_checkpoints=10", "--config.train.log_every=1"]
_TASK_ARGS = {
    "lm": ["--config=configs/lm_pysrc.py:smoke", "--config.data.name=python_source/small",
           "--config.model.d_model=64", "--config.model.num_layers=2", "--config.model.attention.num_heads=2",
           "--config.model.mlp_dim=128", "--config.model.max_len=64", "--config.data.seq_len=64",
           "--config.train.batch_size=8", "--config.sample.num_tokens=32"],
    # One curriculum length (one train-step program: compiling is most of such a run) and one evaluation batch.
    "seq2seq": ["--config=configs/seq2seq_numbers.py:smoke", "--config.data.name=numbers_to_words/small",
                "--config.seq2seq.max_digits=3", "--config.seq2seq.embed_dim=16", "--config.seq2seq.hidden=32",
                "--config.seq2seq.attention_dim=16", "--config.seq2seq.curriculum_warmup_steps=0",
                "--config.seq2seq.decode_max_len=32", "--config.train.batch_size=16",
                "--config.train.eval_batches=1"],
    # ListOps classification: a 2-layer attention stack with mean pooling over listops/small.
    "classify": ["--config=configs/synthetic.py:listops,smoke", "--config.data.name=listops/small",
                 "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.attention.num_heads=2",
                 "--config.model.mlp_dim=64", "--config.model.max_len=64", "--config.data.seq_len=64",
                 "--config.train.batch_size=16", "--config.train.eval_batches=1"],
}
# Seq2seq smoke steps take milliseconds: slowed down, its runs last long enough to be killed or preempted mid-run.
MID_RUN_FAULTS = {"lm": "", "seq2seq": "slow_step=0.15", "classify": "slow_step=0.15"}


def base_args(workdir: str, data_dir: str, task: str = "lm") -> list[str]:
  return [*_TASK_ARGS[task], f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *_COMMON]


def _env(faults: str = "", devices: int = 1) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("SEQJAX_FAULTS", None)
  if faults:
    env["SEQJAX_FAULTS"] = faults
  # The test session's fast-compile flags (tests/conftest.py), if any, and the number of devices.
  flags = [os.environ.get("SEQJAX_TEST_FAST_XLA_FLAGS", "")]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags).strip()
  if not env["XLA_FLAGS"]:
    env.pop("XLA_FLAGS")
  return env


def run(args: list[str], faults: str = "", devices: int = 1, timeout: float = TIMEOUT
        ) -> subprocess.CompletedProcess:
  """Runs `python -m seqjax.main ARGS` to completion."""
  return subprocess.run([sys.executable, "-m", "seqjax.main", *args], cwd=ROOT, env=_env(faults, devices),
                        capture_output=True, text=True, timeout=timeout, check=False)


class Proc:
  """A training process started in the background, with its stderr in a file (no pipe to fill up)."""

  def __init__(self, args: list[str], workdir: str, faults: str = "", log_name: str | None = None):
    self.workdir = workdir
    os.makedirs(workdir, exist_ok=True)
    self.err_path = os.path.join(os.path.dirname(workdir.rstrip("/")),
                                 (log_name or os.path.basename(workdir)) + ".stderr")
    self._err = open(self.err_path, "w", encoding="utf-8")
    self.popen = subprocess.Popen([sys.executable, "-m", "seqjax.main", *args], cwd=ROOT, env=_env(faults),
                                  stdout=subprocess.DEVNULL, stderr=self._err)

  def wait_for(self, condition, what: str, timeout: float = TIMEOUT, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
      if self.popen.poll() is not None:
        raise AssertionError(f"process exited ({self.popen.returncode}) before {what}:\n{self.stderr()[-3000:]}")
      if time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.stderr()[-3000:]}")
      time.sleep(interval)

  def signal(self, sig: int) -> None:
    self.popen.send_signal(sig)

  def kill(self) -> None:
    if self.popen.poll() is None:
      self.popen.send_signal(signal.SIGKILL)
    self.popen.wait(timeout=60)
    self._err.close()

  def wait(self, timeout: float = TIMEOUT) -> int:
    code = self.popen.wait(timeout=timeout)
    self._err.close()
    return code

  def stderr(self) -> str:
    with open(self.err_path, encoding="utf-8", errors="replace") as f:
      return f.read()


# ----------------------------------------------------------------------------------------------------------------
# Reading a workdir
# ----------------------------------------------------------------------------------------------------------------


def records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      with contextlib.suppress(ValueError):
        out.append(json.loads(line))
  return out


def train_losses(workdir: str) -> dict[int, float]:
  """step -> logged train loss; a later record of a step (after a resume) replaces an earlier one."""
  return {r["step"]: r["loss"] for r in records(workdir) if r["split"] == "train"}


def last_train_step(workdir: str) -> int:
  return max(train_losses(workdir), default=0)


def checkpoint_steps(workdir: str) -> list[int]:
  """Finalized checkpoints (temporary directories of unfinished saves are not checkpoints)."""
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def unfinished_saves(workdir: str) -> list[str]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(d for d in os.listdir(root) if ".orbax-checkpoint-tmp" in d) if os.path.isdir(root) else []


def final(workdir: str) -> dict:
  with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
    return json.load(f)


def assert_same_run(workdir: str, reference: str, steps=None) -> None:
  """Bitwise: the final state's fingerprint (params, optimizer state, step, rng) and every per-step loss."""
  got, want = train_losses(workdir), train_losses(reference)
  steps = sorted(want) if steps is None else list(steps)
  diff = [(s, got.get(s), want[s]) for s in steps if not _same(got.get(s), want[s])]
  assert not diff, f"per-step losses differ from the reference (step, got, want): {diff}"
  assert final(workdir)["state_sha256"] == final(reference)["state_sha256"], "final states differ bitwise"


def _same(a, b) -> bool:
  if a is None or b is None:
    return False
  return a == b or (math.isnan(a) and math.isnan(b))


def copy_workdir(src: str, dst: str) -> str:
  shutil.copytree(src, dst)
  return dst


@contextlib.contextmanager
def file_lock(path: str):
  """Serialises xdist workers that share one expensive result (the reference run)."""
  with open(path, "w", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
