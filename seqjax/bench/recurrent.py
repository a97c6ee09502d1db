"""Benchmark: `seqjax.ops.recurrent.lstm` against `flax.linen.RNN(OptimizedLSTMCell)` (and `gru` against
`flax.linen.RNN(GRUCell)`).

Measured side by side in one run, same weights, float32:
  * time of the forward and of forward+backward (gradients w.r.t. x and all weights), median of
    `--repeats` timed calls after a warm-up, `jax.block_until_ready` around each call;
  * memory of the backward pass against T, from XLA's compiled memory analysis
    (`jax.jit(f).lower(...).compile().memory_analysis()`: temp + output bytes of the
    forward+backward program), for seqjax (default and `remat=True`) and Flax.
Writes `recurrent.json` and `recurrent.png` to `--results_dir` (default results/recurrent/).

    python -m seqjax.bench.recurrent            # or: python -m seqjax.bench lstm
    python -m seqjax.bench.recurrent --repeats 5 --mem_lengths 128,256,512
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _time(fn: Callable, *args, repeats: int) -> float:
  """Median wall time in ms of `fn(*args)` after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def _time_interleaved(cases: dict, x, repeats: int) -> dict[str, float]:
  """Median ms per case; the cases take turns so a shared CPU's load affects all alike."""
  for fn, params in cases.values():
    for _ in range(2):
      jax.block_until_ready(fn(params, x))
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, params) in cases.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, x))
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _flax_layer(hidden: int):
  import flax.linen as nn
  return nn.RNN(nn.OptimizedLSTMCell(hidden))


def _flax_params_to_torch_layout(params):
  """Flax OptimizedLSTMCell params -> (w_ih [4H, I], w_hh [4H, H], b_ih, b_hh), gates i, f, g, o."""
  cell = params["params"]["cell"]
  w_ih = jnp.concatenate([cell["i" + g]["kernel"] for g in "ifgo"], axis=1).T
  w_hh = jnp.concatenate([cell["h" + g]["kernel"] for g in "ifgo"], axis=1).T
  b_hh = jnp.concatenate([cell["h" + g]["bias"] for g in "ifgo"])
  return w_ih, w_hh, jnp.zeros_like(b_hh), b_hh


def _functions(batch: int, hidden: int):
  """The Flax layer and a dict name -> jitted fn(params, x): forward and forward+backward of seqjax's `lstm` (the
  default dispatch, i.e. the C++ kernel on a CPU; also with remat=True), of its `lax.scan` kernel (CPU kernels off)
  and of the Flax layer."""
  from seqjax.ops import backend, recurrent

  layer = _flax_layer(hidden)

  def ours(w, x, **kw):
    z = jnp.zeros((x.shape[0], hidden), jnp.float32)
    return recurrent.lstm(x, z, z, *w, **kw)[0]

  def loss(f):
    return lambda w, x: jnp.sum(f(w, x) ** 2)

  def fwd_bwd(f):
    return jax.jit(jax.grad(loss(f), argnums=(0, 1)))

  def scan(w, x):  # the lax.scan kernel: traced with the CPU kernels off
    with backend.cpu_kernels_mode("off"):
      return ours(w, x)

  remat = lambda w, x: ours(w, x, remat=True)  # noqa: E731
  return layer, {
      "flax_fwd": jax.jit(layer.apply), "seqjax_fwd": jax.jit(ours), "seqjax_scan_fwd": jax.jit(scan),
      "flax_fwd_bwd": fwd_bwd(layer.apply), "seqjax_fwd_bwd": fwd_bwd(ours),
      "seqjax_scan_fwd_bwd": fwd_bwd(scan), "seqjax_fwd_bwd_remat": fwd_bwd(remat)}


