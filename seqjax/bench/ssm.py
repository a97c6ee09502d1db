"""Benchmark of the SSM kernels: selective scan per mode vs the minimal-port baseline, SSD chunked vs its
recurrence, and decode step time vs context length. Writes `ssm.json` and `ssm.png` into --results_dir.

    python -m seqjax.bench.ssm --results_dir=results/ssm          # (later: python -m seqjax.bench ssm)
    python -m seqjax.bench.ssm --lengths=256,512 --repeats=3       # a quick look

Timing: every case is jitted, warmed up once, then the cases of one length run round-robin `--repeats` times and
the median is reported (round-robin keeps ratios fair on a shared CPU); before each timed call the process waits
until it is idle (`_settle`), so the release of the previous case's buffers is not charged to the next case. Memory: XLA's compiled memory analysis
(`jax.jit(f).lower(...).compile().memory_analysis()`, temp buffers + outputs) — what the program allocates
beyond its arguments, not RSS.

Baseline ("popular minimal port"): materialise exp(delta A) and delta B x as [B, L, E, P] for every step, then
`lax.associative_scan`, then contract with C — the formulation of the widely copied minimal Mamba ports.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from absl import flags
from jax import lax

from seqjax.nn import ssm as ssm_nn
from seqjax.ops import ssm

BATCH, WIDTH, STATE = 1, 512, 16           # selective scan: B, E, P
SSD_HEADS, SSD_HEAD_DIM, SSD_STATE = 8, 64, 64  # SSD: N, H, P (N * H = 512 = E)


def baseline_selective_scan(x, delta, A, B, C, D):
  """The minimal-port formulation: [B, L, E, P] operands, associative scan over L, read-out with C."""
  dA_BLEP = jnp.exp(delta[..., None] * A)
  dBx_BLEP = (delta * x)[..., None] * B[:, :, None, :]
  _, h_BLEP = lax.associative_scan(lambda p, q: (p[0] * q[0], q[0] * p[1] + q[1]), (dA_BLEP, dBx_BLEP), axis=1)
  return jnp.einsum("blep,blp->ble", h_BLEP, C) + D * x


def _selective_inputs(length):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  return (jax.random.normal(ks[0], (BATCH, length, WIDTH)),
          jax.nn.softplus(jax.random.normal(ks[1], (BATCH, length, WIDTH)) - 3.0),
          -jnp.exp(jax.random.normal(ks[2], (WIDTH, STATE))),
          jax.random.normal(ks[3], (BATCH, length, STATE)),
          jax.random.normal(ks[4], (BATCH, length, STATE)),
          jnp.ones((WIDTH,)))


def _ssd_inputs(length):
  ks = jax.random.split(jax.random.PRNGKey(1), 6)
  return (jax.random.normal(ks[0], (BATCH, length, SSD_HEADS, SSD_HEAD_DIM)),
          jax.nn.softplus(jax.random.normal(ks[1], (BATCH, length, SSD_HEADS)) - 3.0),
          -jnp.exp(jax.random.normal(ks[2], (SSD_HEADS,))),
          jax.random.normal(ks[3], (BATCH, length, SSD_STATE)),
          jax.random.normal(ks[4], (BATCH, length, SSD_STATE)),
          jnp.ones((SSD_HEADS,)))


def _fwd_and_fwdbwd(fn: Callable) -> dict[str, Callable]:
  """The forward, and forward+backward of a scalar loss w.r.t. every input (a fixed, non-trivial cotangent)."""
  def loss(*args):
    y = fn(*args)
    return jnp.sum(y * jnp.cos(jnp.arange(y.shape[1], dtype=y.dtype)).reshape((1, -1) + (1,) * (y.ndim - 2)))
  return {"fwd": fn, "fwdbwd": jax.grad(loss, argnums=tuple(range(6)))}


def _compile(fn, args):
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.memory_analysis()
  mem = None if analysis is None else int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
  return compiled, mem


def _settle(max_wait: float = 1.0, tick: float = 0.02, idle: float = 2e-3) -> None:
  """Waits (up to `max_wait` s) until this process is idle: its CPU time grows < `idle` s in a `tick` s sleep.

  XLA's CPU runtime releases a program's buffers on background threads after its result is ready; after a case
  with GiB-sized temporaries (the baseline's or the sequential scans' fwd+bwd) that release costs ~60 ms of system
  time, and without this wait it lands in the next case's timing (it made chunked selective_scan's forward at
  L = 4096 look 3-5x slower than at 2048 in earlier runs).
  """
  deadline = time.perf_counter() + max_wait
  last = time.process_time()
  while time.perf_counter() < deadline:
    time.sleep(tick)
    now = time.process_time()
    if now - last < idle:
      return
    last = now


def _time_round_robin(compiled: dict, args, repeats: int, settle_between: bool = True) -> dict:
  for fn in compiled.values():  # warm-up
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in compiled}
  _settle()
  for _ in range(repeats):
    for name, fn in compiled.items():
      if settle_between:
        _settle()
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _measure(kernel: str, impls: dict, args, length: int, repeats: int) -> tuple[list[dict], dict, dict]:
  """Compiles every impl's forward and forward+backward on `args`, times them round robin: (rows, times, memory),
  the last two keyed by (impl, "fwd" | "fwdbwd")."""
  compiled, memory = {}, {}
  for impl, fn in impls.items():
    for kind, f in _fwd_and_fwdbwd(fn).items():
      compiled[(impl, kind)], memory[(impl, kind)] = _compile(f, args)
  times = _time_round_robin(compiled, args, repeats)
  rows = [dict(kernel=kernel, impl=impl, pass_=kind, length=length, seconds=seconds, xla_bytes=memory[(impl, kind)])
          for (impl, kind), seconds in times.items()]
  return rows, times, memory


def bench_selective(lengths: Sequence[int], repeats: int, log) -> list[dict]:
  impls = {"baseline": baseline_selective_scan}
  for mode in ssm.MODES:
    impls[mode] = functools.partial(ssm.selective_scan, mode=mode)
  rows = []
  for length in lengths:
    new_rows, times, _ = _measure("selective_scan", impls, _selective_inputs(length), length, repeats)
    rows += new_rows
    log(f"selective_scan L={length:6d}  " + "  ".join(
        f"{impl}:{times[(impl, 'fwd')] * 1e3:.1f}/{times[(impl, 'fwdbwd')] * 1e3:.1f}ms" for impl in impls)
        + "   (fwd/fwd+bwd)")
  return rows


def bench_ssd(lengths: Sequence[int], repeats: int, log) -> list[dict]:
  impls = {mode: functools.partial(ssm.ssd, mode=mode) for mode in ssm.SSD_MODES}
  rows = []
  for length in lengths:
    new_rows, times, _ = _measure("ssd", impls, _ssd_inputs(length), length, repeats)
    rows += new_rows
    log(f"ssd            L={length:6d}  " + "  ".join(
        f"{impl}:{times[(impl, 'fwd')] * 1e3:.1f}/{times[(impl, 'fwdbwd')] * 1e3:.1f}ms" for impl in impls))
  return rows


S4D_BATCH, S4D_WIDTH, S4D_STATE, S4D_DOC = 8, 128, 32, 200  # S4D with segment ids: B, E, P, mean document length


def _s4d_inputs(length):
  """u and S4D's real parameters (S4D-Lin init), the 6 differentiated arguments, and packed segment ids [B, T]."""
  ks = jax.random.split(jax.random.PRNGKey(2), 5)
  a_im = jnp.broadcast_to(jnp.pi * jnp.arange(S4D_STATE, dtype=jnp.float32), (S4D_WIDTH, S4D_STATE))
  args = (jax.random.normal(ks[0], (S4D_BATCH, length, S4D_WIDTH)),
          jnp.full((S4D_WIDTH, S4D_STATE), -0.5), a_im,
          jax.random.uniform(ks[1], (S4D_WIDTH,), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)),
          jax.random.normal(ks[2], (S4D_WIDTH, S4D_STATE, 2)) * 0.5 ** 0.5, jnp.ones((S4D_WIDTH,)))
  starts_BT = jax.random.bernoulli(ks[3], 1.0 / S4D_DOC, (S4D_BATCH, length))
  return args, jnp.cumsum(starts_BT, axis=1).astype(jnp.int32)


