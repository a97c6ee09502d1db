r"""Grid sweeps over any config: one `seqjax.main` training run per point, one CSV and one plot of their results.

  python -m seqjax.sweep --config=configs/synthetic.py:mqar --workdir=sweeps/mqar \
      --grid "model.mixer=attention,mamba;model.d_model=64,128;optim.learning_rate=1e-3,3e-3" \
      [--set train.num_steps=500 --set data.name=mqar/len128_pairs8] [--parallel 2] \
      [--metric answer_accuracy] [--best_over optim.learning_rate] [--print_commands]

The grid is `KEY=V1,V2,...` terms separated by ";" (KEY a config field as in `--config.KEY=...`); a value that itself
holds commas (a hybrid mixer pattern) is written with "|" between the values: `model.mixer=attention|mamba,mamba,
attention`. Every point runs as `python -m seqjax.main --config=CONFIG --workdir=WORKDIR/RUN --config.KEY=VALUE ...`
in its own process (`--parallel N` at a time), where RUN names the point (`model.mixer=mamba,model.d_model=64`).
Before anything runs, every point's config is validated (a bad key, value or combination stops the sweep naming the
point). A run whose `final_metrics.json` exists is finished and skipped; any other run is started with the same
command, which resumes an interrupted run from its checkpoints — so rerunning the sweep after a kill continues it.
`--print_commands` prints the commands (one per line, for a cluster scheduler) and runs nothing.

At the end (also when some runs failed) WORKDIR/sweep.csv holds one row per point — the grid values, status
(finished / failed / missing) and every number of its final_metrics.json — and WORKDIR/sweep.png plots `--metric`
against the first grid key, one line per combination of the others. `--best_over KEY` (e.g. the learning rate) keeps,
for each combination of the other keys, the run with the best metric (the highest, or the lowest for loss-like
metrics), in WORKDIR/sweep_best.csv and in the plot. Exit status: 0 all finished, 1 a run failed, 2 a user error.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from absl import app, flags

from seqjax.config import ConfigError, from_config_dict

FINAL = "final_metrics.json"
_LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "seconds")


class SweepError(ValueError):
  """A sweep that cannot run: the message names the grid term, key or point and what to do."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid: its values (in grid order), its directory name and its command."""

  values: tuple[tuple[str, str], ...]
  name: str
  workdir: str
  command: tuple[str, ...]

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, FINAL))


# ----------------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------------


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
  """"k1=a,b;k2=c" -> [("k1", ["a", "b"]), ("k2", ["c"])] ("|" separates values that hold commas)."""
  if not text or not text.strip():
    raise SweepError('--grid is empty; write it as "KEY=V1,V2;KEY2=V3", e.g. "model.d_model=64,128"')
  grid, seen = [], set()
  for term in (t.strip() for t in text.split(";")):
    if not term:
      continue
    key, eq, values = (s.strip() for s in term.partition("="))
    if not eq or not key:
      raise SweepError(f"--grid term {term!r} has no KEY=VALUES; write it as KEY=V1,V2 (e.g. model.d_model=64,128)")
    key = key.removeprefix("config.")
    parts = [v.strip() for v in values.split("|" if "|" in values else ",")]
    if not values or any(not v for v in parts):
      raise SweepError(f"--grid term {term!r} has an empty value; list values separated by commas (or by | when a "
                       f"value holds commas)")
    if len(set(parts)) < len(parts):
      raise SweepError(f"--grid term {term!r} repeats a value")
    if key in seen:
      raise SweepError(f"--grid names {key!r} twice; put all its values in one term")
    seen.add(key)
    grid.append((key, parts))
  if not grid:
    raise SweepError('--grid has no terms; write it as "KEY=V1,V2;KEY2=V3"')
  return grid


def run_name(values: Sequence[tuple[str, str]]) -> str:
  """The directory name of a point: "key=value" pairs joined by "," ("/" in values becomes "-")."""
  return ",".join(f"{k}={v}".replace("/", "-").replace(os.sep, "-") for k, v in values)


