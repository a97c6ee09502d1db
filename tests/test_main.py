"""The command line end to end on the smoke variants: train, resume, eval, generate, and user errors.

Each test that writes to a workdir gets its own (a copy of the shared smoke run where it continues it), so no test
sees another's steps, whatever the order or the xdist worker.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if os.environ.get("SEQJAX_TEST_FAST_XLA_FLAGS"):  # the test session's fast compiles (tests/conftest.py)
    env["XLA_FLAGS"] = os.environ["SEQJAX_TEST_FAST_XLA_FLAGS"]
  env.pop("SEQJAX_FAULTS", None)
  env.pop("SEQJAX_CPU_KERNELS", None)  # The config's cpu_kernels decides (default "auto").
  return subprocess.run([sys.executable, "-m", "seqjax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def _common(workdir, data_dir):
  return ["--config=configs/lm_pysrc.py:smoke", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.data.name=python_source/small"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The LM smoke run (20 steps), never modified by a test: (workdir, data_dir)."""
  tmp = tmp_path_factory.mktemp("smoke")
  workdir, data_dir = str(tmp / "work"), str(tmp / "tfds")
  proc = _run(*_common(workdir, data_dir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, data_dir


def _steps(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r["step"] for r in map(json.loads, f) if r["split"] == split]


def test_train_writes_everything(smoke_run):
  workdir, _ = smoke_run
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert final["step"] == 20
  assert {"loss", "bits_per_byte", "perplexity", "accuracy", "state_sha256"} <= set(final)
  assert 0 < final["bits_per_byte"] < 9
  assert os.path.exists(os.path.join(workdir, "curves.png"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert _steps(workdir, "train") == [5, 10, 15, 20] and _steps(workdir, "eval") == [10, 20]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [10, 20]


def test_eval_and_generate_from_checkpoint(smoke_run):
  workdir, data_dir = smoke_run
  proc = _run(*_common(workdir, data_dir), "--mode=eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)["step"] == 20
  proc = _run(*_common(workdir, data_dir), "--mode=generate", "--config.sample.prompt=import ",
              "--config.sample.num_tokens=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- sample 0 ---\nimport " in proc.stdout


def test_generate_with_beam_search_and_stop_tokens_reports_tokens_per_second(smoke_run):
  workdir, data_dir = smoke_run
  proc = _run(*_common(workdir, data_dir), "--mode=generate", "--config.sample.prompt=def ",
              "--config.sample.num_tokens=12", "--config.sample.temperature=0", "--config.sample.num_beams=3",
              "--config.sample.stop_tokens=eos,13", "--config.sample.length_penalty=0.6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- sample 0 ---\ndef " in proc.stdout and "tokens/s" in proc.stderr
  proc = _run(*_common(workdir, data_dir), "--mode=generate", "--config.sample.top_p=1.5", timeout=60)
  assert proc.returncode == 2 and "config.sample.top_p: must be in (0, 1]" in proc.stderr, proc.stderr[-2000:]


def test_generate_with_int8_weights_reports_the_memory_ratio(smoke_run):
  workdir, data_dir = smoke_run
  proc = _run(*_common(workdir, data_dir), "--mode=generate", "--config.sample.prompt=def ",
              "--config.sample.num_tokens=8", "--config.sample.temperature=0", "--config.sample.quantize=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- sample 0 ---\ndef " in proc.stdout and "tokens/s" in proc.stderr
  ratio = re.search(r"int8 weights: parameters (\d+) -> (\d+) bytes \(ratio ([0-9.]+)\)", proc.stderr)
  assert ratio, proc.stderr[-3000:]
  float_bytes, int8_bytes, value = int(ratio[1]), int(ratio[2]), float(ratio[3])
  assert int8_bytes < 0.5 * float_bytes and value == pytest.approx(int8_bytes / float_bytes, abs=1e-3)


def test_longer_run_resumes_from_the_workdir(smoke_run, tmp_path):
  workdir = shutil.copytree(smoke_run[0], str(tmp_path / "longer"))
  # Longer, and with the portable JAX ops: cpu_kernels changes how, not what, so the run continues.
  proc = _run(*_common(workdir, smoke_run[1]), "--config.train.num_steps=30", "--config.cpu_kernels=off")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from the checkpoint at step 20" in proc.stderr
  with open(os.path.join(workdir, "config_changes.jsonl"), encoding="utf-8") as f:
    assert set(json.loads(f.readline())["changed"]) == {"train.num_steps", "cpu_kernels"}
  assert json.load(open(os.path.join(workdir, "final_metrics.json")))["step"] == 30
  assert _steps(workdir, "train") == [5, 10, 15, 20, 25, 30], "the resumed run repeated or lost steps"


@pytest.mark.slow  # make test: the seq2seq smoke run in process (tests/train/test_seq2seq_train.py), its rollback
                  # and resume from the command line (tests/train/test_faults.py, nan_rollback[seq2seq])
def test_seq2seq_smoke_trains_with_rollback(tmp_path):
  """The seq2seq task runs through the same loop with every on_nan mode (rollback too)."""
  workdir = str(tmp_path / "s2s")
  proc = _run("--config=configs/seq2seq_numbers.py:smoke", f"--workdir={workdir}",
              f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.on_nan=rollback")
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert final["step"] == 12 and final["skipped_steps"] == 0
  assert {"exact_match", "bleu", "rouge_l", "teacher_forcing_prob", "max_target_length"} <= set(final)


@pytest.mark.parametrize("override, message", [
    ("--config.train.num_stepz=5", "num_stepz"),
    ("--config.model.attention.num_heads=3", "config.model.attention.num_heads"),
    ("--config.model.mixer=transformerxl", "unknown mixer 'transformerxl'"),
    ("--config.imports=no_such_module", "config.imports: cannot import 'no_such_module'"),
])
def test_user_errors_are_one_line(tmp_path, override, message):
  proc = _run("--config=configs/lm_pysrc.py:smoke", f"--workdir={tmp_path}", override, timeout=60)
  assert proc.returncode == 2
  assert message in proc.stderr
  assert "Traceback" not in proc.stderr


def test_a_mixer_of_ones_own_trains_from_the_command_line(smoke_run, tmp_path):
  """docs/new_mixer.md: a module named in config.imports registers a mixer that the LM then stacks."""
  workdir = str(tmp_path / "sigmoid")
  proc = _run(*_common(workdir, smoke_run[1]), "--config.imports=examples.sigmoid_attention",
              "--config.model.mixer=sigmoid_attention,attention", "--config.train.num_steps=4",
              "--config.train.eval_every=4", "--config.train.checkpoint_every=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  assert final["step"] == 4 and 0 < final["bits_per_byte"] < 9


@pytest.mark.parametrize("config, env, message", [
    ("configs/lm_pysrc.py:nope", {}, "Error whilst parsing config file: unknown variant 'nope' of configs/lm_pysrc.py"),
    ("configs/lm_pysrc.py:smoke", {"SEQJAX_CPU_KERNELS": "sometimes"},
     "config.cpu_kernels: its default $SEQJAX_CPU_KERNELS='sometimes' is not one of auto, on, off"),
], ids=["unknown_variant", "bad_cpu_kernels_env"])
def test_errors_in_a_config_file_are_one_line(tmp_path, config, env, message, monkeypatch):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  proc = subprocess.run([sys.executable, "-m", "seqjax.main", f"--config={config}", f"--workdir={tmp_path}"],
                        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == 2
  assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