def bench_s4d(lengths: Sequence[int], repeats: int, log) -> list[dict]:
  """S4D with segment ids (packed documents): the chunked form vs the associative and the sequential scans."""
  rows = []
  for length in lengths:
    args, segment_ids = _s4d_inputs(length)

    def make(mode):
      def fn(u, a_re, a_im, log_dt, c, D):
        dA, dB = ssm.discretize(a_re + 1j * a_im, jnp.exp(log_dt)[:, None])
        C = c[..., 0] + 1j * c[..., 1]
        if mode == "chunked":
          return ssm.s4d_chunked(u, dA, dB, C, D, segment_ids=segment_ids)
        return ssm.s4d_recurrent(u, dA, dB, C, D, mode=mode, segment_ids=segment_ids)
      return fn

    impls = ("chunked", "parallel", "sequential")
    new_rows, times, memory = _measure("s4d_segments", {impl: make(impl) for impl in impls}, args, length, repeats)
    rows += new_rows
    log(f"s4d+segments   L={length:6d}  B={S4D_BATCH} E={S4D_WIDTH} P={S4D_STATE}  " + "  ".join(
        f"{impl}:{times[(impl, 'fwd')] * 1e3:.1f}/{times[(impl, 'fwdbwd')] * 1e3:.1f}ms "
        f"({memory[(impl, 'fwdbwd')] / 2 ** 20:.0f} MiB)" for impl in impls) + "   (fwd/fwd+bwd, fwd+bwd memory)")
  return rows