def load_config_dict(spec: str) -> dict[str, Any]:
  """The plain dict of `configs/NAME.py[:variant]` (its get_config(variant))."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"--config: no file {path!r}")
  module_spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    cfg = module.get_config(variant or None)
  except ValueError as e:
    raise SweepError(f"--config={spec}: {e}") from e
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _parse_like(current: Any, text: str, key: str) -> Any:
  """`text` as the type of the field's current value (how `--config.KEY=text` is read)."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise SweepError(f"{key}={text!r}: expected true or false")
    return text.lower() in ("true", "1")
  if isinstance(current, (int, float)):
    try:
      number = float(text)
    except ValueError as e:
      raise SweepError(f"{key}={text!r}: expected a number") from e
    if isinstance(current, int):
      if not number.is_integer():
        raise SweepError(f"{key}={text!r}: expected an integer")
      return int(number)
    return number
  return text


def apply_values(cfg: dict[str, Any], values: Sequence[tuple[str, str]]) -> dict[str, Any]:
  """A copy of the config dict with KEY=VALUE strings set (each parsed as its field's type)."""
  cfg = json.loads(json.dumps(cfg))
  for key, text in values:
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, dict) or part not in node:
        fields = sorted(node) if isinstance(node, dict) else []
        close = difflib.get_close_matches(part, fields, n=1)
        where = ".".join(parts[:i]) or "the config"
        hint = f"; did you mean {'.'.join(parts[:i] + close)!r}?" if close else f"; fields of {where}: {fields}"
        raise SweepError(f"{key!r} is not a config field{hint}")
      if i == len(parts) - 1:
        node[part] = _parse_like(node[part], text, key)
      else:
        node = node[part]
  return cfg


def plan(config: str, workdir: str, grid: list[tuple[str, list[str]]], fixed: Sequence[str] = ()) -> list[Run]:
  """Every point of the grid as a Run, each config validated (SweepError naming the point) before any runs."""
  base = load_config_dict(config)
  fixed_values = []
  for item in fixed:
    key, eq, value = item.partition("=")
    if not eq:
      raise SweepError(f"--set {item!r}: write it as KEY=VALUE")
    fixed_values.append((key.strip().removeprefix("config."), value.strip()))
  runs = []
  for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in grid]):
    values = tuple(combo)
    try:
      from_config_dict(apply_values(base, fixed_values + list(values)))
    except ConfigError as e:
      raise SweepError(f"run {run_name(values)}: {e}") from e
    name = run_name(values)
    run_dir = os.path.join(workdir, name)
    command = (sys.executable, "-m", "seqjax.main", f"--config={config}", f"--workdir={run_dir}",
               *[f"--config.{k}={v}" for k, v in fixed_values + list(values)])
    runs.append(Run(values, name, run_dir, command))
  return runs


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


# glibc's malloc serves every allocation over 32 MB with a fresh mmap and unmaps it on free, and XLA:CPU allocates
# a step's temporaries anew on every execution: each step then page-faults its large buffers in again (on this
# machine ~35 ms per 67 MB, the memset of a [64, 64, 256, 16] scan buffer). One arena that never maps or trims
# keeps the pages: MQAR train steps at width 128 measured 15-27% faster (attention 131 -> 106 ms, Mamba 543 ->
# 436, S4D 115 -> 83), runs side by side 12-15%. Only the host's memory is concerned (no effect on accelerators'
# buffers). A GLIBC_TUNABLES already in the environment is kept as it is.
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:"
                   "glibc.malloc.top_pad=268435456")


