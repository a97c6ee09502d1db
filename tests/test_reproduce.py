"""experiments/reproduce.py: each study's grid (commands validated, reductions stated), the report (table, JSON, plot)
from runs' files, and (slow) one study end to end at smoke scale through real seqjax.main processes, resumed as a
no-op."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.experiments_loader import load_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rp():
  with load_experiment("reproduce") as module:
    yield module


def _commands(rp, name, scale, tmp_path, **kw):
  lines = []
  assert rp.reproduce(rp.make_study(name, scale, **kw), str(tmp_path), print_commands=True, echo=lines.append) == 0
  return [shlex.split(line) for line in lines]


@pytest.mark.parametrize("name, scale, count", [
    ("selective_copying", "cpu", 3), ("induction_heads", "cpu", 6), ("listops", "cpu", 3), ("mqar", "cpu", 54),
    ("selective_copying", "paper", 3), ("induction_heads", "paper", 6), ("listops", "paper", 3),
    ("mqar", "paper", 225), ("mqar", "smoke", 45)])
def test_each_study_plans_its_grid(rp, tmp_path, name, scale, count):
  """The issue's grids (MQAR with --settings=all: 3 settings x 3 widths x 5 mixers, attention at 2 learning rates
  at cpu scale and every mixer at 5 at paper scale); every command's config is validated by the sweep's planner (it raises otherwise); the cpu scale names
  what it reduced."""
  commands = _commands(rp, name, scale, tmp_path, **({"settings": ("all",)} if name == "mqar" else {}))
  assert len(commands) == count
  assert all(c[1:3] == ["-m", "seqjax.main"] for c in commands)
  study = rp.make_study(name, scale)
  assert study.reductions and study.published
  if scale == "cpu":
    assert "steps" in study.reductions and "width" in study.reductions


def test_induction_heads_trains_at_one_length_and_evaluates_to_16x(rp, tmp_path):
  commands = _commands(rp, "induction_heads", "cpu", tmp_path)
  train, evals = commands[0::2], commands[1::2]
  models = {(a.split("=")[-1], b.split("=")[-1]) for c in train for a in c if a.startswith("--config.model.mixer=")
            for b in c if b.startswith("--config.model.positions=")}
  assert models == {("mamba", "none"), ("attention", "rope"), ("attention", "learned")}
  assert all("--config.data.name=induction_heads/len64" in c and "--config.model.max_len=1024" in c for c in train)
  for t, e in zip(train, evals):
    assert e[:len(t)] == t and "--mode=eval" in e
    assert "--config.data.eval_splits=validation,test_len128,test_len256,test_len512,test_len1024" in e


def test_mqar_cells_set_width_and_setting(rp, tmp_path):
  commands = _commands(rp, "mqar", "cpu", tmp_path, settings=("len256_pairs16",))
  assert len(commands) == 18
  cells = {(a, b) for c in commands for a in c if a.startswith("--config.model.d_model=")
           for b in c if b.startswith("--config.model.mlp_dim=")}
  assert cells == {(f"--config.model.d_model={w}", f"--config.model.mlp_dim={2 * w}") for w in (32, 64, 128)}
  assert all("--config.data.name=mqar/len256_pairs16_v512" in c and "--config.data.seq_len=256" in c
             and "--config.train.stop_when=answer_accuracy>=0.99" in c for c in commands)
  # 4,096 tokens a step at every setting, and 512 examples an evaluation.
  assert all("--config.train.batch_size=16" in c and "--config.train.eval_batches=32" in c for c in commands)
  short = _commands(rp, "mqar", "cpu", tmp_path, settings=("len64_pairs4",))
  assert all("--config.train.batch_size=64" in c and "--config.train.eval_batches=8" in c for c in short)
  paper = _commands(rp, "mqar", "paper", tmp_path, settings=("len256_pairs16",))
  assert all("--config.data.name=mqar/len256_pairs16" in c for c in paper)  # The paper's vocabulary of 8,192.


def test_bad_study_scale_or_setting_is_refused(rp):
  with pytest.raises(rp.sweep_lib.SweepError, match="unknown study 'copy'.*selective_copying"):
    rp.make_study("copy")
  with pytest.raises(rp.sweep_lib.SweepError, match="--scale='gpu'.*cpu, paper, smoke"):
    rp.make_study("listops", "gpu")
  with pytest.raises(rp.sweep_lib.SweepError, match="len64_pairs8.*len64_pairs4"):
    rp.make_study("mqar", settings=("len64_pairs8",))
  assert rp.main(["mqar", "--settings=len1_pairs1", "--print_commands"]) == 2
  with pytest.raises(rp.sweep_lib.SweepError, match="--widths='12'.*multiples of 8.*32,64,128"):
    rp.make_study("mqar", widths=(12,))
  assert rp.main(["mqar", "--widths=64,wide", "--print_commands"]) == 2


def test_mqar_runs_zoologys_first_setting_unless_told(rp, tmp_path, capsys):
  """The default command is the (64, 4) figure (18 runs, under an hour here); --settings=all is the whole one."""
  assert rp.main(["mqar", "--print_commands", f"--results_dir={tmp_path}"]) == 0
  commands = capsys.readouterr().out.splitlines()
  assert len(commands) == 18 and all("--config.data.name=mqar/len64_pairs4_v512" in c for c in commands)
  assert rp.main(["mqar", "--settings=all", "--print_commands", f"--results_dir={tmp_path}"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 54


class _FakeRun:
  """A launched run that ends at once (a Popen's poll / wait): finished, or failed where `fail` says so."""

  def __init__(self, run, started, fail=()):
    parts = run.workdir.split(os.sep)
    started.append("/".join(parts[max(i for i, p in enumerate(parts) if p.startswith("width")):]))  # width.../run
    self.run, self.code = run, int(started[-1] in fail)

  def poll(self):
    if not self.code:
      _finish(self.run, {"answer_accuracy": 0.5})
    return self.code

  wait = poll


def test_study_runs_share_one_queue_costliest_first(rp, tmp_path):
  """Every part's runs go through one queue, widest and slowest mixer first (a 2-core machine does not end the
  study on one long run), and each part still gets its sweep files and the study its table."""
  study = rp.make_study("mqar", settings=("len64_pairs4",))
  started = []
  assert rp.reproduce(study, str(tmp_path), parallel=2, launch=lambda run: _FakeRun(run, started),
                      echo=lambda line: None) == 0
  assert len(started) == len(set(started)) == 18
  assert started[:3] == ["width128/model.mixer=mamba", "width128/model.mixer=mamba2", "width64/model.mixer=mamba"]
  assert started[-1] == "width32/model.mixer=s4d"
  for part in study.parts:
    assert (tmp_path / "mqar" / part.name / "sweep.csv").exists()
  assert "18/18 runs finished" in (tmp_path / "mqar" / "table.md").read_text()


def test_a_failed_run_fails_the_study_though_its_point_finished_at_other_widths(rp, tmp_path):
  study = rp.make_study("mqar", settings=("len64_pairs4",))
  lines, started = [], []
  assert rp.reproduce(study, str(tmp_path), parallel=2, echo=lines.append,
                      launch=lambda run: _FakeRun(run, started, fail=("width128/model.mixer=mamba",))) == 1
  assert any(line.startswith("[sweep] len64_pairs4/width128/model.mixer=mamba: failed") for line in lines)
  assert "17/18 runs finished" in (tmp_path / "mqar" / "table.md").read_text()


def test_mqar_mixers_and_learning_rate_pick_rows_and_rate(rp, tmp_path, capsys):
  """One row of the figure at another rate (docs/research.md: attention at 1e-2), the rate named in the table."""
  assert rp.main(["mqar", "--settings=all", "--mixers=attention", "--learning_rate=0.01", "--print_commands",
                  f"--results_dir={tmp_path}"]) == 0
  commands = capsys.readouterr().out.splitlines()
  assert len(commands) == 9 and all("--config.model.mixer=attention" in c for c in commands)
  assert all("--config.optim.learning_rate=0.01 " in c and "_lr0.01/model.mixer=attention" in c for c in commands)
  assert "one learning rate (0.01," in rp.make_study("mqar", learning_rate=0.01).reductions
  default = [" ".join(c) for c in _commands(rp, "mqar", "cpu", tmp_path)]
  # By default attention trains at both of its rates (each cell keeps the better), the other mixers at 3e-3.
  rates = sorted((c.split("--config.model.mixer=")[1].split()[0], c.split("--config.optim.learning_rate=")[-1].split()[0])
                 for c in default if "width64" in c)
  assert rates == [("attention", "0.003"), ("attention", "0.01"), ("lstm", "0.003"), ("mamba", "0.003"),
                   ("mamba2", "0.003"), ("s4d", "0.003")]
  assert "attention: the better of 0.003 and 0.01 per cell" in rp.make_study("mqar").reductions
  with pytest.raises(rp.sweep_lib.SweepError, match="--mixers='gru'.*attention, mamba"):
    rp.make_study("mqar", mixers=("gru",))
  assert rp.main(["mqar", "--learning_rate=-1", "--print_commands"]) == 2
  with pytest.raises(rp.sweep_lib.SweepError, match="--learning_rate sets the cpu scale's one rate"):
    rp.make_study("mqar", "paper", learning_rate=0.01)


def test_mqar_widths_pick_columns(rp, tmp_path, capsys):
  assert rp.main(["mqar", "--settings=len128_pairs8", "--widths=64", "--print_commands",
                  f"--results_dir={tmp_path}"]) == 0
  commands = capsys.readouterr().out.splitlines()
  assert len(commands) == 6 and all("--config.model.d_model=64" in c and "width64" in c for c in commands)


def _finish(run, metrics, splits=None):
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
    json.dump({"step": 500, **metrics}, f)
  if splits:
    with open(os.path.join(run.workdir, "eval_splits.json"), "w", encoding="utf-8") as f:
      json.dump({"step": 500, "splits": {s: {"answer_accuracy": a} for s, a in splits.items()}}, f)


def test_report_tables_every_length_and_marks_runs_not_done(rp, tmp_path):
  """Induction heads from hand-written run files: one row per model with each length's accuracy, a run without
  results shown as missing and counted, the JSON holding every run's command, a PNG."""
  study = rp.make_study("induction_heads")
  runs = {r.name: r for p in study.parts for r in rp.part_runs(study, p, str(tmp_path))}
  lengths = study.eval_splits
  _finish(runs["model.mixer=mamba"], {"answer_accuracy": 0.99},
          dict(zip(lengths, (0.99, 0.98, 0.97, 0.96, 0.955))))
  _finish(runs["model.positions=rope"], {"answer_accuracy": 1.0}, dict(zip(lengths, (1.0, 0.5, 0.2, 0.1, 0.07))))
  table, results, png = rp.write_report(study, str(tmp_path))
  text = open(table, encoding="utf-8").read()
  assert "| mamba | 99.0% | 98.0% | 97.0% | 96.0% | 95.5% |" in text
  assert "| attention (rope positions) | 100.0% | 50.0% | 20.0% | 10.0% | 7.0% |" in text
  assert "| attention (learned positions) | — | — | — | — | — |" in text
  assert "2/3 runs finished" in text and study.reductions in text
  assert "Not finished: attention (learned positions) (not run yet)." in text
  records = json.load(open(results, encoding="utf-8"))["runs"]
  assert [r["status"] for r in records] == ["finished", "finished", "missing"]
  assert all(r["command"].split()[1:3] == ["-m", "seqjax.main"] for r in records)
  assert Image.open(png).size == (650, 400)


def test_mqar_report_pivots_mixers_by_width(rp, tmp_path):
  """One row per mixer, one column per width; attention's cells take the better of its rates and name it.
  Catches: both rates' runs shown, the worse one kept."""
  study = rp.make_study("mqar", settings=("len64_pairs4",))
  for part in study.parts:
    width = dict(part.labels)["width"]
    for run in rp.part_runs(study, part, str(tmp_path)):
      values = dict(run.values)
      if width in ("32", "64") and values["model.mixer"] == "mamba":
        _finish(run, {"answer_accuracy": 0.5})
      if width in ("32", "64") and values["model.mixer"] == "attention":
        _finish(run, {"answer_accuracy": {"0.003": 0.995, "0.01": 0.4}[values["optim.learning_rate"]]
                      if width == "64" else {"0.003": 0.2, "0.01": 0.45}[values["optim.learning_rate"]]})
  table, _, png = rp.write_report(study, str(tmp_path))
  text = open(table, encoding="utf-8").read()
  assert "| attention | 45.0% (0.01) | 99.5% (0.003) | — |" in text and "| mamba | 50.0% | 50.0% | — |" in text
  assert "| lstm | — | — | — |" in text and "6/18 runs finished" in text
  assert Image.open(png).size == (450, 400)


@pytest.mark.slow
def test_induction_heads_end_to_end_at_smoke_scale(tmp_path):
  """The command itself (smoke scale): three training runs through seqjax.sweep, each evaluated on every longer
  split in one --mode=eval process, the table filled; a second call runs nothing (finished runs and evaluations
  are skipped) and rewrites the same table."""
  cmd = [sys.executable, "experiments/reproduce.py", "induction_heads", "--scale=smoke",
         f"--results_dir={tmp_path}"]
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert first.returncode == 0, first.stdout + first.stderr
  table = (tmp_path / "induction_heads" / "table.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| mamba") or line.startswith("| attention")]
  assert len(rows) == 3 and "—" not in "".join(rows)
  for row in rows:
    values = [float(v.strip(" %")) for v in row.split("|")[2:-1]]
    assert len(values) == 3 and all(0 <= v <= 100 for v in values) and np.isfinite(values).all()
  second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert second.returncode == 0 and "starting" not in second.stdout and "evaluating" not in second.stdout
  assert second.stdout.count("finished before, skipped") == 3
  assert (tmp_path / "induction_heads" / "table.md").read_text() == table
