"""The sweep tool: grid parsing and its errors, every point validated before anything runs, finished runs skipped,
interrupted and failed ones started again with the same command, the CSV / best-of / plot report. The runs
themselves are faked here (a launcher that writes final_metrics.json); one real sweep with a kill is a slow test."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from seqjax import sweep
from seqjax.sweep import SweepError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic.py") + ":mqar,smoke"


def test_parse_grid():
  assert sweep.parse_grid("model.mixer=attention,mamba; optim.learning_rate=1e-3") == [
      ("model.mixer", ["attention", "mamba"]), ("optim.learning_rate", ["1e-3"])]
  assert sweep.parse_grid("config.model.mixer=attention|mamba,mamba,attention") == [
      ("model.mixer", ["attention", "mamba,mamba,attention"])]


@pytest.mark.parametrize("text, message", [
    ("", r"--grid is empty"),
    (" ; ", r"--grid has no terms"),
    ("model.mixer", r"--grid term 'model.mixer' has no KEY=VALUES"),
    ("=a,b", r"--grid term '=a,b' has no KEY=VALUES"),
    ("model.mixer=attention,", r"--grid term 'model.mixer=attention,' has an empty value"),
    ("model.mixer=", r"has an empty value"),
    ("model.d_model=64,64", r"repeats a value"),
    ("model.d_model=64;model.d_model=128", r"--grid names 'model.d_model' twice"),
])
def test_grid_errors_are_clear(text, message):
  with pytest.raises(SweepError, match=message):
    sweep.parse_grid(text)


def test_every_point_is_validated_before_anything_runs(tmp_path):
  grid = sweep.parse_grid("model.mixer=attention,mamba;model.d_model=32,64")
  runs = sweep.plan(CONFIG, str(tmp_path), grid, ["train.num_steps=3"])
  assert [r.name for r in runs] == ["model.mixer=attention,model.d_model=32", "model.mixer=attention,model.d_model=64",
                                    "model.mixer=mamba,model.d_model=32", "model.mixer=mamba,model.d_model=64"]
  assert runs[1].command[-3:] == ("--config.train.num_steps=3", "--config.model.mixer=attention",
                                  "--config.model.d_model=64")
  assert runs[1].workdir == os.path.join(str(tmp_path), runs[1].name)
  for grid_text, message in [
      ("model.d_modle=32", r"'model.d_modle' is not a config field; did you mean 'model.d_model'\?"),
      ("model.d_model=32,63", r"run model.d_model=63: config.model.attention.num_heads: 2 heads do not divide"),
      ("model.d_model=3.5", r"model.d_model='3.5': expected an integer"),
      ("optim.learning_rate=fast", r"optim.learning_rate='fast': expected a number"),
  ]:
    with pytest.raises(SweepError, match=message):
      sweep.plan(CONFIG, str(tmp_path), sweep.parse_grid(grid_text))
  with pytest.raises(SweepError, match="--set 'train.num_steps': write it as KEY=VALUE"):
    sweep.plan(CONFIG, str(tmp_path), grid, ["train.num_steps"])


class _FakeRun:
  """A launched run that finishes at once: writes final_metrics.json (unless it is to fail) and exits."""

  def __init__(self, run, metrics, fail):
    os.makedirs(run.workdir, exist_ok=True)
    self.code = 1 if fail else 0
    if not fail:
      with open(os.path.join(run.workdir, sweep.FINAL), "w", encoding="utf-8") as f:
        json.dump({"step": 4, **metrics(run)}, f)

  def poll(self):
    return self.code

  def wait(self):
    return self.code


def test_skips_finished_runs_and_restarts_the_others(tmp_path):
  """Catches: rerunning finished runs, forgetting failed or interrupted ones, a different command on the rerun."""
  launched, failing = [], {"model.mixer=mamba,optim.learning_rate=3e-3"}
  lr = lambda run: float(dict(run.values)["optim.learning_rate"])  # noqa: E731
  def metrics(run):
    return {"answer_accuracy": lr(run) * (2 if "attention" in run.name else 1), "loss": 1 / lr(run)}

  def launch(run):
    launched.append(run.command)
    return _FakeRun(run, metrics, run.name in failing)

  grid = "model.mixer=attention,mamba;optim.learning_rate=1e-3,3e-3"
  status = sweep.sweep(CONFIG, str(tmp_path), grid, launch=launch, echo=lambda s: None,
                       best_over="optim.learning_rate")
  assert status == 1 and len(launched) == 4
  with open(tmp_path / "sweep.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [r["status"] for r in rows] == ["finished", "finished", "finished", "started"]
  assert rows[0]["model.mixer"] == "attention" and float(rows[1]["answer_accuracy"]) == pytest.approx(0.006)
  with open(tmp_path / "sweep_best.csv", encoding="utf-8") as f:
    best = {r["model.mixer"]: r["optim.learning_rate"] for r in csv.DictReader(f)}
  assert best == {"attention": "3e-3", "mamba": "1e-3"}  # mamba's 3e-3 run failed.
  assert os.path.getsize(tmp_path / "sweep.png") > 0

  # An interrupted run (checkpoints, no final metrics) is started again with the same command; nothing else runs.
  os.makedirs(tmp_path / "model.mixer=mamba,optim.learning_rate=3e-3" / "checkpoints", exist_ok=True)
  first_commands = list(launched)
  launched.clear()
  failing.clear()
  messages = []
  assert sweep.sweep(CONFIG, str(tmp_path), grid, launch=launch, echo=messages.append) == 0
  assert launched == [first_commands[3]]
  assert sum("finished before, skipped" in m for m in messages) == 3
  assert any("model.mixer=mamba,optim.learning_rate=3e-3: resuming" in m for m in messages)
  assert sweep.sweep(CONFIG, str(tmp_path), grid, launch=launch, echo=lambda s: None) == 0
  assert len(launched) == 1  # Everything finished: the third sweep runs nothing.


class _SlowRun(_FakeRun):
  """A run that is still going for its first `polls` polls."""

  def __init__(self, run, live, polls=3):
    super().__init__(run, lambda r: {"loss": 1.0}, fail=False)
    self.name, self.live, self.polls = run.name, live, polls
    live.add(run.name)

  def poll(self):
    self.polls -= 1
    if self.polls > 0:
      return None
    self.live.discard(self.name)
    return 0


def test_parallel_runs_at_most_n_at_a_time(tmp_path):
  """--parallel 2: two runs going at once, never three; each started when one ends."""
  live, most = set(), []

  def launch(run):
    proc = _SlowRun(run, live)
    most.append(len(live))
    return proc

  status = sweep.execute(sweep.plan(CONFIG, str(tmp_path), sweep.parse_grid("model.d_model=16,32,48,64")), 2,
                         launch, echo=lambda s: None)
  assert list(status.values()) == ["finished"] * 4 and max(most) == 2
  with pytest.raises(SweepError, match="--parallel must be >= 1"):
    sweep.execute([], 0)


def test_best_over_must_be_a_grid_key_and_lower_is_better_for_losses(tmp_path):
  with pytest.raises(SweepError, match=r"--best_over='optim.b1' is not a grid key; grid keys: model.mixer"):
    sweep.sweep(CONFIG, str(tmp_path), "model.mixer=attention", best_over="optim.b1", launch=None)
  rows = [{"a": "x", "b": "1", "status": "finished", "loss": 2.0}, {"a": "x", "b": "2", "status": "finished",
                                                                     "loss": 1.0}]
  assert sweep.best_rows(rows, ["a", "b"], "b", "loss") == [rows[1]]


def test_print_commands_runs_nothing(tmp_path, capsys):
  assert sweep.sweep(CONFIG, str(tmp_path / "s"), "model.d_model=32,64", print_commands=True, launch=None) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2 and all("-m seqjax.main" in line and "--config.model.d_model=" in line for line in lines)
  assert not os.path.exists(tmp_path / "s")


@pytest.mark.slow
def test_real_sweep_resumes_after_a_kill(tmp_path):
  """A real two-run sweep killed (SIGKILL to its process group, steps slowed by fault injection) after the first
  run's first checkpoint; the rerun
  resumes that run from its checkpoint, runs the second, and writes the CSV."""
  args = [sys.executable, "-m", "seqjax.sweep", f"--config={CONFIG}", f"--workdir={tmp_path}",
          "--grid=model.d_model=32,64", "--set=train.num_steps=12", f"--set=data.data_dir={tmp_path / 'tfds'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", SEQJAX_FAULTS="slow_step=0.5")  # Steps slow enough to be killed.
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt = tmp_path / "model.d_model=32" / "checkpoints" / "6"
  deadline = time.monotonic() + 600
  while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
    time.sleep(0.2)
  assert ckpt.exists()
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "model.d_model=32" / sweep.FINAL).exists()
  done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  with open(tmp_path / "model.d_model=32" / "sweep_run.log", encoding="utf-8") as f:
    assert "resumed from the checkpoint at step 6" in f.read()
  with open(tmp_path / "sweep.csv", encoding="utf-8") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["finished", "finished"]


def test_runs_start_with_the_malloc_tunables_unless_set(tmp_path, monkeypatch):
  """A run's process gets `MALLOC_TUNABLES` in GLIBC_TUNABLES (XLA:CPU's per-step buffers keep their pages), and
  a GLIBC_TUNABLES the user set is passed through untouched. Catches: the launcher dropping the environment, or
  overriding the user's."""
  probe = (sys.executable, "-c", "import os; print(os.environ.get('GLIBC_TUNABLES'), os.environ.get('PROBE'))")
  monkeypatch.setenv("PROBE", "kept")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  runs = [sweep.Run((), name, str(tmp_path / name), probe) for name in ("default", "user")]
  assert sweep.start_run(runs[0]).wait() == 0
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  assert sweep.start_run(runs[1]).wait() == 0
  logs = [(tmp_path / name / "sweep_run.log").read_text().split() for name in ("default", "user")]
  assert logs == [[sweep.MALLOC_TUNABLES, "kept"], ["glibc.malloc.arena_max=2", "kept"]]
