"""Fault injection on real training processes: each fault, then a resume, compared with an uninterrupted run.

Every test runs `python -m seqjax.main` (a smoke config, 16 steps, a checkpoint every 4, the loss of every step
logged) in subprocesses and compares bitwise — the final state's SHA-256 (params, optimizer state, step, rng) and
every per-step loss — against one reference run per task shared by all tests (and all xdist workers, through a
file lock). The faults every task must survive (kill -9 and SIGTERM mid-run, a NaN rolled back, time-based saves)
are parametrised over the tasks of the one training loop (`fault_harness.TASKS`); the others run on the LM. The
fault table with outcomes is in docs/reliability.md; the long soak is tests/train/test_fault_soak.py.
"""

import json
import os
import random
import signal

import jax
import numpy as np
import pytest

from tests.train import fault_harness as fh


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def data_dir(shared_dir):
  return str(shared_dir / "fault_tfds")


@pytest.fixture(scope="session")
def references(shared_dir, data_dir):
  """task -> the workdir of its uninterrupted run (computed once per test session, by whichever worker asks
  first)."""

  def reference_of(task: str) -> str:
    workdir = str(shared_dir / f"fault_reference_{task}")
    with fh.file_lock(str(shared_dir / f"fault_reference_{task}.lock")):
      if not os.path.exists(os.path.join(workdir, "final_metrics.json")):
        proc = fh.run(fh.base_args(workdir, data_dir, task))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert fh.checkpoint_steps(workdir) == [4, 8, 12, 16]
    assert sorted(fh.train_losses(workdir)) == list(range(1, fh.NUM_STEPS + 1))
    return workdir

  return reference_of


@pytest.fixture(scope="session")
def reference(references):
  """The LM's uninterrupted run."""
  return references("lm")


