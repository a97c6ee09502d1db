r"""The published synthetic-task results of issue 16, each reproduced by one command (docs/research.md).

  python experiments/reproduce.py selective_copying      # Mamba's Table 1: S4D vs Mamba vs Mamba-2
  python experiments/reproduce.py induction_heads        # Mamba's Table 2: length extrapolation to 16x
  python experiments/reproduce.py listops                # LRA's ListOps: Transformer vs Mamba vs S4D
  python experiments/reproduce.py mqar [--settings=all] [--widths=64,128]   # Zoology's Figure 2: (64, 4) by default
      [--scale=cpu|paper] [--results_dir=results] [--parallel=2] [--print_commands] [--report_only]

Each study is one or more `seqjax.sweep` grids of `configs/synthetic.py` (one `seqjax.main` process per run, in
RESULTS_DIR/STUDY/<part>/<point>/), resumable like any sweep: a finished run is skipped, an interrupted one resumes
from its checkpoints, so rerunning the command continues a killed study. The runs of all grids share one queue,
`--parallel` at a time (default 2: this machine's cores), costliest first (`Part.cost`). The induction-heads study
then evaluates every trained run on all its longer splits in one `--mode=eval` run (`data.eval_splits`), also
skipped once done.
At the end RESULTS_DIR/STUDY/ holds `table.md` (the results, what was reduced against the paper, the published
figures), `results.json` (every run's numbers and command) and `STUDY.png`. `--report_only` rewrites them from the
runs present; `--print_commands` prints every training command and runs nothing.

`--scale=cpu` (the default) is what fits well under an hour per study on a 2-core CPU (MQAR's default figure: 34
min): shorter sequences, fewer steps and examples, one learning rate (two for attention at MQAR); every reduction is
listed in the table's header. `--scale=paper` sets the
papers' lengths, widths, step counts and learning-rate grids (days of CPU time; meant for a cluster with
`--print_commands`). `--scale=smoke` runs the same plumbing on the tasks' `small` settings for 4 steps (tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from seqjax import sweep as sweep_lib  # noqa: E402  pylint: disable=wrong-import-position

CONFIG = "configs/synthetic.py"
DEFAULT_PARALLEL = 2  # Runs at a time: this machine's 2 cores (each run's steps are small enough to share them).
SCALES = ("cpu", "paper", "smoke")
MQAR_SETTINGS = ("len64_pairs4", "len128_pairs8", "len256_pairs16")


@dataclasses.dataclass(frozen=True)
class Part:
  """One sweep of a study: `grid` over `config` with `fixed` KEY=VALUE settings, in RESULTS_DIR/STUDY/<name>."""

  name: str
  config: str
  grid: str
  fixed: tuple[str, ...]
  labels: tuple[tuple[str, str], ...] = ()  # Shown in the table (e.g. the MQAR setting and width).
  best_over: str | None = None
  # The relative cost of each run's steps by model.mixer (unlisted: 1), times `scale`: the study's runs start
  # costliest first, so that with --parallel the long runs do not end the study on one busy core.
  mixer_cost: tuple[tuple[str, float], ...] = ()
  scale: float = 1.0

  def cost(self, run: sweep_lib.Run) -> float:
    mixer = dict(run.values).get("model.mixer", "")
    return self.scale * dict(self.mixer_cost).get(mixer, 1.0)


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  title: str
  parts: tuple[Part, ...]
  metric: str
  reductions: str  # What differs from the paper (shown above the table).
  published: str  # The paper's figures and where they are.
  eval_splits: tuple[str, ...] = ()  # Evaluated after training (induction heads' longer splits).
  eval_batches: int = 0
  paper_values: tuple[tuple[str, float], ...] = ()  # (mixer, published accuracy) drawn beside the bars.


def _train(steps: int, batch: int, lr: float, warmup: int, evals: int = 2, eval_batches: int = 16) -> tuple[str, ...]:
  every = max(steps // evals, 1)
  return (f"train.num_steps={steps}", f"train.batch_size={batch}", f"optim.learning_rate={lr}",
          f"optim.warmup_steps={warmup}", f"train.eval_every={every}", f"train.eval_batches={eval_batches}",
          f"train.checkpoint_every={every}", "train.log_every=25")


def _data(name: str, seq_len: int, max_len: int | None = None) -> tuple[str, ...]:
  return (f"data.name={name}", f"data.seq_len={seq_len}", f"model.max_len={max_len or seq_len}")


SMOKE = ("model.d_model=32", "model.mlp_dim=64") + ("train.num_steps=4", "train.batch_size=16",
                                                   "optim.warmup_steps=1", "train.eval_every=4", "train.eval_batches=2",
                                                   "train.checkpoint_every=4", "train.log_every=2")
STOP = ("train.stop_when=answer_accuracy>=0.99",)  # CPU scale: a run that has learned the task ends there.
SMOKE_NOTE = "smoke scale: the task's `small` setting, width 32, 4 steps (a test of the plumbing, not a result)"


def selective_copying(scale: str) -> Study:
  if scale == "smoke":
    fixed, reductions = _data("selective_copying/small", 64) + ("model.positions=none",) + SMOKE, SMOKE_NOTE
  elif scale == "cpu":
    fixed = (_data("selective_copying/len128", 128) + ("model.positions=none",)
             + _train(4000, 16, 3e-3, 50, evals=16) + STOP)
    reductions = ("length 128 (paper 4,096; 16 tokens to copy and V = 16 as in the paper), at most 4,000 steps of "
                  "batch 16 (64,000 examples; paper 400,000 steps), stopped at the first evaluation (every 250 "
                  "steps) with 99% of the answers right, 2 layers of width 64, one learning rate (3e-3), accuracy on "
                  "256 validation examples")
  else:
    fixed = _data("selective_copying/len4096", 4096) + ("model.positions=none",) + _train(400_000, 64, 1e-3, 1000)
    reductions = "the paper's length 4,096 and 400,000 steps; 2 layers of width 64"
  return Study(
      "selective_copying", "Selective copying (Mamba, Table 1)",
      (Part("sweep", f"{CONFIG}:selective_copying", "model.mixer=mamba,s4d,mamba2", fixed),),
      "answer_accuracy", reductions,
      "Mamba (Gu & Dao, 2023), Table 1, 2-layer models at length 4,096: S4 18.3%, H3 57.0%, Hyena 30.1%, "
      "Mamba (S6) 99.8%; Mamba-2 is not in that table.", paper_values=(("s4d", 0.183), ("mamba", 0.998)))


def induction_heads(scale: str) -> Study:
  if scale == "smoke":
    train_len, lengths = 32, (64, 128)
    base, reductions = _data("induction_heads/small", 32, 128) + SMOKE, SMOKE_NOTE
  elif scale == "cpu":
    train_len, lengths = 64, (128, 256, 512, 1024)
    base = _data("induction_heads/len64", 64, 1024) + _train(3000, 32, 1e-3, 50, evals=12) + STOP
    reductions = ("trained at 64 tokens (paper 256) and evaluated at 2x-16x (128-1,024; paper up to 2^20), at most "
                  "3,000 steps of batch 32 (96,000 examples; paper: 100,000 examples of 256), stopped at the first "
                  "evaluation (every 250 steps) with 99% right, 2 layers of width 64, one learning rate, 256 "
                  "examples per evaluation length")
  else:
    train_len, lengths = 256, (512, 1024, 2048, 4096)
    base = _data("induction_heads/len256", 256, 4096) + _train(50_000, 8, 1e-3, 1000)
    reductions = "trained at 256 as in the paper, evaluated up to 16x (the paper: up to 2^20)"
  attention = Part("attention", f"{CONFIG}:induction_heads", "model.positions=rope,learned",
                   base + ("model.mixer=attention",))
  mamba = Part("mamba", f"{CONFIG}:induction_heads", "model.mixer=mamba", base + ("model.positions=none",))
  return Study(
      "induction_heads", "Induction heads: length extrapolation (Mamba, Table 2)", (mamba, attention),
      "answer_accuracy", reductions,
      f"Mamba (Gu & Dao, 2023), Table 2, 2-layer models trained at 256: Mamba 100% at every length up to 2^20 "
      f"(4,000x); multi-head attention with absolute, RoPE or xPos positions does not extrapolate far past its "
      f"training length (near chance a few times beyond it). Training length here: {train_len}.",
      eval_splits=("validation",) + tuple(f"test_len{t}" for t in lengths), eval_batches=8)


def listops(scale: str) -> Study:
  if scale == "smoke":
    fixed, reductions = _data("listops/small", 64) + SMOKE, SMOKE_NOTE
  elif scale == "cpu":
    fixed = (_data("listops/len20_100", 100) + ("model.attention.num_heads=4",)
             + _train(500, 32, 1e-3, 50, eval_batches=0))
    reductions = ("lengths 20-100 tokens (LRA 500-2,000), 20,000 training examples (LRA 96,000), 500 steps of "
                  "batch 32 (LRA: 5,000 steps of batch 32), 2 layers of width 64 with mean pooling, one learning "
                  "rate (1e-3)")
  else:
    fixed = (_data("listops/len500_2000", 2000) + ("model.d_model=512", "model.mlp_dim=1024", "model.num_layers=4",
                                                   "model.attention.num_heads=8") + _train(5000, 32, 5e-5, 1000,
                                                                                           eval_batches=0))
    reductions = "LRA's data and Transformer (4 layers, width 512, MLP 1,024, 8 heads, 5,000 steps of batch 32)"
  return Study(
      "listops", "ListOps (Long Range Arena)",
      (Part("sweep", f"{CONFIG}:listops", "model.mixer=attention,mamba,s4d", fixed),), "accuracy", reductions,
      "LRA (Tay et al., 2021), Table 1: Transformer 36.37% on ListOps (lengths up to 2,000); S4 (Gu et al., "
      "2022) 59.60%. The Mamba paper reports no LRA figures. Chance: ~10% (the majority class ~17%).",
      paper_values=(("attention", 0.3637), ("s4d", 0.596)))


MQAR_WIDTHS = {"cpu": (32, 64, 128), "paper": (64, 128, 256), "smoke": (32, 64, 128)}
MQAR_DEFAULT_SETTINGS = ("len64_pairs4",)  # 34 min here; --settings=all for the whole figure (hours).
# A train step's time at width 128 relative to attention's (this CPU, 4,096 tokens a step; docs/research.md).
MQAR_STEP_COST = (("attention", 1.0), ("mamba", 4.1), ("mamba2", 3.5), ("s4d", 0.8), ("lstm", 1.2))


MQAR_MIXERS = ("attention", "mamba", "mamba2", "s4d", "lstm")
MQAR_CPU_LEARNING_RATE = 3e-3
# The cpu scale's learning rates by mixer (others: MQAR_CPU_LEARNING_RATE alone), each cell taking the best, as
# Zoology picks each cell's rate from a sweep. Attention needs both (docs/research.md): 3e-3 leaves (128, 8) and
# (256, 16) unlearned in 2,000 steps where 1e-2 solves them, and 1e-2 is too high at (64, 4) and at width 128.
MQAR_CPU_RATE_SWEEP = (("attention", (3e-3, 1e-2)),)


def _rate_groups(mixers: tuple[str, ...], learning_rate: float | None) -> list[tuple[tuple[float, ...], list[str]]]:
  """The mixers grouped by their cpu-scale rates, the one-rate group first: [(rates, mixers)]."""
  sweeps = {} if learning_rate else dict(MQAR_CPU_RATE_SWEEP)
  groups: dict[tuple[float, ...], list[str]] = {}
  for mixer in mixers:
    groups.setdefault(sweeps.get(mixer, (learning_rate or MQAR_CPU_LEARNING_RATE,)), []).append(mixer)
  return sorted(groups.items(), key=lambda item: len(item[0]))


def mqar(scale: str, settings: tuple[str, ...] = MQAR_DEFAULT_SETTINGS, widths: tuple[int, ...] | None = None,
         mixers: tuple[str, ...] = MQAR_MIXERS, learning_rate: float | None = None) -> Study:
  """Zoology's figure: `mixers` at `widths` (the scale's by default) and `settings`. At the cpu scale each mixer
  trains at its rates (`MQAR_CPU_RATE_SWEEP`, best per cell) or `learning_rate` alone if given; the paper scale
  sweeps five for every mixer."""
  lr = learning_rate or MQAR_CPU_LEARNING_RATE
  parts = []
  for setting in settings:
    t = int(setting.split("_")[0].removeprefix("len"))
    name = {"smoke": "mqar/small", "cpu": f"mqar/{setting}_v512", "paper": f"mqar/{setting}"}[scale]
    for width in widths or MQAR_WIDTHS[scale]:
      cell = f"{setting}/width{width}" + (f"_lr{learning_rate:g}" if learning_rate else "")
      # Another rate gets other run directories (a finished run of the default rate must not be taken for it).
      fixed = _data(name, t) + ("model.positions=rope", f"model.d_model={width}", f"model.mlp_dim={2 * width}")
      labels = (("setting", setting), ("width", str(width)))
      if scale == "cpu":
        # 4,096 tokens a step at every setting: the pairs (and so the queries) grow with the length, so every
        # step also sees the same 256 answers. Constant rate after the warmup, no weight decay; a run ends once
        # 99% of the answers are right.
        for rates, group in _rate_groups(mixers, learning_rate):
          run = _train(2000, 64 * 64 // t, rates[0], 50, evals=8, eval_batches=8 * t // 64) + (
              "optim.weight_decay=0.0", "optim.end_lr_fraction=1.0") + STOP
          grid, best, part = f"model.mixer={','.join(group)}", None, cell
          if len(rates) > 1:  # The rate is a grid key (each run's directory names it), the best kept per cell.
            grid += ";optim.learning_rate=" + ",".join(f"{r:g}" for r in rates)
            best, part = "optim.learning_rate", f"{cell}/rates"
          parts.append(Part(part, f"{CONFIG}:mqar", grid, fixed + run, labels, best, MQAR_STEP_COST, float(width)))
        continue
      if scale == "smoke":
        run, grid, best = SMOKE[2:], f"model.mixer={','.join(mixers)}", None
      else:
        run = _train(6_250, 64, 1e-3, 100)  # 4 epochs of 100,000 examples (Zoology trains 64).
        grid = f"model.mixer={','.join(mixers)};optim.learning_rate=1e-4,3e-4,1e-3,3e-3,1e-2"
        best = "optim.learning_rate"
      parts.append(Part(cell, f"{CONFIG}:mqar", grid, fixed + run, labels, best, MQAR_STEP_COST, float(width)))
  if scale == "smoke":
    reductions = SMOKE_NOTE + "; every setting reads mqar/small"
  elif scale == "cpu":
    swept = "; ".join(f"{m}: the better of {' and '.join(f'{r:g}' for r in rates)} per cell"
                      for m, rates in MQAR_CPU_RATE_SWEEP if m in mixers)
    rates = f"one learning rate ({lr:g}" if learning_rate or not swept else f"learning rate {lr:g} ({swept}"
    reductions = ("a vocabulary of 512 (Zoology 8,192: each key would be seen too rarely in a short run), at most "
                  "2,000 steps of 4,096 tokens (batch 64 at length 64, 32 at 128, 16 at 256: 256 answers a step "
                  "at every setting; Zoology: 64 epochs of 100,000 examples), stopped at the first evaluation "
                  f"(every 250 steps, 512 examples) with 99% of the answers right, {rates}, constant after 50 "
                  "warmup steps, no weight decay; Zoology sweeps 4 per cell), widths 32, 64 and 128 (Zoology "
                  "64-256; a step of width 256 costs too much here), 2 layers, MLP width 2x the model width, RoPE "
                  "in attention and no positions elsewhere")
  else:
    reductions = "4 epochs (Zoology 64), the learning rate picked per cell among 5"
  return Study(
      "mqar", "MQAR: accuracy against model width (Zoology, Figure 2)", tuple(parts), "answer_accuracy",
      reductions,
      "Zoology (Arora et al., 2023), Figure 2: attention near 100% at every width and setting; gated convolutions "
      "and recurrent models (H3, Hyena, RWKV, ...) need a width growing with the sequence length and number of "
      "pairs, well below attention at width 64-128 at (256, 16). Later work (Based, Mamba-2) places Mamba between.")


STUDIES = {"selective_copying": selective_copying, "induction_heads": induction_heads, "listops": listops,
           "mqar": mqar}


def make_study(name: str, scale: str = "cpu", settings: tuple[str, ...] = MQAR_DEFAULT_SETTINGS,
               widths: tuple[int, ...] | None = None, mixers: tuple[str, ...] = MQAR_MIXERS,
               learning_rate: float | None = None) -> Study:
  if name not in STUDIES:
    raise sweep_lib.SweepError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
  if scale not in SCALES:
    raise sweep_lib.SweepError(f"--scale={scale!r}: use one of {', '.join(SCALES)}")
  if name != "mqar":
    return STUDIES[name](scale)
  if settings == ("all",):
    settings = MQAR_SETTINGS
  unknown = [s for s in settings if s not in MQAR_SETTINGS]
  if unknown or not settings:
    raise sweep_lib.SweepError(f"--settings={','.join(settings)!r}: choose among {', '.join(MQAR_SETTINGS)}, "
                               "or all")
  if widths is not None and (not widths or any(w < 8 or w % 8 for w in widths)):
    raise sweep_lib.SweepError(f"--widths={','.join(map(str, widths))!r}: give model widths, multiples of 8 "
                               f"(the {scale} scale's: {','.join(map(str, MQAR_WIDTHS[scale]))})")
  if not mixers or any(m not in MQAR_MIXERS for m in mixers):
    raise sweep_lib.SweepError(f"--mixers={','.join(mixers)!r}: choose among {', '.join(MQAR_MIXERS)}")
  if learning_rate is not None and not learning_rate > 0:
    raise sweep_lib.SweepError(f"--learning_rate={learning_rate}: give a positive rate, e.g. 0.01")
  if learning_rate is not None and scale != "cpu":
    raise sweep_lib.SweepError(f"--learning_rate sets the cpu scale's one rate; --scale={scale} has its own "
                               "(paper: a sweep of five); drop the flag or use --scale=cpu")
  return mqar(scale, settings, widths, mixers, learning_rate)


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def part_runs(study: Study, part: Part, results_dir: str) -> list[sweep_lib.Run]:
  workdir = os.path.join(os.path.abspath(results_dir), study.name, part.name)
  return sweep_lib.plan(part.config, workdir, sweep_lib.parse_grid(part.grid), part.fixed)


def eval_command(study: Study, run: sweep_lib.Run) -> tuple[str, ...]:
  """The run's training command as a --mode=eval run over every split of the study."""
  return run.command + ("--mode=eval", f"--config.data.eval_splits={','.join(study.eval_splits)}",
                        f"--config.train.eval_batches={study.eval_batches}")