def _gru_functions(hidden: int):
  """The same comparison for the GRU: flax.linen.RNN(GRUCell) against seqjax's `gru` (default and scan)."""
  import flax.linen as nn
  from seqjax.ops import backend, recurrent

  layer = nn.RNN(nn.GRUCell(hidden))

  def ours(w, x, **kw):
    return recurrent.gru(x, jnp.zeros((x.shape[0], hidden), jnp.float32), *w, **kw)[0]

  def fwd_bwd(f):
    return jax.jit(jax.grad(lambda w, x: jnp.sum(f(w, x) ** 2), argnums=(0, 1)))

  def scan(w, x):  # the lax.scan kernel: traced with the CPU kernels off
    with backend.cpu_kernels_mode("off"):
      return ours(w, x)

  return layer, {"flax_gru_fwd": jax.jit(layer.apply), "seqjax_gru_fwd": jax.jit(ours),
                 "flax_gru_fwd_bwd": fwd_bwd(layer.apply), "seqjax_gru_fwd_bwd": fwd_bwd(ours),
                 "seqjax_gru_scan_fwd_bwd": fwd_bwd(scan)}


def _flax_gru_params_to_torch_layout(params):
  """Flax GRUCell params -> (w_ih [3H, I], w_hh [3H, H], b_ih, b_hh), gates r, z, n (b_hn = Flax's hn bias)."""
  cell = params["params"]["cell"]
  w_ih = jnp.concatenate([cell["i" + g]["kernel"] for g in "rzn"], axis=1).T
  w_hh = jnp.concatenate([cell["h" + g]["kernel"] for g in "rzn"], axis=1).T
  b_ih = jnp.concatenate([cell["i" + g]["bias"] for g in "rzn"])
  b_hh = jnp.concatenate([jnp.zeros_like(cell["hn"]["bias"])] * 2 + [cell["hn"]["bias"]])
  return w_ih, w_hh, b_ih, b_hh