def test_same_seed_is_bitwise_identical(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "again")
  proc = fh.run(fh.base_args(workdir, data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  fh.assert_same_run(workdir, reference)


# The kill-and-resume mechanism is the loop's, whatever the task: the LM runs it in `make test`; seq2seq (whose own
# exact resume `make test` still checks after a SIGTERM and a NaN rollback) and classify in `make test-slow`.
_LM_IN_MAKE_TEST = ("lm", pytest.param("seq2seq", marks=pytest.mark.slow),
                    pytest.param("classify", marks=pytest.mark.slow))


@pytest.mark.parametrize("task", _LM_IN_MAKE_TEST)
def test_sigkill_at_a_random_step_then_resume(references, data_dir, tmp_path, task):
  reference = references(task)
  # Seeded: the same step on every run of the test (lm: 7, seq2seq: 6); KILL_SEED=N in the environment draws others.
  kill_after = random.Random(f"{os.environ.get('KILL_SEED', '0')}/{task}").randint(2, 12)
  workdir = str(tmp_path / "killed")
  proc = fh.Proc(fh.base_args(workdir, data_dir, task), workdir, faults=fh.MID_RUN_FAULTS[task])
  proc.wait_for(lambda: fh.last_train_step(workdir) >= kill_after, f"step {kill_after}")
  proc.kill()
  reached = fh.last_train_step(workdir)
  assert reached < fh.NUM_STEPS, f"the run finished before the kill after step {kill_after}"
  saved = fh.checkpoint_steps(workdir)
  assert not saved or max(saved) <= reached + 1, (saved, reached)  # Nothing beyond what was computed.
  resumed = fh.run(fh.base_args(workdir, data_dir, task))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # Only the steps since the newest finalized checkpoint are lost (under load the step-4 save may still have been
  # in flight: then it is not a checkpoint, and the run restarts from the beginning).
  if saved:
    assert f"resumed from the checkpoint at step {max(saved)}" in resumed.stderr
  else:
    assert "initialised a new run" in resumed.stderr
  fh.assert_same_run(workdir, reference)


def test_sigkill_during_an_async_save_then_resume(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "killed_saving")
  # The save at step 8 commits in the background for a minute while training goes on.
  proc = fh.Proc(fh.base_args(workdir, data_dir), workdir, faults="slow_save=8:60")
  proc.wait_for(lambda: fh.unfinished_saves(workdir) and fh.last_train_step(workdir) >= 10,
                "steps 9-10 running while the step-8 save is in flight")
  proc.kill()
  assert fh.unfinished_saves(workdir), "the kill should have left the step-8 save unfinished"
  assert fh.checkpoint_steps(workdir) == [4], "an unfinished save must never be listed as a checkpoint"
  resumed = fh.run(fh.base_args(workdir, data_dir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "removed unfinished checkpoint saves" in resumed.stderr
  assert "resumed from the checkpoint at step 4" in resumed.stderr
  assert not fh.unfinished_saves(workdir)
  fh.assert_same_run(workdir, reference)


def test_sigkill_during_an_evaluation_then_resume(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "killed_evaluating")
  proc = fh.Proc(fh.base_args(workdir, data_dir), workdir, faults="slow_eval=60")
  # Step 8's loss is logged right before its evaluation starts (and sleeps); the step-4 save finishes meanwhile.
  proc.wait_for(lambda: fh.last_train_step(workdir) >= 8 and fh.checkpoint_steps(workdir) == [4],
                "the evaluation at step 8")
  proc.kill()
  assert fh.checkpoint_steps(workdir) == [4]
  resumed = fh.run(fh.base_args(workdir, data_dir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  fh.assert_same_run(workdir, reference)


@pytest.mark.parametrize("task", fh.TASK_PARAMS)
def test_sigterm_finishes_the_step_saves_and_exits_0(references, data_dir, tmp_path, task):
  reference = references(task)
  workdir = str(tmp_path / "preempted")
  proc = fh.Proc(fh.base_args(workdir, data_dir, task), workdir, faults=fh.MID_RUN_FAULTS[task])
  proc.wait_for(lambda: fh.last_train_step(workdir) >= 5, "step 5")
  proc.signal(signal.SIGTERM)
  assert proc.wait() == 0, proc.stderr()[-3000:]
  stopped = max(fh.checkpoint_steps(workdir))
  assert 5 <= stopped < fh.NUM_STEPS, "expected a preemption save before the end"
  assert stopped == fh.last_train_step(workdir), "the preemption save must hold the last finished step"
  assert not fh.unfinished_saves(workdir), "the save must be complete before exiting"
  resumed = fh.run(fh.base_args(workdir, data_dir, task))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from the checkpoint at step {stopped}" in resumed.stderr
  fh.assert_same_run(workdir, reference)


@pytest.mark.parametrize("task", _LM_IN_MAKE_TEST)
def test_time_based_checkpoints(references, data_dir, tmp_path, task):
  """train.checkpoint_every_secs saves by wall time (here: none by step count but the last; steps of at least 0.05 s,
  saves every 0.12 s); saving never changes the state, so the run is still bitwise the reference."""
  workdir = str(tmp_path / "timed")
  proc = fh.run(fh.base_args(workdir, data_dir, task) + ["--config.train.checkpoint_every=1000",
                                                         "--config.train.checkpoint_every_secs=0.12"],
                faults="slow_step=0.05")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = fh.checkpoint_steps(workdir)
  assert len([s for s in saved if s < fh.NUM_STEPS]) >= 3, saved
  fh.assert_same_run(workdir, references(task))


# ----------------------------------------------------------------------------------------------------------------
# Corrupt checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _truncate_largest_file(step_dir: str) -> None:
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  largest = max(files, key=os.path.getsize)
  size = os.path.getsize(largest)
  with open(largest, "r+b") as f:
    f.truncate(size // 2)


def _remove_data_item(step_dir: str) -> None:
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(os.path.join(step_dir, "data"))


def _replace_with_other_config(step_dir: str) -> None:
  """Writes, as this step, the checkpoint of a model with d_model=32 instead of 64."""
  import shutil  # pylint: disable=import-outside-toplevel
  from seqjax.config import from_config_dict, with_vocab_size  # pylint: disable=import-outside-toplevel
  from seqjax.models.lm import DecoderLM  # pylint: disable=import-outside-toplevel
  from seqjax.train import sharding  # pylint: disable=import-outside-toplevel
  from seqjax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from seqjax.train.optim import make_optimizer  # pylint: disable=import-outside-toplevel
  from seqjax.train.state import create_train_state  # pylint: disable=import-outside-toplevel
  import configs.lm_pysrc  # pylint: disable=import-outside-toplevel

  cfg = configs.lm_pysrc.get_config("smoke")
  cfg.model.d_model = 32
  config = with_vocab_size(from_config_dict(cfg), 259)  # The byte tokenizer's.
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = DecoderLM(config.model)
  optimizer = make_optimizer(config.optim, config.train.num_steps)
  state, _ = create_train_state(model, optimizer, seq_len=config.data.seq_len, seed=0, mesh=mesh)
  step = int(os.path.basename(step_dir))
  shutil.rmtree(step_dir)
  ckpt = Checkpointer(os.path.dirname(step_dir), keep=10)
  ckpt.save(step, state, {"position": 0})
  ckpt.close()


@pytest.mark.parametrize("corrupt, reason", [
    (_truncate_largest_file, "Encountered error while reading array"),
    (_remove_data_item, "item(s) data missing"),
    (_replace_with_other_config, "embed/embedding (259, 32) in the checkpoint vs (259, 64) in this config"),
], ids=["truncated_file", "missing_item", "other_config_shapes"])
def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(reference, data_dir, tmp_path, corrupt, reason):
  workdir = fh.copy_workdir(reference, str(tmp_path / "corrupt"))
  newest = os.path.join(workdir, "checkpoints", str(fh.NUM_STEPS))
  corrupt(newest)
  proc = fh.run(fh.base_args(workdir, data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"checkpoint at step {fh.NUM_STEPS} could not be restored and is left in place" in proc.stderr
  assert reason in proc.stderr, proc.stderr[-3000:]
  assert f"resumed from the checkpoint at step {fh.NUM_STEPS - fh.CHECKPOINT_EVERY}" in proc.stderr
  # Kept for inspection: in place until the run saved this step again, then renamed beside it.
  assert os.path.isdir(newest + ".unreadable"), os.listdir(os.path.dirname(newest))
  assert "renamed to" in proc.stderr
  fh.assert_same_run(workdir, reference)


def test_another_configs_workdir_is_refused_and_shapes_are_named(reference, data_dir, tmp_path):
  workdir = fh.copy_workdir(reference, str(tmp_path / "other"))
  refused = fh.run(fh.base_args(workdir, data_dir) + ["--config.model.mlp_dim=256"], timeout=120)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert "holds a run of another config (config.model.mlp_dim: 128 -> 256)" in refused.stderr
  assert "allow_config_change" in refused.stderr and "Traceback" not in refused.stderr
  allowed = fh.run(fh.base_args(workdir, data_dir) + ["--config.model.mlp_dim=256",
                                                      "--config.train.allow_config_change=True"])
  assert allowed.returncode == 2, allowed.stderr[-3000:]
  assert "Traceback" not in allowed.stderr
  message = allowed.stderr.split("error: ", 1)[1]
  assert "no checkpoint under" in message and "step 16, 12, 8, 4: its parameters do not match" in message
  assert "layer_0/mlp/wi/kernel (64, 128) in the checkpoint vs (64, 256) in this config" in message
  assert fh.checkpoint_steps(workdir) == [4, 8, 12, 16], "unreadable checkpoints must be left in place"
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert '"mlp_dim": 128' in f.read(), "a failed resume must not replace the workdir's config"


def test_resumable_changes_are_accepted(reference, data_dir, tmp_path):
  """A longer run with other logging/eval cadence continues the same run (no refusal, no retraining)."""
  workdir = fh.copy_workdir(reference, str(tmp_path / "longer"))
  proc = fh.run(fh.base_args(workdir, data_dir) + ["--config.train.num_steps=18", "--config.train.log_every=2",
                                                   "--config.train.eval_every=9"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from the checkpoint at step 16" in proc.stderr
  assert fh.final(workdir)["step"] == 18
  assert os.path.exists(os.path.join(workdir, "config_changes.jsonl"))


# ----------------------------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------------------------

NAN_STEP = 6


def test_nan_stop_writes_a_report_and_resumes_exactly(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "nan_stop")
  proc = fh.run(fh.base_args(workdir, data_dir), faults=f"nan_at={NAN_STEP}")
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert f"non-finite loss or gradients at step {NAN_STEP}" in proc.stderr
  report = json.load(open(os.path.join(workdir, "nonfinite_report.json"), encoding="utf-8"))
  assert report["step"] == NAN_STEP and report["loss"] == "nan" and report["last_checkpoint"] == 4
  assert "layer_0/mlp/wi/kernel" in report["nonfinite_gradients"]
  assert report["batch"]["nonfinite_inputs"] == ["weights"]
  saved = np.load(report["batch"]["file"])
  assert np.isnan(saved["weights"]).all() and saved["inputs"].shape == (8, 64)
  # The iterator position in the report reproduces the offending batch (before the injected NaN).
  from seqjax.data.pipeline import make_lm_data  # pylint: disable=import-outside-toplevel
  data = make_lm_data(name="python_source/small", data_dir=data_dir, seq_len=64, batch_size=8, seed=0,
                      process_index=0, process_count=1)
  it = data.train_iterator()
  it.set_state(report["batch"]["iterator_state_before"])
  np.testing.assert_array_equal(next(it)["inputs"], saved["inputs"])
  assert fh.checkpoint_steps(workdir) == [4], "no state after the non-finite step may be saved"
  resumed = fh.run(fh.base_args(workdir, data_dir))  # The fault is gone: the run continues exactly.
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  fh.assert_same_run(workdir, reference)


@pytest.fixture(scope="module")
def nan_skip_runs(references, data_dir, tmp_path_factory):
  """task -> the workdir of a run with a NaN at step NAN_STEP and on_nan="skip" (computed once per module)."""
  runs = {}

  def skip_run_of(task: str) -> str:
    if task not in runs:
      references(task)  # Built first: the runs share the data directory.
      workdir = str(tmp_path_factory.mktemp("nan") / f"skip_{task}")
      proc = fh.run(fh.base_args(workdir, data_dir, task) + ["--config.train.on_nan=skip"],
                    faults=f"nan_at={NAN_STEP}")
      assert proc.returncode == 0, proc.stderr[-3000:]
      runs[task] = workdir
    return runs[task]

  return skip_run_of


def test_nan_skip_drops_the_update_and_counts_it(reference, nan_skip_runs):
  nan_skip_run = nan_skip_runs("lm")
  assert fh.final(nan_skip_run)["skipped_steps"] == 1
  losses, ref = fh.train_losses(nan_skip_run), fh.train_losses(reference)
  assert [losses[s] for s in range(1, NAN_STEP)] == [ref[s] for s in range(1, NAN_STEP)]
  assert np.isnan(losses[NAN_STEP])
  assert all(np.isfinite(losses[s]) for s in range(NAN_STEP + 1, fh.NUM_STEPS + 1))


@pytest.mark.parametrize("task", fh.TASK_PARAMS)
def test_nan_rollback_reloads_and_skips_the_batch(references, data_dir, nan_skip_runs, tmp_path, task):
  workdir = str(tmp_path / "nan_rollback")
  proc = fh.run(fh.base_args(workdir, data_dir, task) + ["--config.train.on_nan=rollback"],
                faults=f"nan_at={NAN_STEP}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"step {NAN_STEP}: non-finite loss or gradients; rolled back to the checkpoint at step 4" in proc.stderr
  assert fh.final(workdir)["skipped_steps"] == 1
  ref = fh.train_losses(references(task))
  assert [fh.train_losses(workdir)[s] for s in range(1, NAN_STEP)] == [ref[s] for s in range(1, NAN_STEP)]
  # Reloading step 4, replaying 5 and skipping step 6's batch is exactly what dropping step 6's update does.
  fh.assert_same_run(workdir, nan_skip_runs(task))
  assert sorted(fh.train_losses(workdir)) == list(range(1, fh.NUM_STEPS + 1)), "replayed steps logged twice"


# ----------------------------------------------------------------------------------------------------------------
# Parallelism
# ----------------------------------------------------------------------------------------------------------------


def test_8_simulated_devices_match_1_device(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "devices8")
  proc = fh.run(fh.base_args(workdir, data_dir), devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got, want = fh.train_losses(workdir), fh.train_losses(reference)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-4)
  np.testing.assert_allclose(fh.final(workdir)["loss"], fh.final(reference)["loss"], rtol=1e-4)
