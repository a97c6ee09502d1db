"""The conformance harness: does a registered mixer keep the promises of the mixer contract?

    python -m seqjax.conformance mamba2            # every check, then time and memory against length (PNG)
    python -m seqjax.conformance all --quick       # every check on every registered mixer, one table row each

or from Python / pytest:

    report = seqjax.conformance.run("my_mixer", quick=True)
    assert report.passed, report.table()

The checks (`seqjax.conformance.checks`, each in units of the output's scale):
  causal     perturbing the future changes no earlier output, and no gradient flows backwards in time;
  packing    each packed document (positions restarting, padding at the end) gives what it gives alone, and no
             gradient crosses a document boundary;
  modes      every mode the mixer declared at registration (`register_mixer(..., modes=...)`) gives the same
             outputs and gradients;
  decode     prefill + step = the parallel forward (from a prefilled state and from `init_state`);
  gradients  reverse-mode gradients w.r.t. inputs and parameters = central finite differences (float64);
  jit        not jitted = jitted;
  sharded    the batch sharded over all devices = one device;
  bfloat16   bfloat16 compute stays finite and within bfloat16 rounding of float32;
  kernels    the native CPU kernels = the portable JAX program (on the CPU).
Without --quick the harness also measures the mixer's time and memory against length (`seqjax.conformance.profile`).
A new mixer passes when its row has no "FAIL". docs/conformance.md walks through it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

from seqjax.config import AttentionConfig, ModelConfig, SparseAttentionConfig, SsmConfig, override
from seqjax.conformance.checks import CHECKS, FAIL, NA, PASS, CheckResult, Subject, Tolerances

__all__ = ["CHECKS", "CheckResult", "Report", "Tolerances", "default_config", "run", "table", "with_recall"]


def default_config(name: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """The tiny configuration the checks run a mixer at: width 16, two heads, rotary positions (so packed
  positions matter), SSM state 4 and chunk 4 (which does not divide the length 13: a partial last chunk); sparse
  patterns of window 4, random blocks of 2 tokens, LSH chunks of 3 tokens and a Linformer projection to 8 rows."""
  cfg = ModelConfig(mixer=name, d_model=16, num_layers=1, mlp_dim=32, vocab_size=8, max_len=32, positions="rope",
                    attention=AttentionConfig(num_heads=2), ssm=SsmConfig(state=4, head_dim=8, chunk=4),
                    sparse=SparseAttentionConfig(window=4, block_size=2, chunk=3, projected_len=8))
  return override(cfg, overrides) if overrides else cfg


@dataclasses.dataclass(frozen=True)
class Report:
  mixer: str
  results: tuple[CheckResult, ...]
  seconds: float
  recall: Any = None  # a `recall.RecallResult` when the training smoke run ran (`--train`)

  @property
  def passed(self) -> bool:
    return all(r.passed for r in self.results)

  def failures(self) -> list[CheckResult]:
    return [r for r in self.results if not r.passed]


def run(name: str, *, quick: bool = True, overrides: Mapping[str, Any] | None = None,
        checks: Sequence[str] | None = None, tolerances: Tolerances = Tolerances()) -> Report:
  """Runs the checks (all of `CHECKS` by default) on the registered mixer `name` and returns its report.

  `overrides` are `ModelConfig` overrides applied to `default_config(name)` (e.g. a mixer's own section).
  An exception inside a check is a failure of that check, reported with its message. Raises ValueError for an
  unknown mixer or check name before anything runs. `quick` compiles the checks' programs with XLA's CPU
  optimisations off (`checks.QUICK_COMPILER_OPTIONS`: the same checks, compiled several times faster);
  `python -m seqjax.conformance` also profiles against length unless it is set.
  """
  from seqjax.nn.mixers import available_mixers  # pylint: disable=import-outside-toplevel
  if name not in available_mixers():
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(available_mixers())}. Register "
                     f"yours with @seqjax.nn.mixers.register_mixer (docs/conformance.md)")
  names = list(checks) if checks is not None else list(CHECKS)
  unknown = [c for c in names if c not in CHECKS]
  if unknown:
    raise ValueError(f"unknown check(s) {', '.join(unknown)}; checks: {', '.join(CHECKS)}")
  start = time.perf_counter()
  subject = Subject(name, default_config(name, overrides), quick=quick)
  results = []
  for check in names:
    try:
      results.append(CHECKS[check](subject, tolerances))
    except Exception as e:  # pylint: disable=broad-except
      results.append(CheckResult(check, FAIL, float("inf"), f"raised {type(e).__name__}: {e}"))
  return Report(name, tuple(results), time.perf_counter() - start)


def with_recall(report: Report, recall: Any) -> Report:
  """The report with the associative-recall smoke run's result (`seqjax.conformance.recall.train_recall`), shown
  in the table's "recall" column."""
  return dataclasses.replace(report, recall=recall)


_MARK = {PASS: "ok", FAIL: "FAIL", NA: "-"}


def table(reports: Sequence[Report]) -> str:
  """One row per mixer: each check's verdict with its error, then the time; failures explained underneath."""
  checks = list(dict.fromkeys(r.check for report in reports for r in report.results))
  widths = [max(len(c), 8) for c in checks]
  width = max([len("mixer")] + [len(r.mixer) for r in reports])
  recall = any(report.recall is not None for report in reports)
  header = f"{'mixer':<{width}} | " + " | ".join(f"{c:>{w}}" for c, w in zip(checks, widths)) + " | seconds"
  header += " | recall (answer accuracy)" if recall else ""
  lines = [header, "-" * len(header)]
  for report in reports:
    by_check = {r.check: r for r in report.results}
    cells = []
    for c, w in zip(checks, widths):
      r = by_check.get(c)
      text = "" if r is None else _MARK[r.status] + (f" {r.error:.0e}" if r.status == PASS else "")
      cells.append(f"{text:>{w}}")
    row = f"{report.mixer:<{width}} | " + " | ".join(cells) + f" | {report.seconds:7.1f}"
    if recall:
      row += " | " + (report.recall.cell() if report.recall is not None else "")
    lines.append(row)
  for report in reports:
    for r in report.failures():
      lines.append(f"FAIL {report.mixer}/{r.check}: {r.detail}")
  return "\n".join(lines)