def _bytes(compiled) -> int | None:
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def run(batch: int, seq_len: int, features: int, repeats: int, mem_lengths: Sequence[int],
        check: bool = True) -> dict:
  from seqjax.ops import backend
  key = jax.random.PRNGKey(0)
  layer, fns = _functions(batch, features)
  x = jax.random.normal(key, (batch, seq_len, features), jnp.float32)
  flax_params = layer.init(key, x)
  w = _flax_params_to_torch_layout(flax_params)
  if check:  # same weights, same function
    want = fns["flax_fwd"](flax_params, x)
    for name in ("seqjax_fwd", "seqjax_scan_fwd"):
      err = float(jnp.max(jnp.abs(fns[name](w, x) - want)))
      if err > 1e-4:
        raise AssertionError(f"{name} and the Flax LSTM disagree by {err}")
  kernel = "native" if backend.cpu_kernel("recurrent") is not None and jax.default_backend() == "cpu" else "lax.scan"
  print(f"  seqjax_* = the default dispatch ({kernel} kernel); seqjax_scan_* = the lax.scan kernel (CPU kernels off)",
        flush=True)

  cases = {name: (fn, flax_params if name.startswith("flax") else w) for name, fn in fns.items()}
  gru_layer, gru_fns = _gru_functions(features)
  gru_params = gru_layer.init(key, x)
  w_gru = _flax_gru_params_to_torch_layout(gru_params)
  if check:
    err = float(jnp.max(jnp.abs(gru_fns["seqjax_gru_fwd"](w_gru, x) - gru_fns["flax_gru_fwd"](gru_params, x))))
    if err > 1e-4:
      raise AssertionError(f"seqjax and the Flax GRU disagree by {err}")
  cases.update({name: (fn, gru_params if name.startswith("flax") else w_gru) for name, fn in gru_fns.items()})
  timing = _time_interleaved(cases, x, repeats=repeats)
  for name, ms in timing.items():
    print(f"  {name:22s} {ms:8.2f} ms", flush=True)
  # Roofline: an LSTM forward is 2 matmuls of [B*T, H] x [H, 4H] FLOPs (input + recurrent), the
  # forward+backward 6 (+ dx, dW_ih, dh, dW_hh). Time them as one big matmul with XLA's dot (a reference point, not
  # a bound: the native kernel's cache-resident matmuls run faster than XLA's large dot on a CPU).
  a = jax.random.normal(key, (batch * seq_len, features), jnp.float32)
  bmat = jax.random.normal(key, (features, 4 * features), jnp.float32)
  matmul_ms = _time(jax.jit(jnp.matmul), a, bmat, repeats=repeats)
  timing["one_big_matmul"] = matmul_ms
  floor = {"fwd": 2 * matmul_ms, "fwd_bwd": 6 * matmul_ms}
  print(f"  {'one [B*T,H]x[H,4H] matmul':22s} {matmul_ms:8.2f} ms -> compute floor: forward "
        f"{floor['fwd']:.1f} ms, forward+backward {floor['fwd_bwd']:.1f} ms", flush=True)
  ratios = {"fwd": timing["flax_fwd"] / timing["seqjax_fwd"],
            "fwd_bwd": timing["flax_fwd_bwd"] / timing["seqjax_fwd_bwd"],
            "fwd_bwd_remat": timing["flax_fwd_bwd"] / timing["seqjax_fwd_bwd_remat"],
            "scan_fwd": timing["flax_fwd"] / timing["seqjax_scan_fwd"],
            "scan_fwd_bwd": timing["flax_fwd_bwd"] / timing["seqjax_scan_fwd_bwd"],
            "gru_fwd": timing["flax_gru_fwd"] / timing["seqjax_gru_fwd"],
            "gru_fwd_bwd": timing["flax_gru_fwd_bwd"] / timing["seqjax_gru_fwd_bwd"],
            "gru_scan_fwd_bwd": timing["flax_gru_fwd_bwd"] / timing["seqjax_gru_scan_fwd_bwd"],
            "max_possible_fwd": timing["flax_fwd"] / floor["fwd"],
            "max_possible_fwd_bwd": timing["flax_fwd_bwd"] / floor["fwd_bwd"]}

  memory_cases = {"seqjax": "seqjax_fwd_bwd", "seqjax_scan": "seqjax_scan_fwd_bwd",
                  "seqjax_remat": "seqjax_fwd_bwd_remat", "flax": "flax_fwd_bwd"}
  memory = {"T": list(mem_lengths), **{name: [] for name in memory_cases}}
  for t in mem_lengths:
    xt = jax.ShapeDtypeStruct((batch, t, features), jnp.float32)
    for name, case in memory_cases.items():
      fn, params = cases[case]
      memory[name].append(_bytes(fn.lower(params, xt).compile()))
  # Linearity: bytes per step from a least-squares line, and the worst relative deviation.
  for name in memory_cases:
    ys = memory[name]
    if None in ys or len(ys) < 2:
      continue
    slope, intercept = np.polyfit(memory["T"], ys, 1)
    fit = slope * np.asarray(memory["T"]) + intercept
    memory[f"{name}_bytes_per_step"] = float(slope)
    memory[f"{name}_max_rel_dev_from_line"] = float(np.max(np.abs(fit - ys) / np.asarray(ys)))

  return {
      "config": {"batch": batch, "seq_len": seq_len, "input": features, "hidden": features,
                 "dtype": "float32", "repeats": repeats, "seqjax_kernel": kernel},
      "time_ms": timing, "speedup_vs_flax": ratios,
      "compute_floor_ms": floor,
      "memory_method": "XLA compiled memory_analysis(): temp + output bytes of the jitted "
                       "forward+backward (grad w.r.t. x and weights); the native kernel's own scratch "
                       "(packed W_hh and per-thread step buffers, independent of T) is not included",
      "memory_bytes": memory,
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "cpu_count": os.cpu_count(), "python": platform.python_version()},
  }


