"""Attention benchmark: time, achieved FLOP/s and peak memory against sequence length, one run, side by side.

    python -m seqjax.bench attention                       # full run (~5-10 min on 2 cores)
    python -m seqjax.bench attention --lengths 512,1024 --long_len 0 --repeats 2   # quick look

Implementations: "reference" (materialised scores), "blockwise" (this repo's flash-style kernel as it runs on a
CPU: the C++ kernel of `seqjax.cpu_kernels.attention`), "blockwise_jax" (the same tiles as a JAX program, what
GPUs/TPUs run: "blockwise" traced under `seqjax.ops.backend.cpu_kernels_mode("off")`) and "xla"
(`jax.nn.dot_product_attention`, implementation chosen by XLA). Setting of the issue: float32, B=1, N=8, H=64,
causal. Modes: "fwd" (forward) and "fwd+bwd" (forward and the gradients of q, k, v).

Method. Every (implementation, mode, T) case runs in a fresh subprocess: jit, one warm-up call, then the median of
`--repeats` timed calls (`jax.block_until_ready`). Peak memory is `ru_maxrss` of that subprocess minus the
`ru_maxrss` of a baseline subprocess that does everything except the attention call (same imports, same inputs);
XLA's compiled memory analysis (temp + output bytes) is reported too. Dense implementations above
`--dense_max_len` are not run (they need many GiB); their compiled memory requirement is still reported.

FLOP accounting (honest, "useful" FLOPs): only visible query-key pairs count, P = B * T (T + 1) / 2 for causal;
forward = 4 N H P (two matmuls), forward+backward = 3x forward (the backward's four gradient matmuls, no credit for
recomputing the scores). The same count is used for every implementation, so dense kernels that also compute
the masked half get no credit for it. The roofline is a dense float32 [M, M] @ [M, M] matmul, timed at the start
and again inside every case's subprocess just before the attention (the CPU is shared, so each case's FLOP/s is
compared with the matmul measured under the same load).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("reference", "blockwise", "blockwise_jax", "xla")
TILED = ("blockwise", "blockwise_jax")  # linear-memory implementations, run at every length
MODES = ("fwd", "fwd+bwd")
B, N, H = 1, 8, 64


def _case_fn(impl: str, mode: str):
  import jax
  import jax.numpy as jnp
  from seqjax.ops import attention, backend

  if impl == "xla":
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
  elif impl == "blockwise_jax":  # the JAX tiles: blockwise traced with the CPU kernels off
    def attend(q, k, v):
      with backend.cpu_kernels_mode("off"):
        return attention.blockwise_attention(q, k, v, causal=True)
  else:
    fn = attention.get_attention(impl)
    attend = lambda q, k, v: fn(q, k, v, causal=True)  # noqa: E731
  if mode == "fwd":
    return jax.jit(attend)
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))


def _inputs(T: int):
  import jax
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(key, (B, T, N, H)) for key in (kq, kk, kv))


def _max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(impl: str, mode: str, T: int, repeats: int, execute: bool, matmul_size: int) -> dict:
  """Runs one case in this process; returns its measurements. `impl == "baseline"` measures the harness only."""
  import jax
  import numpy as np

  args = _inputs(T)
  jax.block_until_ready(args)
  if impl == "baseline":  # everything a case does except the attention itself
    run_matmul(matmul_size, 1)
    f = jax.jit(lambda q, k, v: q + k + v)
    jax.block_until_ready(f(*args))
    return {"max_rss": _max_rss_bytes()}
  t0 = time.perf_counter()
  compiled = _case_fn(impl, mode).lower(*args).compile()
  result = {"compile_s": time.perf_counter() - t0}
  try:
    analysis = compiled.memory_analysis()
    result["xla_temp_bytes"] = int(analysis.temp_size_in_bytes)
    result["xla_output_bytes"] = int(analysis.output_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # memory analysis is best-effort on some backends
    pass
  if execute:
    # The CPU is shared: time the roofline matmul right here too, so each ratio compares like with like.
    result["matmul_gflops"] = run_matmul(matmul_size, 3)["gflops"]
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - t0)
    result.update(seconds=float(np.median(times)), all_seconds=times)
  result["max_rss"] = _max_rss_bytes()
  return result


def run_matmul(size: int, repeats: int) -> dict:
  import jax
  import numpy as np
  x = jax.random.normal(jax.random.key(0), (size, size))
  f = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(f(x, x))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x, x))
    times.append(time.perf_counter() - t0)
  seconds = float(np.median(times))
  return {"size": size, "seconds": seconds, "gflops": 2 * size ** 3 / seconds / 1e9}


def useful_flops(T: int, mode: str) -> float:
  forward = 4.0 * N * H * B * T * (T + 1) / 2
  return forward if mode == "fwd" else 3.0 * forward


def _subprocess(args: list[str]) -> dict:
  root = str(Path(__file__).resolve().parents[2])
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "seqjax.bench", "attention", *args], capture_output=True, text=True,
                        env=env, check=False)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(x: float | None) -> str:
  return "-" if x is None else f"{x / 2 ** 30:.2f}"


def _plot(results: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for impl in IMPLEMENTATIONS:
    for mode, style in zip(MODES, ("--", "-")):
      rows = [r for r in results["cases"] if r["impl"] == impl and r["mode"] == mode and "seconds" in r]
      if rows:
        Ts = [r["T"] for r in rows]
        axes[0].plot(Ts, [r["seconds"] for r in rows], style, marker="o", label=f"{impl} {mode}")
        axes[1].plot(Ts, [r["gflops"] for r in rows], style, marker="o", label=f"{impl} {mode}")
      rows = [r for r in results["cases"] if r["impl"] == impl and r["mode"] == mode and "peak_bytes" in r]
      if rows:
        axes[2].plot([r["T"] for r in rows], [r["peak_bytes"] / 2 ** 30 for r in rows], style, marker="o",
                     label=f"{impl} {mode}")
  axes[1].axhline(results["matmul"]["gflops"], color="k", lw=0.8, label="dense matmul (start of run)")
  axes[1].axhline(results["matmul"]["gflops"] / 2, color="k", lw=0.8, ls=":", label="half of matmul")
  for ax, title in zip(axes, ("time [s]", "useful GFLOP/s", "peak memory [GiB] (ru_maxrss - baseline)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[2].set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"causal attention, float32, B={B} N={N} H={H} (CPU)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def orchestrate(flags: argparse.Namespace) -> dict:
  lengths = [int(x) for x in flags.lengths.split(",") if x]
  out_dir = Path(flags.results_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  results: dict = {"setting": {"B": B, "N": N, "H": H, "dtype": "float32", "causal": True,
                               "repeats": flags.repeats, "memory": "ru_maxrss(case) - ru_maxrss(baseline), "
                               "fresh subprocess per case; XLA memory_analysis reported alongside"},
                   "cases": []}
  results["matmul"] = _subprocess(["--_matmul", str(flags.matmul_size), "--repeats", "5"])
  print(f"dense matmul {flags.matmul_size}^3: {results['matmul'].get('gflops', float('nan')):.1f} GFLOP/s",
        flush=True)
  baselines: dict[int, int] = {}
  plan = [(impl, mode, T) for T in lengths for impl in IMPLEMENTATIONS for mode in MODES]
  if flags.long_len:
    plan.append(("blockwise", "fwd", flags.long_len))
  for impl, mode, T in plan:
    execute = impl in TILED or T <= flags.dense_max_len
    if T not in baselines:
      baselines[T] = _subprocess(["--_case", f"baseline:fwd:{T}", "--matmul_size", str(flags.matmul_size)]
                                 ).get("max_rss", 0)
    repeats = 1 if T >= 32768 else flags.repeats
    r = _subprocess(["--_case", f"{impl}:{mode}:{T}", "--repeats", str(repeats), "--matmul_size",
                     str(flags.matmul_size)] + ([] if execute else ["--_no_run"]))
    r.update(impl=impl, mode=mode, T=T)
    if "seconds" in r:
      r["gflops"] = useful_flops(T, mode) / r["seconds"] / 1e9
      r["fraction_of_matmul"] = r["gflops"] / r["matmul_gflops"]
      r["peak_bytes"] = max(0, r["max_rss"] - baselines[T])
    results["cases"].append(r)
    print(f"{impl:13s} {mode:7s} T={T:6d} "
          + (f"{r['seconds']:8.3f}s {r['gflops']:6.1f} GFLOP/s ({r['fraction_of_matmul']:.2f} of matmul "
             f"{r['matmul_gflops']:.0f}) peak {_gib(r['peak_bytes'])} GiB" if "seconds" in r
             else f"not run ({r.get('error', 'dense above --dense_max_len')})")
          + f"  xla temp {_gib(r.get('xla_temp_bytes'))} GiB", flush=True)
  results["summary"] = summarize(results)
  (out_dir / "results.json").write_text(json.dumps(results, indent=1))
  _plot(results, out_dir / "attention.png")
  print(json.dumps(results["summary"], indent=1))
  print(f"wrote {out_dir / 'results.json'} and {out_dir / 'attention.png'}")
  return results


def summarize(results: dict) -> dict:
  """The issue's targets, as measured."""
  def find(impl, mode, T):
    return next((r for r in results["cases"] if (r["impl"], r["mode"], r["T"]) == (impl, mode, T)), {})

  summary = {}
  for T in sorted({r["T"] for r in results["cases"]}):
    blk, xla = find("blockwise", "fwd+bwd", T), find("xla", "fwd+bwd", T)
    if "seconds" in blk and "seconds" in xla:
      summary[f"speedup_fwd+bwd_vs_xla_T{T}"] = xla["seconds"] / blk["seconds"]
    if "seconds" in blk:
      summary[f"blockwise_fwd+bwd_gflops_over_matmul_T{T}"] = blk["fraction_of_matmul"]
      summary[f"blockwise_fwd+bwd_peak_GiB_T{T}"] = blk["peak_bytes"] / 2 ** 30
    jax_tiles = find("blockwise_jax", "fwd+bwd", T)
    if "seconds" in blk and "seconds" in jax_tiles:
      summary[f"blockwise_native_over_jax_tiles_fwd+bwd_T{T}"] = jax_tiles["seconds"] / blk["seconds"]
      summary[f"blockwise_jax_fwd+bwd_gflops_over_matmul_T{T}"] = jax_tiles["fraction_of_matmul"]
    fwd = find("blockwise", "fwd", T)
    if "seconds" in fwd:
      summary[f"blockwise_fwd_gflops_over_matmul_T{T}"] = fwd["fraction_of_matmul"]
      summary[f"blockwise_fwd_seconds_T{T}"] = fwd["seconds"]
    if "xla_temp_bytes" in xla or "xla_temp_bytes" in find("xla", "fwd", T):
      summary[f"xla_fwd_compiled_temp_GiB_T{T}"] = find("xla", "fwd", T).get("xla_temp_bytes", 0) / 2 ** 30
  return summary


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m seqjax.bench attention", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results_dir", default="results/attention/")
  parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
  parser.add_argument("--dense_max_len", type=int, default=4096,
                      help="largest T at which the dense implementations (reference, xla) are run")
  parser.add_argument("--long_len", type=int, default=65536, help="extra blockwise forward-only length; 0 = none")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--_case", help=argparse.SUPPRESS)
  parser.add_argument("--_matmul", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--_no_run", action="store_true", help=argparse.SUPPRESS)
  flags = parser.parse_args(argv)
  if flags._case:  # pylint: disable=protected-access
    impl, mode, T = flags._case.split(":")  # pylint: disable=protected-access
    print(json.dumps(run_case(impl, mode, int(T), flags.repeats, execute=not flags._no_run,  # pylint: disable=protected-access
                              matmul_size=flags.matmul_size)))
  elif flags._matmul:  # pylint: disable=protected-access
    print(json.dumps(run_matmul(flags._matmul, flags.repeats)))  # pylint: disable=protected-access
  else:
    if flags.repeats < 1 or flags.dense_max_len < 0:
      parser.error("--repeats must be >= 1 and --dense_max_len >= 0")
    orchestrate(flags)