def run_environment(env: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a run's process: `env` (default: this process's) with `MALLOC_TUNABLES` unless it sets
  GLIBC_TUNABLES itself."""
  env = dict(os.environ if env is None else env)
  env.setdefault("GLIBC_TUNABLES", MALLOC_TUNABLES)
  return env


def start_run(run: Run) -> subprocess.Popen:
  """Starts a run's process (environment: `run_environment()`), its output appended to WORKDIR/RUN/sweep_run.log
  (the child holds the file open)."""
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, "sweep_run.log"), "a", encoding="utf-8") as log:
    return subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT, env=run_environment())


def execute(runs: Sequence[Run], parallel: int = 1, launch: Callable[[Run], Any] = start_run,
            echo: Callable[[str], None] = print) -> dict[str, str]:
  """Runs the unfinished runs, `parallel` at a time; {run name: "finished" | "skipped" | "failed (exit N)"}.

  `launch(run)` starts a run and returns an object with `wait()` and `poll()` (a Popen; tests pass fakes)."""
  if parallel < 1:
    raise SweepError(f"--parallel must be >= 1, got {parallel}")
  status, queue, active = {}, [], []
  for run in runs:
    if run.finished:
      status[run.name] = "skipped"
      echo(f"[sweep] {run.name}: finished before, skipped")
    else:
      queue.append(run)
  while queue or active:
    while queue and len(active) < parallel:
      run = queue.pop(0)
      resuming = os.path.isdir(os.path.join(run.workdir, "checkpoints"))
      echo(f"[sweep] {run.name}: {'resuming' if resuming else 'starting'}\n  {shlex.join(run.command)}")
      active.append((run, launch(run), time.monotonic()))
    for item in list(active):
      run, proc, began = item
      code = proc.poll()
      if code is None:
        continue
      active.remove(item)
      ok = code == 0 and run.finished
      status[run.name] = "finished" if ok else f"failed (exit {code})"
      echo(f"[sweep] {run.name}: {status[run.name]} in {time.monotonic() - began:.0f} s"
           + ("" if ok else f"; see {os.path.join(run.workdir, 'sweep_run.log')}"))
    if active:
      time.sleep(0.2)
  return status


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


def collect(runs: Sequence[Run]) -> list[dict[str, Any]]:
  """One row per run: its grid values, status, and the numbers of its final_metrics.json."""
  rows = []
  for run in runs:
    row: dict[str, Any] = dict(run.values)
    path = os.path.join(run.workdir, FINAL)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        final = json.load(f)
      row["status"] = "finished"
      row.update({k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    else:
      row["status"] = "started" if os.path.isdir(run.workdir) else "missing"
    rows.append(row)
  return rows


def default_metric(rows: Sequence[dict[str, Any]]) -> str:
  for name in ("answer_accuracy", "accuracy", "loss"):
    if any(name in r for r in rows):
      return name
  return "loss"


def best_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str], over: str, metric: str) -> list[dict[str, Any]]:
  """For each combination of the grid keys other than `over`, the finished row with the best `metric`."""
  if over not in keys:
    raise SweepError(f"--best_over={over!r} is not a grid key; grid keys: {', '.join(keys)}")
  lower = any(word in metric for word in _LOWER_IS_BETTER)
  groups: dict[tuple, dict[str, Any]] = {}
  for row in rows:
    if row.get("status") != "finished" or metric not in row:
      continue
    group = tuple(row[k] for k in keys if k != over)
    best = groups.get(group)
    if best is None or (row[metric] < best[metric] if lower else row[metric] > best[metric]):
      groups[group] = row
  return list(groups.values())


def write_csv(path: str, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
  columns = list(keys) + ["status"]
  columns += sorted({c for r in rows for c in r} - set(columns))
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def plot(path: str, rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str, title: str) -> None:
  """`metric` against the first grid key, one line per combination of the others (finished runs only)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  x_key, others = keys[0], list(keys[1:])
  xs = list(dict.fromkeys(r[x_key] for r in rows))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  lines: dict[tuple, list[tuple[int, float]]] = {}
  for row in rows:
    if row.get("status") == "finished" and metric in row:
      lines.setdefault(tuple(row.get(k, "") for k in others), []).append((xs.index(row[x_key]), row[metric]))
  for label, points in sorted(lines.items()):
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-",
            label=", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, label)) or metric)
  ax.set_xticks(range(len(xs)), xs)
  ax.set(xlabel=x_key, ylabel=metric, title=title)
  ax.grid(alpha=0.3)
  if lines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(workdir: str, runs: Sequence[Run], keys: Sequence[str], metric: str | None = None,
           best_over: str | None = None) -> dict[str, str]:
  """Writes sweep.csv, sweep.png (and sweep_best.csv with `best_over`); returns their paths."""
  rows = collect(runs)
  metric = metric or default_metric(rows)
  os.makedirs(workdir, exist_ok=True)
  out = {"csv": os.path.join(workdir, "sweep.csv"), "plot": os.path.join(workdir, "sweep.png")}
  write_csv(out["csv"], rows, keys)
  shown, title = rows, f"{metric} ({sum(r['status'] == 'finished' for r in rows)}/{len(rows)} runs finished)"
  if best_over:
    shown = best_rows(rows, keys, best_over, metric)
    out["best_csv"] = os.path.join(workdir, "sweep_best.csv")
    write_csv(out["best_csv"], shown, keys)
    keys = [k for k in keys if k != best_over]
    title += f", best over {best_over}"
  if keys:
    plot(out["plot"], shown, keys, metric, title)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Entry