def evaluate(study: Study, run: sweep_lib.Run, echo=print) -> bool:
  """Evaluates a finished run on the study's splits (skipped when eval_splits.json exists)."""
  if os.path.exists(os.path.join(run.workdir, "eval_splits.json")):
    return True
  command = eval_command(study, run)
  echo(f"[reproduce] evaluating {run.name} on {', '.join(study.eval_splits)}\n  {shlex.join(command)}")
  with open(os.path.join(run.workdir, "eval_run.log"), "a", encoding="utf-8") as log:
    code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
  if code:
    echo(f"[reproduce] evaluation of {run.name} failed (exit {code}); see {run.workdir}/eval_run.log")
  return code == 0


def reproduce(study: Study, results_dir: str, *, print_commands: bool = False, report_only: bool = False,
              parallel: int = DEFAULT_PARALLEL, launch=None, echo=print) -> int:
  """Runs every part's runs (and the evaluations), then writes each part's sweep files and the study's table, JSON
  and plot. Exit status. The runs of all parts share one queue, costliest first (`Part.cost`), `parallel` at a
  time; `launch` is `seqjax.sweep.execute`'s (tests pass a fake)."""
  status = 0
  planned = [(part, part_runs(study, part, results_dir)) for part in study.parts]
  if print_commands:
    for _, runs in planned:
      for run in runs:
        echo(shlex.join(run.command))
        if study.eval_splits:
          echo(shlex.join(eval_command(study, run)))
    return 0
  if not report_only:
    # Named by part too: the same grid point recurs in every part (the log and the status must tell them apart).
    queue = [(part.cost(run), dataclasses.replace(run, name=f"{part.name}/{run.name}"))
             for part, runs in planned for run in runs]
    queue.sort(key=lambda item: -item[0])  # Stable: runs of equal cost keep the study's order.
    done = sweep_lib.execute([run for _, run in queue], parallel, launch or sweep_lib.start_run, echo)
    status = int(any(s.startswith("failed") for s in done.values()))
    for part, runs in planned:
      sweep_lib.report(os.path.join(os.path.abspath(results_dir), study.name, part.name), runs,
                       [k for k, _ in sweep_lib.parse_grid(part.grid)], study.metric, part.best_over)
      if study.eval_splits:
        for run in runs:
          if run.finished and not evaluate(study, run, echo):
            status = 1
  paths = write_report(study, results_dir)
  echo(f"[reproduce] {study.name}: {', '.join(paths)}")
  return status


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


