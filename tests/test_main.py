"""The command line end to end on the smoke variant: train, resume, eval, generate, and user errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "seqjax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("smoke")
  workdir, data_dir = str(tmp / "work"), str(tmp / "tfds")
  common = ["--config=configs/lm_pysrc.py:smoke", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.data.name=python_source/small"]
  proc = _run(*common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return common, workdir, proc


def test_train_writes_everything(smoke_run):
  _, workdir, _ = smoke_run
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert final["step"] == 20
  assert {"loss", "bits_per_byte", "perplexity", "accuracy"} <= set(final)
  assert 0 < final["bits_per_byte"] < 9
  assert os.path.exists(os.path.join(workdir, "curves.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["split"] for r in records} == {"train", "eval"}
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [10, 20]


def test_eval_and_generate_from_checkpoint(smoke_run):
  common, _, _ = smoke_run
  proc = _run(*common, "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)["step"] == 20
  proc = _run(*common, "--mode=generate", "--config.sample.prompt=import ", "--config.sample.num_tokens=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- sample 0 ---\nimport " in proc.stdout


def test_longer_run_resumes_from_the_workdir(smoke_run):
  common, workdir, _ = smoke_run
  proc = _run(*common, "--config.train.num_steps=30")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.load(open(os.path.join(workdir, "final_metrics.json")))["step"] == 30
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps)), "resumed run repeated steps"


@pytest.mark.parametrize("override, message", [
    ("--config.train.num_stepz=5", "num_stepz"),
    ("--config.model.attention.num_heads=3", "config.model.attention.num_heads"),
    ("--config.model.mixer=transformerxl", "unknown mixer 'transformerxl'"),
])
def test_user_errors_are_one_line(tmp_path, override, message):
  proc = _run("--config=configs/lm_pysrc.py:smoke", f"--workdir={tmp_path}", override, timeout=60)
  assert proc.returncode == 2
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr
