r"""The mixer comparison: Transformer, Mamba, Mamba-2, LSTM, a hybrid and every other causal mixer, same budget.

    .venv/bin/python experiments/compare_mixers.py                                   # every variant, --steps=400
    .venv/bin/python experiments/compare_mixers.py --steps=200 --variants=transformer,mamba
    .venv/bin/python experiments/compare_mixers.py --collect_only                    # rebuild table/plot only

Every variant is a variant of `configs/lm_pysrc.py` (the default Transformer, `:mamba`, `:mamba2`, `:lstm`,
`:hybrid`, and the zoo of configs/lm_pysrc.py's ZOO: `:linear`, `:performer`, ... `:moe_every2`; each sized to about
the Transformer's ~0.8M parameters; Linformer, bidirectional only, is listed as not applicable) trained by the same
trainer with the SAME overrides: `train.num_steps`, `train.batch_size`, `data.seq_len`, `optim.learning_rate`,
`optim.warmup_steps`, `seed`, `train.eval_every`, `train.eval_batches` (the optimizer and its schedule come from the
config and are the same for all). Same seed and data pipeline, so every variant sees the same batches in the same
order.

Each variant trains in its own subprocess (`python -m seqjax.main`; memory and compilation caches do not interfere)
into `--results_dir/<variant>/`, run one after another. The script then collects, per variant:
  - validation bits/byte, loss and accuracy from `final_metrics.json` (the trainer's last evaluation);
  - the parameter count, from the config with `jax.eval_shape` (no training, no allocation);
  - train tokens/s: the median of the `tokens_per_sec` records of `metrics.jsonl` (compilation, evaluation and
    checkpointing are excluded by the trainer);
  - wall time of the subprocess (includes start-up, compilation, evaluations and checkpoints);
and writes `table.md`, `results.json` and `bits_per_byte.png` (validation bits/byte against step, all variants).

Resumable: a variant whose `final_metrics.json` exists for the requested step count is skipped (`--force` retrains
it from scratch). `--max_minutes` stops a variant with SIGTERM after that long; the trainer saves a checkpoint and
exits, the variant is reported as incomplete with its last evaluation, and rerunning the command resumes it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]

# variant name -> the `configs/lm_pysrc.py:ARG` argument.
VARIANTS: dict[str, str] = {"transformer": "", "mamba": "mamba", "mamba2": "mamba2", "lstm": "lstm",
                            "hybrid": "hybrid"}
# The variant zoo (configs/lm_pysrc.py's ZOO: every other causal registered mixer, and a MoE Transformer), each a
# config variant of the same name sized to about the Transformer's parameters.
ZOO_VARIANTS = ("linear", "performer", "retnet", "gla", "deltanet", "gated_deltanet", "based", "rwkv", "longformer",
                "bigbird", "reformer", "s4d", "s5", "gru", "rnn", "moe_every2")
VARIANTS.update({name: name for name in ZOO_VARIANTS})
# Registered mixers that have no row, and why (listed under the table).
NOT_APPLICABLE: dict[str, str] = {
    "linformer": "bidirectional only: keys and values are projected along the whole length, so it has no causal "
                 "form; the LM task refuses it (it is for encoders and classifiers)"}

_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Which variants to run, in order: {', '.join(VARIANTS)}.")
_CONFIG = flags.DEFINE_string("config", "configs/lm_pysrc.py", "The config file whose variants are compared.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results/compare_mixers", "Workdirs, table, JSON and plot.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps of every variant.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Sequences per step (train.batch_size).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence (data.seq_len; model.max_len follows).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate (optim.learning_rate).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 100, "Warm-up steps (optim.warmup_steps).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of initialisation and data order.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 0, "Evaluate every this many steps (0: --steps // 4).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 32, "Validation batches per evaluation.")
_FORCE = flags.DEFINE_bool("force", False, "Retrain variants that already finished (their workdir is deleted).")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Train nothing; rebuild the table, JSON and plot.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0.0, "Stop a variant (SIGTERM: it saves and exits) after this "
                                  "many minutes; 0: no limit. Rerunning resumes it.")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every variant shares."""

  steps: int = 400
  batch_size: int = 16
  seq_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  seed: int = 0
  eval_every: int = 0  # 0: steps // 4.
  eval_batches: int = 32

  def validate(self) -> None:
    for name in ("steps", "batch_size", "seq_len", "eval_batches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
    if self.eval_every < 0 or self.warmup_steps < 0 or self.learning_rate <= 0:
      raise ValueError(f"--eval_every and --warmup_steps must be >= 0 and --learning_rate > 0, got "
                       f"{self.eval_every}, {self.warmup_steps}, {self.learning_rate}")

  def overrides(self) -> dict[str, Any]:
    """Config fields (dotted) set identically for every variant."""
    every = self.eval_every or max(self.steps // 4, 1)
    return {"seed": self.seed, "train.num_steps": self.steps, "train.batch_size": self.batch_size,
            "data.seq_len": self.seq_len, "model.max_len": self.seq_len,
            "optim.learning_rate": self.learning_rate, "optim.warmup_steps": min(self.warmup_steps, self.steps),
            "train.eval_every": every, "train.eval_batches": self.eval_batches,
            "train.checkpoint_every": every, "train.log_every": max(min(25, self.steps // 8), 1),
            "sample.num_tokens": min(200, self.seq_len // 2)}  # Generation is not run; the config must fit max_len.


def check_variants(names: Sequence[str]) -> list[str]:
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or not names:
    raise ValueError(f"unknown or no variants {unknown or list(names)}; choose from {', '.join(VARIANTS)}")
  return list(names)


def config_spec(config_path: str, variant: str) -> str:
  arg = VARIANTS[variant]
  return f"{config_path}:{arg}" if arg else config_path


def train_command(config_path: str, variant: str, settings: Settings, workdir: str) -> list[str]:
  """The `python -m seqjax.main` command line that trains `variant` with the shared settings."""
  cmd = [sys.executable, "-m", "seqjax.main", f"--config={config_spec(config_path, variant)}",
         f"--workdir={workdir}"]
  return cmd + [f"--config.{k}={v}" for k, v in settings.overrides().items()]


def load_config(config_path: str, variant: str, settings: Settings):
  """The variant's ml_collections ConfigDict with the shared overrides applied."""
  path = Path(config_path)
  spec = importlib.util.spec_from_file_location(f"_compare_cfg_{path.stem}", ROOT / path if not path.is_absolute()
                                                else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(VARIANTS[variant] or None)
  for dotted, value in settings.overrides().items():
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def count_parameters(cfg_dict) -> int:
  """Parameters of the config's DecoderLM, from shapes only (`jax.eval_shape`; nothing is allocated)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  from seqjax.config import from_config_dict, with_vocab_size  # pylint: disable=import-outside-toplevel
  from seqjax.data.tokenizer import ByteTokenizer  # pylint: disable=import-outside-toplevel
  from seqjax.models.lm import DecoderLM  # pylint: disable=import-outside-toplevel

  config = with_vocab_size(from_config_dict(cfg_dict), ByteTokenizer().vocab_size)
  model = DecoderLM(config.model)
  tokens_BT = jnp.zeros((1, config.data.seq_len), jnp.int32)
  shapes = jax.eval_shape(lambda r: nn.unbox(model.init({"params": r}, tokens_BT)["params"]),
                          jax.random.PRNGKey(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


# ----------------------------------------------------------------------------------------------------------------
# Collecting one variant's results (pure Python over the workdir's files)
# ----------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
  if not path.exists():
    return []
  records = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # A torn last line of a killed run.
      continue
  return records


def _median(values: Sequence[float]) -> float | None:
  vals = sorted(v for v in values if v is not None and math.isfinite(v))
  if not vals:
    return None
  mid = len(vals) // 2
  return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def collect_variant(workdir: Path, steps: int) -> dict[str, Any]:
  """One variant's row: final metrics (or the last evaluation of an unfinished run), tokens/s, curve, status."""
  records = _read_jsonl(workdir / "metrics.jsonl")
  evals = sorted((r for r in records if r.get("split") == "eval"), key=lambda r: r["step"])
  trains = [r for r in records if r.get("split") == "train"]
  run = json.loads((workdir / "run.json").read_text()) if (workdir / "run.json").exists() else {}
  final_path = workdir / "final_metrics.json"
  final = json.loads(final_path.read_text()) if final_path.exists() else None
  if final is not None and final.get("step") == steps:
    status, source = "finished", final
  elif evals:
    status, source = f"incomplete (last eval at step {evals[-1]['step']} of {steps})", evals[-1]
  else:
    status, source = ("not run" if not records and not run else f"failed/incomplete (no evaluation; "
                      f"exit status {run.get('returncode')})"), {}
  return {
      "status": status,
      "step": source.get("step"),
      "bits_per_byte": source.get("bits_per_byte"),
      "loss": source.get("loss"),
      "accuracy": source.get("accuracy"),
      "tokens_per_sec_median": _median([r.get("tokens_per_sec") for r in trains]),
      "wall_time_s": run.get("wall_time_s"),
      "returncode": run.get("returncode"),
      "load_average_at_start": run.get("load_average_at_start"),
      "load_average_at_end": run.get("load_average_at_end"),
      "curve": [[r["step"], r["bits_per_byte"]] for r in evals if "bits_per_byte" in r],
      "train_loss_curve": [[r["step"], r["loss"]] for r in sorted(trains, key=lambda r: r["step"]) if "loss" in r],
  }


def _fmt(value: Any, spec: str) -> str:
  return "—" if value is None else format(value, spec)


def describe_model(cfg) -> str:
  """The table's "mixer" cell: the mixer pattern, its MLP (or none) and any mixture of experts."""
  m = cfg.model
  text = f"{m.mixer} ({'no MLP' if m.mlp == 'none' else f'MLP {m.mlp_dim}'}"
  if m.mixer == "rwkv" and m.linear.rwkv_channel_mix:
    text = f"rwkv (whole RWKV-6 block, channel mix {m.mlp_dim}"
  if m.moe.num_experts:
    every = "every block" if m.moe.every == 1 else f"every {m.moe.every}nd block" if m.moe.every == 2 else \
        f"every {m.moe.every}th block"
    text += (f"; MoE {m.moe.num_experts} x {m.moe.expert_dim or m.mlp_dim}, top-{m.moe.top_k}, {every}")
  return text + ")"


def format_table(rows: dict[str, dict[str, Any]], not_applicable: dict[str, str] | None = None) -> str:
  """A markdown table of the rows (variant -> collected row with `params`, `mixer`, `num_layers` added).

  Tokens/s is also given relative to the "transformer" row when there is one (rows of one run share the machine's
  load, so the ratio is the figure to read). `not_applicable` (mixer -> reason) adds a row for each mixer left out.
  """
  base = rows.get("transformer", {}).get("tokens_per_sec_median")
  lines = ["| variant | mixer | layers | params | val bits/byte | val loss (nats) | val accuracy | "
           "train tokens/s (median) | tokens/s / transformer | wall time | status |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
  for name, r in rows.items():
    wall = r.get("wall_time_s")
    tps = r.get("tokens_per_sec_median")
    ratio = None if tps is None or not base else tps / base
    lines.append(
        f"| {name} | {r.get('mixer', '?')} | {r.get('num_layers', '?')} | {_fmt(r.get('params'), ',d')} | "
        f"{_fmt(r.get('bits_per_byte'), '.4f')} | {_fmt(r.get('loss'), '.4f')} | {_fmt(r.get('accuracy'), '.4f')} | "
        f"{_fmt(tps, ',.0f')} | {_fmt(ratio, '.2f')} | {'—' if wall is None else f'{wall / 60:.1f} min'} | "
        f"{r['status']} |")
  for name, reason in (not_applicable or {}).items():
    lines.append(f"| {name} | {name} | — | — | — | — | — | — | — | — | not applicable: {reason} |")
  return "\n".join(lines) + "\n"


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax in axes:  # Up to 20 distinct colours (the zoo has 18 rows).
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
  for name, r in rows.items():
    if r["curve"]:
      axes[0].plot(*zip(*r["curve"]), "o-", label=f"{name} ({_fmt(r.get('params'), ',d')})", markersize=4)
    if r["train_loss_curve"]:
      steps, loss = zip(*r["train_loss_curve"])
      axes[1].plot(steps, [v / math.log(2) for v in loss], "-", label=name)
  axes[0].set(xlabel="step", ylabel="validation bits per byte", title=title)
  axes[1].set(xlabel="step", ylabel="train loss (bits/token; tokens are bytes)",
              title="training loss (logged window averages)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def run_variant(cmd: list[str], workdir: Path, max_minutes: float) -> dict[str, Any]:
  """Runs one training subprocess (log to WORKDIR/train.log); returns its exit status and wall time."""
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  stopped = False
  load_start = os.getloadavg()
  with open(workdir / "train.log", "a", encoding="utf-8") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
    try:
      proc.wait(timeout=max_minutes * 60 if max_minutes > 0 else None)
    except subprocess.TimeoutExpired:
      stopped = True
      proc.send_signal(signal.SIGTERM)  # The trainer finishes its step, saves and exits 0.
      try:
        proc.wait(timeout=300)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except KeyboardInterrupt:
      proc.send_signal(signal.SIGTERM)
      proc.wait()
      raise
  wall = time.perf_counter() - start
  previous = json.loads((workdir / "run.json").read_text()) if (workdir / "run.json").exists() else {}
  run = {"returncode": proc.returncode, "stopped_after_max_minutes": stopped,
         "wall_time_s": wall + previous.get("wall_time_s", 0.0), "command": cmd,  # A resumed run adds up.
         "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
  (workdir / "run.json").write_text(json.dumps(run, indent=2))
  return run


def _is_done(workdir: Path, steps: int) -> bool:
  path = workdir / "final_metrics.json"
  return path.exists() and json.loads(path.read_text()).get("step") == steps


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  variants = check_variants(_VARIANTS.value)
  settings = Settings(steps=_STEPS.value, batch_size=_BATCH_SIZE.value, seq_len=_SEQ_LEN.value,
                      learning_rate=_LEARNING_RATE.value, warmup_steps=_WARMUP_STEPS.value, seed=_SEED.value,
                      eval_every=_EVAL_EVERY.value, eval_batches=_EVAL_BATCHES.value)
  settings.validate()
  results_dir = Path(_RESULTS_DIR.value)
  if not results_dir.is_absolute():
    results_dir = ROOT / results_dir
  results_dir.mkdir(parents=True, exist_ok=True)
  os.chdir(ROOT)
  load_start = os.getloadavg()

  for name in variants:
    workdir = results_dir / name
    if _COLLECT_ONLY.value:
      break
    if _FORCE.value and workdir.exists():
      shutil.rmtree(workdir)
    if _is_done(workdir, settings.steps):
      print(f"[{name}] finished already ({workdir / 'final_metrics.json'}); --force retrains it", flush=True)
      continue
    cmd = train_command(_CONFIG.value, name, settings, str(workdir))
    print(f"[{name}] training: {' '.join(cmd[1:])}", flush=True)
    run = run_variant(cmd, workdir, _MAX_MINUTES.value)
    print(f"[{name}] exit status {run['returncode']} after {run['wall_time_s'] / 60:.1f} min "
          f"(log: {workdir / 'train.log'})", flush=True)

  rows: dict[str, dict[str, Any]] = {}
  for name in variants:
    cfg = load_config(_CONFIG.value, name, settings)
    row = collect_variant(results_dir / name, settings.steps)
    row.update(mixer=describe_model(cfg), num_layers=cfg.model.num_layers, mlp=cfg.model.mlp,
               params=count_parameters(cfg), config=config_spec(_CONFIG.value, name))
    rows[name] = row

  table = format_table(rows, NOT_APPLICABLE if set(variants) & set(ZOO_VARIANTS) else None)
  header = (f"{settings.steps} steps x {settings.batch_size} x {settings.seq_len} tokens, lr {settings.learning_rate}, "
            f"warm-up {min(settings.warmup_steps, settings.steps)}, seed {settings.seed}, "
            f"{settings.eval_batches} validation batches\n\n")
  (results_dir / "table.md").write_text(header + table)
  result = {"settings": dataclasses.asdict(settings), "overrides": settings.overrides(),
            "command": " ".join([".venv/bin/python", "experiments/compare_mixers.py"] + sys.argv[1:]),
            "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
            "variants": rows}
  previous_path = results_dir / "results.json"
  if _COLLECT_ONLY.value and previous_path.exists():  # Keep the training run's command and load averages.
    previous = json.loads(previous_path.read_text())
    result.update({k: previous[k] for k in ("command", "load_average_at_start", "load_average_at_end")
                   if k in previous})
  (results_dir / "results.json").write_text(json.dumps(result, indent=2))
  plot(rows, results_dir / "bits_per_byte.png",
       f"validation bits/byte, {settings.steps} steps x {settings.batch_size}x{settings.seq_len}")
  print("\n" + header + table)
  print(f"wrote {results_dir / 'table.md'}, {results_dir / 'results.json'}, {results_dir / 'bits_per_byte.png'}")


if __name__ == "__main__":
  app.run(main)
