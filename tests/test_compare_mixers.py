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
    cm.check_variants(["transformer", "nope"])
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


def test_every_causal_registered_mixer_has_a_variant_or_a_reason(cm):
  """The comparison covers the registry: each causal mixer is some variant's mixer; the rest say why not."""
  from seqjax.nn.mixers import available_mixers, is_bidirectional  # pylint: disable=import-outside-toplevel
  settings = cm.Settings(steps=10)
  compared = {m.strip() for v in cm.VARIANTS for m in cm.load_config("configs/lm_pysrc.py", v, settings).model.mixer
              .split(",")}
  missing = [m for m in available_mixers() if m not in compared and m not in cm.NOT_APPLICABLE]
  assert not missing, (f"registered mixers with no variant in experiments/compare_mixers.py: {missing}; add a "
                       f"config variant (configs/lm_pysrc.py ZOO) or a NOT_APPLICABLE reason")
  assert all(is_bidirectional(m) for m in cm.NOT_APPLICABLE)
  moe = cm.load_config("configs/lm_pysrc.py", "moe_every2", settings).model.moe
  assert (moe.num_experts, moe.top_k, moe.every) == (8, 2, 2)


def test_every_variant_builds_at_about_the_transformers_parameters(cm):
  """Every variant's config validates, and its parameter count (jax.eval_shape: nothing is trained or allocated)
  is within 15% of the Transformer's."""
  from seqjax.config import from_config_dict  # pylint: disable=import-outside-toplevel
  settings = cm.Settings(steps=10)
  counts = {}
  for variant in cm.VARIANTS:
    cfg = cm.load_config("configs/lm_pysrc.py", variant, settings)
    from_config_dict(cfg)
    counts[variant] = cm.count_parameters(cfg)
  assert counts["transformer"] == 821888
  off = {v: round(n / counts["transformer"] - 1, 3) for v, n in counts.items()
         if abs(n / counts["transformer"] - 1) > 0.15}
  assert not off, f"variants more than 15% away from the Transformer's {counts['transformer']:,} parameters: {off}"


def test_table_names_the_model_and_lists_not_applicable_mixers(cm, tmp_path):
  settings = cm.Settings(steps=10)
  assert cm.describe_model(cm.load_config("configs/lm_pysrc.py", "transformer", settings)) == "attention (MLP 512)"
  assert cm.describe_model(cm.load_config("configs/lm_pysrc.py", "gru", settings)) == "gru (no MLP)"
  assert cm.describe_model(cm.load_config("configs/lm_pysrc.py", "moe_every2", settings)) == (
      "attention (MLP 512; MoE 8 x 64, top-2, every 2nd block)")
  _write_run(tmp_path / "t", final_step=30, evals=[(30, 2.5)], train_tps=[200.0])
  _write_run(tmp_path / "g", final_step=30, evals=[(30, 2.4)], train_tps=[50.0])
  rows = {"transformer": {**cm.collect_variant(tmp_path / "t", 30), "params": 1, "mixer": "a", "num_layers": 4},
          "gla": {**cm.collect_variant(tmp_path / "g", 30), "params": 1, "mixer": "g", "num_layers": 4}}
  table = cm.format_table(rows, cm.NOT_APPLICABLE).splitlines()
  assert "| 200 | 1.00 |" in table[2] and "| 50 | 0.25 |" in table[3]  # Tokens/s and its ratio to the Transformer.
  assert table[4].startswith("| linformer |") and "not applicable: bidirectional only" in table[4]