def bench_decode(contexts: Sequence[int], repeats: int, log) -> list[dict]:
  """Per-token step time of the Mamba and Mamba-2 blocks (d_model 256, E 512) after a prefill of each length.

  The steps after the different prefills are timed round-robin (so machine load hits every context alike), with
  the token and state prepared outside the timed call.
  """
  blocks = {"mamba": ssm_nn.Mamba(d_model=WIDTH // 2, d_state=STATE),
            "mamba2": ssm_nn.Mamba2(d_model=WIDTH // 2, d_state=SSD_STATE, head_dim=SSD_HEAD_DIM)}
  rows = []
  for name, block in blocks.items():
    x = jax.random.normal(jax.random.PRNGKey(2), (BATCH, max(contexts) + 1, WIDTH // 2))
    params = block.init(jax.random.PRNGKey(3), x[:, :8])
    prefill = jax.jit(functools.partial(block.apply, return_state=True))
    step = jax.jit(functools.partial(block.apply, method=block.step))
    cases = {}
    for context in contexts:  # the state after each prefill; the contexts are then timed round-robin
      _, state = prefill(params, x[:, :context])
      cases[context] = functools.partial(step, params, x[:, context], state)
    times = _time_round_robin(cases, (), repeats * 20, settle_between=False)  # tiny steps: no buffers to release
    for context, seconds in times.items():
      rows.append(dict(kernel=f"{name}_decode_step", impl=name, pass_="step", length=context, seconds=seconds,
                       xla_bytes=None))
      log(f"decode {name:7s} context={context:6d}  step {seconds * 1e6:.0f} us")
  return rows


def _ratio(rows, kernel, num, den, kind, length):
  pick = {(r["impl"], r["pass_"], r["length"]): r["seconds"] for r in rows if r["kernel"] == kernel}
  if (num, kind, length) in pick and (den, kind, length) in pick:
    return pick[(num, kind, length)] / pick[(den, kind, length)]
  return None


def summarize(rows: list[dict], lengths: Sequence[int], contexts: Sequence[int]) -> dict:
  summary = {}
  for length in lengths:
    for kind in ("fwd", "fwdbwd"):
      summary[f"selective baseline/chunked {kind} L={length}"] = _ratio(rows, "selective_scan", "baseline",
                                                                        "chunked", kind, length)
      summary[f"ssd sequential/chunked {kind} L={length}"] = _ratio(rows, "ssd", "sequential", "chunked", kind,
                                                                    length)
  for length in {r["length"] for r in rows if r["kernel"] == "s4d_segments"}:
    for den in ("parallel", "sequential"):
      for kind in ("fwd", "fwdbwd"):
        summary[f"s4d+segments {den}/chunked {kind} L={length}"] = _ratio(rows, "s4d_segments", den, "chunked",
                                                                          kind, length)
  for name in ("mamba", "mamba2"):
    steps = [r["seconds"] for r in rows if r["kernel"] == f"{name}_decode_step"]
    if steps:
      summary[f"{name} decode step max/min over contexts {min(contexts)}..{max(contexts)}"] = max(steps) / min(steps)
  return summary


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 4, figsize=(22, 5))
  for kernel, ax, title in (("selective_scan", axes[0], f"selective_scan B={BATCH} E={WIDTH} P={STATE}"),
                            ("ssd", axes[2], f"SSD B={BATCH} N={SSD_HEADS} H={SSD_HEAD_DIM} P={SSD_STATE}")):
    for impl in sorted({r["impl"] for r in rows if r["kernel"] == kernel}):
      for kind, style in (("fwd", "--"), ("fwdbwd", "-")):
        pts = sorted((r["length"], r["seconds"]) for r in rows
                     if r["kernel"] == kernel and r["impl"] == impl and r["pass_"] == kind)
        if pts:
          ax.plot(*zip(*pts), style, marker="o", label=f"{impl} {kind}")
    ax.set(xscale="log", yscale="log", xlabel="L", ylabel="seconds (median)", title=title)
    ax.legend(fontsize=7)
  ax = axes[1]
  for impl in sorted({r["impl"] for r in rows if r["kernel"] == "selective_scan"}):
    pts = sorted((r["length"], r["xla_bytes"] / 2 ** 20) for r in rows if r["kernel"] == "selective_scan"
                 and r["impl"] == impl and r["pass_"] == "fwdbwd" and r["xla_bytes"] is not None)
    if pts:
      ax.plot(*zip(*pts), marker="o", label=impl)
  ax.set(xscale="log", yscale="log", xlabel="L", ylabel="MiB (XLA temp + output)",
         title="selective_scan fwd+bwd memory")
  ax.legend(fontsize=7)
  ax = axes[3]
  for name in ("mamba", "mamba2"):
    pts = sorted((r["length"], r["seconds"] * 1e6) for r in rows if r["kernel"] == f"{name}_decode_step")
    if pts:
      ax.plot(*zip(*pts), marker="o", label=name)
  ax.set(xscale="log", xlabel="context length", ylabel="µs per step", title="decode step vs context", ylim=(0, None))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("results_dir", "results/ssm", "Where ssm.json and ssm.png go.", flag_values=fv)
  flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096"], "Sequence lengths L.", flag_values=fv)
  flags.DEFINE_list("decode_contexts", ["128", "1024", "4096", "16384"], "Prefill lengths before timing a step.",
                    flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed repeats per case (median reported).", flag_values=fv)
  flags.DEFINE_list("only", ["selective", "ssd", "decode"], "Which parts to run (also: s4d, S4D with segment ids).",
                    flag_values=fv)
  flags.DEFINE_list("s4d_lengths", ["1024"], "Sequence lengths of the S4D part (--only=s4d).", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark; `argv` holds the flags only (as `python -m seqjax.bench ssm` passes them)."""
  fv = flags.FlagValues()
  _define_flags(fv)
  fv(["python -m seqjax.bench ssm"] + list(sys.argv[1:] if argv is None else argv))
  lengths = [int(v) for v in fv.lengths]
  contexts = [int(v) for v in fv.decode_contexts]
  unknown = set(fv.only) - {"selective", "ssd", "decode", "s4d"}
  if unknown or fv.repeats < 1 or min(lengths) < 1:
    raise ValueError(f"bad flags: --only may hold selective,ssd,decode,s4d (got unknown {sorted(unknown)}), "
                     f"--repeats >= 1, lengths >= 1")
  os.makedirs(fv.results_dir, exist_ok=True)
  log = lambda msg: print(msg, flush=True)
  log(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; float32; memory = XLA "
      f"compiled memory analysis (temp + output bytes)")
  rows = []
  if "selective" in fv.only:
    rows += bench_selective(lengths, fv.repeats, log)
  if "ssd" in fv.only:
    rows += bench_ssd(lengths, fv.repeats, log)
  if "s4d" in fv.only:
    rows += bench_s4d([int(v) for v in fv.s4d_lengths], fv.repeats, log)
  if "decode" in fv.only:
    rows += bench_decode(contexts, fv.repeats, log)
  summary = summarize(rows, lengths, contexts)
  for key, value in summary.items():
    if value is not None:
      log(f"{key:60s} {value:6.2f}x")
  result = dict(config=dict(batch=BATCH, width=WIDTH, state=STATE, ssd_heads=SSD_HEADS, ssd_head_dim=SSD_HEAD_DIM,
                            ssd_state=SSD_STATE, repeats=fv.repeats, dtype="float32",
                            memory="XLA compiled memory analysis: temp_size + output_size bytes"),
                rows=rows, summary=summary)
  with open(os.path.join(fv.results_dir, "ssm.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(rows, os.path.join(fv.results_dir, "ssm.png"))
  log(f"wrote {fv.results_dir}/ssm.json and ssm.png")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