# ----------------------------------------------------------------------------------------------------------------


def sweep(config: str, workdir: str, grid_text: str, *, fixed: Sequence[str] = (), parallel: int = 1,
          metric: str | None = None, best_over: str | None = None, print_commands: bool = False,
          launch: Callable[[Run], Any] = start_run, echo: Callable[[str], None] = print) -> int:
  """The whole sweep (importable; tests pass a fake `launch`). Returns the exit status (0 ok, 1 a run failed)."""
  grid = parse_grid(grid_text)
  keys = [k for k, _ in grid]
  if best_over and best_over.removeprefix("config.") not in keys:
    raise SweepError(f"--best_over={best_over!r} is not a grid key; grid keys: {', '.join(keys)}")
  runs = plan(config, os.path.abspath(workdir), grid, fixed)
  if print_commands:
    for run in runs:
      echo(shlex.join(run.command))
    return 0
  status = execute(runs, parallel, launch, echo)
  out = report(os.path.abspath(workdir), runs, keys, metric, best_over and best_over.removeprefix("config."))
  failed = [name for name, s in status.items() if s.startswith("failed")]
  echo(f"[sweep] {len(runs) - len(failed)}/{len(runs)} runs finished; " + ", ".join(f"{k}: {v}" for k, v in
                                                                                     out.items()))
  return 1 if failed else 0


def define_flags() -> None:
  """The command line's flags (defined only when run as a program: importing this module next to seqjax.main,
  which owns --config and --workdir, must not clash)."""
  flags.DEFINE_string("config", None, "configs/NAME.py[:variant], as for seqjax.main.")
  flags.DEFINE_string("workdir", None, "The sweep's directory: one sub-directory per run, sweep.csv, sweep.png.")
  flags.DEFINE_string("grid", None, 'e.g. "model.mixer=attention,mamba;model.d_model=64,128".')
  flags.DEFINE_multi_string("set", [], "KEY=VALUE set in every run (repeatable).")
  flags.DEFINE_integer("parallel", 1, "Runs at a time.")
  flags.DEFINE_string("metric", None, "The final metric plotted (default: answer_accuracy, accuracy or loss, the "
                      "first that the runs report).")
  flags.DEFINE_string("best_over", None, "A grid key to pick the best run over (e.g. optim.learning_rate).")
  flags.DEFINE_bool("print_commands", False, "Print one command per run and exit.")


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; see python -m seqjax.sweep --help", file=sys.stderr)
    sys.exit(2)
  if not (f.config and f.workdir and f.grid):
    print("error: --config, --workdir and --grid are required (python -m seqjax.sweep --help)", file=sys.stderr)
    sys.exit(2)
  try:
    sys.exit(sweep(f.config, f.workdir, f.grid, fixed=f.set, parallel=f.parallel, metric=f.metric,
                   best_over=f.best_over, print_commands=f.print_commands))
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