def _read(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def collect(study: Study, results_dir: str) -> list[dict]:
  """One record per run: labels, grid values, status, final metrics, the longer splits' metrics, its command."""
  records = []
  for part in study.parts:
    runs = part_runs(study, part, results_dir)
    rows = sweep_lib.collect(runs)
    if part.best_over:
      keys = [k for k, _ in sweep_lib.parse_grid(part.grid)]
      best = {id(r) for r in sweep_lib.best_rows(rows, keys, part.best_over, study.metric)}
      rows = [r if id(r) in best or r["status"] != "finished" else dict(r, status="not best") for r in rows]
    for run, row in zip(runs, rows):
      fixed = dict(kv.split("=", 1) for kv in part.fixed)
      record = {"part": part.name, **dict(part.labels), "mixer": row.get("model.mixer", fixed.get("model.mixer")),
                "positions": row.get("model.positions", fixed.get("model.positions", "learned")), **row,
                "command": shlex.join(run.command)}
      splits = _read(os.path.join(run.workdir, "eval_splits.json"))
      if splits:
        record["splits"] = {s: m.get(study.metric) for s, m in splits["splits"].items()}
      records.append(record)
  return records


def _pct(value) -> str:
  return "—" if value is None else f"{100 * value:.1f}%"


def _model(r: dict) -> str:
  return f"{r['mixer']} ({r['positions']} positions)" if r["mixer"] == "attention" else r["mixer"]


def _cell(record: dict, metric: str) -> str:
  """A figure's cell: the metric, and the learning rate where the cell took the best of several."""
  rate = record.get("optim.learning_rate")
  return _pct(record.get(metric)) + (f" ({rate})" if rate and metric in record else "")


def table(study: Study, records: list[dict]) -> str:
  done = [r for r in records if r["status"] in ("finished", "not best")]
  lines = [f"# {study.title}", "", f"Scale reductions against the paper: {study.reductions}.", "",
           f"Published: {study.published}", "",
           f"{len(done)}/{len(records)} runs finished" + ("" if len(done) == len(records) else
                                                           " (the others: not run yet; rerun the command)"), ""]
  if study.eval_splits:
    lines += ["| model | " + " | ".join(study.eval_splits) + " |", "|---|" + "---:|" * len(study.eval_splits)]
    for r in records:
      splits = r.get("splits") or {}
      lines.append(f"| {_model(r)} | " + " | ".join(_pct(splits.get(s)) for s in study.eval_splits) + " |")
  elif study.name == "mqar":
    widths = list(dict.fromkeys(r["width"] for r in records))
    for setting in dict.fromkeys(r["setting"] for r in records):
      lines += [f"**{setting}** (answer accuracy)", "", "| mixer | " + " | ".join(f"width {w}" for w in widths) + " |",
                "|---|" + "---:|" * len(widths)]
      for mixer in dict.fromkeys(r["mixer"] for r in records):
        cells = [next((r for r in records if r["setting"] == setting and r["width"] == w and r["mixer"] == mixer
                       and r["status"] == "finished"), {}) for w in widths]
        lines.append(f"| {mixer} | " + " | ".join(_cell(c, study.metric) for c in cells) + " |")
      lines.append("")
  else:
    extra = "sequence accuracy" if study.metric == "answer_accuracy" else "loss"
    lines += [f"| model | {study.metric.replace('_', ' ')} | {extra} | steps |", "|---|---:|---:|---:|"]
    for r in records:
      second = _pct(r.get("sequence_accuracy")) if extra != "loss" else (
          f"{r['loss']:.3f}" if "loss" in r else "—")
      lines.append(f"| {_model(r)} | {_pct(r.get(study.metric))} | {second} | {r.get('step', '—')} |")
  pending = [f"{_model(r)}{' ' + r['setting'] + ' width ' + r['width'] if 'setting' in r else ''} "
             f"({'started, not finished: rerunning resumes it' if r['status'] == 'started' else 'not run yet'})"
             for r in records if r["status"] in ("started", "missing")]
  if pending:
    lines += ["", "Not finished: " + "; ".join(pending) + "."]
  return "\n".join(lines) + "\n"


def plot(study: Study, records: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  done = [r for r in records if r["status"] == "finished"]
  if study.name == "mqar":
    settings = list(dict.fromkeys(r["setting"] for r in records))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
      for mixer in dict.fromkeys(r["mixer"] for r in records):
        pts = sorted((int(r["width"]), r.get(study.metric, 0)) for r in done
                     if r["setting"] == setting and r["mixer"] == mixer)
        if pts:
          ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mixer)
      ax.set(xscale="log", xlabel="model width", ylabel="answer accuracy", title=setting, ylim=(0, 1.02))
      widths = sorted({int(r["width"]) for r in records})
      ax.set_xticks(widths, [str(w) for w in widths])
      ax.minorticks_off()  # The log axis's minor labels would overlap the widths'.
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  elif study.eval_splits:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lengths = {s: i for i, s in enumerate(study.eval_splits)}
    for r in records:
      if r.get("splits"):
        ax.plot(list(lengths.values()), [r["splits"].get(s, float("nan")) for s in lengths], "o-", label=_model(r))
    ax.set_xticks(list(lengths.values()), [s.replace("test_len", "") if s != "validation" else "training length"
                                          for s in lengths])
    ax.set(xlabel="evaluation length", ylabel="answer accuracy", title=study.title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  else:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([_model(r) for r in done], [r.get(study.metric, 0) for r in done], label="this run (CPU scale)")
    published = dict(study.paper_values)
    shown = [(i, published[r["mixer"]]) for i, r in enumerate(done) if r["mixer"] in published]
    if shown:
      ax.plot([i for i, _ in shown], [v for _, v in shown], "kx", markersize=12, mew=2, label="published")
      ax.legend(fontsize=8)
    ax.set(ylabel=study.metric.replace("_", " "), title=study.title, ylim=(0, 1.05))
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(study: Study, results_dir: str) -> list[str]:
  out_dir = os.path.join(results_dir, study.name)
  os.makedirs(out_dir, exist_ok=True)
  records = collect(study, results_dir)
  paths = [os.path.join(out_dir, n) for n in ("table.md", "results.json", f"{study.name}.png")]
  with open(paths[0], "w", encoding="utf-8") as f:
    f.write(table(study, records))
  with open(paths[1], "w", encoding="utf-8") as f:
    json.dump({"study": study.name, "reductions": study.reductions, "published": study.published,
               "runs": records}, f, indent=2, sort_keys=True)
  plot(study, records, paths[2])
  return paths


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("study", choices=sorted(STUDIES))
  parser.add_argument("--scale", default="cpu", choices=SCALES)
  parser.add_argument("--results_dir", default="results")
  parser.add_argument("--settings", default=",".join(MQAR_DEFAULT_SETTINGS),
                      help=f"mqar only: the (length, pairs) settings among {', '.join(MQAR_SETTINGS)}, or all")
  parser.add_argument("--widths", default="", help="mqar only: the model widths (default: the scale's, e.g. "
                      "32,64,128 at cpu); one column of the figure can be run alone")
  parser.add_argument("--mixers", default=",".join(MQAR_MIXERS), help="mqar only: the rows of the figure")
  parser.add_argument("--learning_rate", type=float, default=None,
                      help=f"mqar only: one learning rate for every mixer at the cpu scale (default: "
                      f"{MQAR_CPU_LEARNING_RATE:g}, and attention the better of "
                      f"{' and '.join(f'{r:g}' for r in dict(MQAR_CPU_RATE_SWEEP)['attention'])} per cell)")
  parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help="runs at a time")
  parser.add_argument("--print_commands", action="store_true")
  parser.add_argument("--report_only", action="store_true", help="rewrite table, JSON and plot from the runs")
  args = parser.parse_args(argv)
  try:
    try:
      widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else None
    except ValueError as e:
      raise sweep_lib.SweepError(f"--widths={args.widths!r}: give comma-separated integers, e.g. 64,128") from e
    study = make_study(args.study, args.scale, tuple(s for s in args.settings.split(",") if s), widths,
                       tuple(m for m in args.mixers.split(",") if m), args.learning_rate)
    return reproduce(study, args.results_dir, print_commands=args.print_commands, report_only=args.report_only,
                     parallel=args.parallel)
  except sweep_lib.SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