def _plot(result: dict, path: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  t = result["time_ms"]
  labels = ["forward", "forward+backward"]
  xs = np.arange(2)
  k = result["config"].get("seqjax_kernel", "native")
  bars = ((["flax_fwd", "flax_fwd_bwd"], "flax RNN(OptimizedLSTMCell)"),
          (["seqjax_fwd", "seqjax_fwd_bwd"], f"seqjax lstm ({k})"),
          (["seqjax_scan_fwd", "seqjax_scan_fwd_bwd"], "seqjax lstm, lax.scan"),
          ([None, "seqjax_fwd_bwd_remat"], f"seqjax lstm ({k}), remat"))
  for n, (names, label) in enumerate(bars):
    ax1.bar(xs + 0.2 * (n - 1.5), [np.nan if a is None else t[a] for a in names], 0.2, label=label)
  ax1.set_xticks(xs, labels)
  ax1.set_ylabel("ms (median)")
  c = result["config"]
  ax1.set_title(f"LSTM B={c['batch']} T={c['seq_len']} I=H={c['hidden']} fp32")
  ax1.legend(fontsize=8)
  m = result["memory_bytes"]
  for name, label in (("flax", "flax"), ("seqjax", "seqjax"), ("seqjax_scan", "seqjax lax.scan"),
                      ("seqjax_remat", "seqjax remat")):
    if name in m and None not in m[name]:
      ax2.plot(m["T"], np.asarray(m[name]) / 2 ** 20, "o-", label=label)
  ax2.set_xlabel("T")
  ax2.set_ylabel("MiB (XLA temp + output)")
  ax2.set_title("forward+backward memory vs T")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m seqjax.bench.recurrent",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--results_dir", default="results/recurrent")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--features", type=int, default=256, help="input = hidden width")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--mem_lengths", default="128,256,512,1024,2048")
  args = parser.parse_args(list(argv) if argv is not None else None)
  try:
    mem_lengths = [int(v) for v in args.mem_lengths.split(",") if v]
  except ValueError:
    parser.error(f"--mem_lengths must be comma-separated integers, got {args.mem_lengths!r}")
  if min(args.batch, args.seq_len, args.features, args.repeats, *mem_lengths) < 1:
    parser.error("sizes and repeats must be >= 1")

  print(f"LSTM benchmark: B={args.batch} T={args.seq_len} I=H={args.features} float32, "
        f"median of {args.repeats}", flush=True)
  result = run(args.batch, args.seq_len, args.features, args.repeats, mem_lengths)
  r = result["speedup_vs_flax"]
  print(f"speedup vs flax: forward {r['fwd']:.2f}x, forward+backward {r['fwd_bwd']:.2f}x "
        f"(remat {r['fwd_bwd_remat']:.2f}x); target >= 1.5x")
  print(f"  lax.scan kernel: forward {r['scan_fwd']:.2f}x, forward+backward {r['scan_fwd_bwd']:.2f}x")
  print(f"GRU vs flax RNN(GRUCell): forward {r['gru_fwd']:.2f}x, forward+backward {r['gru_fwd_bwd']:.2f}x "
        f"(lax.scan kernel {r['gru_scan_fwd_bwd']:.2f}x)")
  f = result["compute_floor_ms"]
  t = result["time_ms"]
  print(f"against the XLA matmul floor (2 / 6 big matmuls): Flax takes {t['flax_fwd'] / f['fwd']:.2f}x / "
        f"{t['flax_fwd_bwd'] / f['fwd_bwd']:.2f}x of it, seqjax {t['seqjax_fwd'] / f['fwd']:.2f}x / "
        f"{t['seqjax_fwd_bwd'] / f['fwd_bwd']:.2f}x")
  m = result["memory_bytes"]
  for name in ("seqjax", "seqjax_scan", "seqjax_remat", "flax"):
    if f"{name}_bytes_per_step" in m:
      print(f"backward memory {name:13s}: {m[name][-1] / 2 ** 20:8.1f} MiB at T={m['T'][-1]}, "
            f"{m[name + '_bytes_per_step'] / 2 ** 10:7.1f} KiB/step, max deviation from a line "
            f"{100 * m[name + '_max_rel_dev_from_line']:.1f}%")
  out = pathlib.Path(args.results_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "recurrent.json").write_text(json.dumps(result, indent=2))
  _plot(result, out / "recurrent.png")
  print(f"wrote {out / 'recurrent.json'} and {out / 'recurrent.png'}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
