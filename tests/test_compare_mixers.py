"""experiments/compare_mixers.py: shared settings, result collection from fake workdirs, the table (no training)."""

import json
import pathlib

import pytest

from tests.experiments_loader import load_experiment



@pytest.fixture(scope="module")
def cm():
  with load_experiment("compare_mixers") as module:
    yield module


def _write_run(workdir, *, final_step=None, evals=(), train_tps=(), returncode=0, wall=12.5):
  workdir.mkdir(parents=True)
  lines = [json.dumps({"step": 10 * (i + 1), "split": "train", "loss": 3.0 - 0.1 * i, "tokens_per_sec": t})
           for i, t in enumerate(train_tps)]
  lines += [json.dumps({"step": s, "split": "eval", "loss": b * 0.6931, "accuracy": 0.5, "bits_per_byte": b})
            for s, b in evals]
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"torn")  # A torn last line is ignored.
  if final_step is not None:
    s, b = evals[-1]
    (workdir / "final_metrics.json").write_text(json.dumps(
        {"step": final_step, "bits_per_byte": b, "loss": b * 0.6931, "accuracy": 0.5}))
  (workdir / "run.json").write_text(json.dumps({"returncode": returncode, "wall_time_s": wall}))


def test_every_variant_gets_the_same_overrides(cm):
  settings = cm.Settings(steps=40, batch_size=8, seq_len=64, warmup_steps=100)
  cmds = {v: cm.train_command("configs/lm_pysrc.py", v, settings, f"/tmp/w/{v}") for v in cm.VARIANTS}
  shared = [c[5:] for c in cmds.values()]
  assert all(s == shared[0] for s in shared)
  assert "--config.train.num_steps=40" in shared[0] and "--config.data.seq_len=64" in shared[0]
  assert "--config.optim.warmup_steps=40" in shared[0]  # Warm-up never exceeds the run.
  assert cmds["transformer"][3] == "--config=configs/lm_pysrc.py"
  assert cmds["mamba2"][3] == "--config=configs/lm_pysrc.py:mamba2"
  cfg = cm.load_config("configs/lm_pysrc.py", "lstm", settings)
  assert (cfg.model.mixer, cfg.train.num_steps, cfg.data.seq_len, cfg.model.max_len) == ("lstm", 40, 64, 64)


def test_bad_input_raises(cm):
  with pytest.raises(ValueError, match="unknown or no variants"):
    cm.check_variants(["transformer", "gru"])
  with pytest.raises(ValueError, match="--steps must be positive"):
    cm.Settings(steps=0).validate()


def test_collect_finished_run(cm, tmp_path):
  _write_run(tmp_path / "a", final_step=30, evals=[(10, 4.0), (30, 2.5)], train_tps=[100.0, 300.0, 200.0, 1000.0])
  row = cm.collect_variant(tmp_path / "a", steps=30)
  assert row["status"] == "finished"
  assert (row["step"], row["bits_per_byte"], row["accuracy"]) == (30, 2.5, 0.5)
  assert row["tokens_per_sec_median"] == 250.0  # Median of four, not the mean (400).
  assert row["curve"] == [[10, 4.0], [30, 2.5]]
  assert row["wall_time_s"] == 12.5


def test_collect_unfinished_and_missing_runs(cm, tmp_path):
  _write_run(tmp_path / "b", evals=[(10, 4.0), (20, 3.1)], train_tps=[50.0], returncode=0)
  row = cm.collect_variant(tmp_path / "b", steps=30)
  assert row["status"].startswith("incomplete") and "step 20 of 30" in row["status"]
  assert (row["step"], row["bits_per_byte"]) == (20, 3.1)
  # A final_metrics.json of another step count (an older run) is not taken as this run's result.
  _write_run(tmp_path / "c", final_step=10, evals=[(10, 4.0)])
  assert cm.collect_variant(tmp_path / "c", steps=30)["status"].startswith("incomplete")
  missing = cm.collect_variant(tmp_path / "nothing", steps=30)
  assert missing["status"] == "not run" and missing["bits_per_byte"] is None


def test_table_and_plot(cm, tmp_path):
  _write_run(tmp_path / "a", final_step=30, evals=[(10, 4.0), (30, 2.5)], train_tps=[100.0])
  rows = {"transformer": {**cm.collect_variant(tmp_path / "a", 30), "params": 821888, "mixer": "attention",
                          "num_layers": 4},
          "lstm": {**cm.collect_variant(tmp_path / "none", 30), "params": 926592, "mixer": "lstm", "num_layers": 6}}
  table = cm.format_table(rows).splitlines()
  assert len(table) == 4
  assert "| transformer | attention | 4 | 821,888 | 2.5000 |" in table[2] and "finished" in table[2]
  assert "| lstm | lstm | 6 | 926,592 | — |" in table[3] and "not run" in table[3]
  cm.plot(rows, tmp_path / "p.png", "t")
  assert (tmp_path / "p.png").stat().st_size > 1000
