"""Benchmark of sparse attention: Longformer and BigBird masks in the blockwise kernel against full causal attention,
time against length at a fixed window. Writes `sparse.json` and `sparse.png` into --results_dir.

    python -m seqjax.bench sparse --results_dir=results/sparse
    python -m seqjax.bench sparse --lengths=1024,4096 --repeats=2          # a quick look

Sizes: B = 1, N = 4 heads, H = 64, float32; causal window 256, 16 global tokens, BigBird 2 random blocks of 256
(one tile).
All cases run the same JAX blockwise kernel (the native CPU kernels are switched off while compiling, so the masks
are the only difference); tiles of 256 (one window wide). fwd+bwd is the gradient of a fixed weighted sum
of the output w.r.t. q, k, v. Full causal attention runs up to --full_max_len, fwd+bwd up to --bwd_max_len.
Timing and memory as in `seqjax.bench.ssm` (jitted, warmed up, round-robin, median; XLA's compiled memory).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import flags

from seqjax.bench.ssm import _compile, _time_round_robin
from seqjax.ops import backend
from seqjax.ops.attention import blockwise, blockwise_attention, masks, sparse_masks

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 4, 64, 256
WINDOW, NUM_GLOBAL, RANDOM_BLOCKS, RANDOM_BLOCK_SIZE = 256, 16, 2, 256


def patterns() -> dict[str, masks.Mask]:
  return {"longformer": sparse_masks.longformer(WINDOW, num_global=NUM_GLOBAL),
          "bigbird": sparse_masks.bigbird(WINDOW, num_global=NUM_GLOBAL, num_random=RANDOM_BLOCKS,
                                          block_size=RANDOM_BLOCK_SIZE),
          "full_causal": masks.Causal()}


def _fns(mask):
  attend = lambda q, k, v: blockwise_attention(q, k, v, mask=mask, block_q=BLOCK, block_kv=BLOCK)  # noqa: E731

  def loss(q, k, v):
    o = attend(q, k, v)
    return jnp.sum(o * jnp.cos(jnp.arange(o.shape[1], dtype=o.dtype))[None, :, None, None])

  return {"fwd": attend, "fwdbwd": jax.grad(loss, argnums=(0, 1, 2))}


def bench(lengths: Sequence[int], full_max_len: int, bwd_max_len: int, repeats: int, log) -> list[dict]:
  rows = []
  for length in lengths:
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    args = tuple(jax.random.normal(key, (BATCH, length, HEADS, HEAD_DIM)) for key in ks)
    compiled, memory, tiles = {}, {}, {}
    for name, mask in patterns().items():
      if name == "full_causal" and length > full_max_len:
        continue
      tiles[name] = blockwise.make_plan(mask, length, length, BLOCK, BLOCK).visited_tiles
      for kind, f in _fns(mask).items():
        if kind == "fwdbwd" and length > bwd_max_len:
          continue
        with backend.cpu_kernels_mode("off"):
          compiled[(name, kind)], memory[(name, kind)] = _compile(f, args)
    times = _time_round_robin(compiled, args, repeats)
    for (name, kind), seconds in times.items():
      rows.append(dict(kernel=name, pass_=kind, length=length, seconds=seconds, xla_bytes=memory[(name, kind)],
                       visited_tiles=tiles[name]))
    log(f"L={length:6d}  " + "  ".join(
        f"{name}: " + "/".join(f"{times[(name, kind)] * 1e3:.0f}" for kind in ("fwd", "fwdbwd")
                               if (name, kind) in times) + f"ms ({tiles[name]} tiles)"
        for name in tiles) + "   (fwd/fwd+bwd)")
  return rows


def summarize(rows: list[dict]) -> dict:
  """Seconds per 1k tokens at the shortest and longest length (flat = linear growth), and full / sparse ratios."""
  summary = {}
  pick = {(r["kernel"], r["pass_"], r["length"]): r["seconds"] for r in rows}
  for kernel in ("longformer", "bigbird"):
    for kind in ("fwd", "fwdbwd"):
      lengths = sorted(length for k, p, length in pick if k == kernel and p == kind)
      if len(lengths) >= 2:
        per_token = [pick[(kernel, kind, n)] / n * 1024 for n in (lengths[0], lengths[-1])]
        summary[f"{kernel} {kind} ms per 1k tokens L={lengths[0]} -> L={lengths[-1]}"] = (
            f"{per_token[0] * 1e3:.2f} -> {per_token[1] * 1e3:.2f}")
      for n in lengths:
        if ("full_causal", kind, n) in pick:
          ratio = pick[("full_causal", kind, n)] / pick[(kernel, kind, n)]
          summary[f"full causal / {kernel} {kind} L={n}"] = f"{ratio:.2f}x"
  return summary


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, kind in zip(axes, ("fwd", "fwdbwd")):
    for kernel, style in (("longformer", "-o"), ("bigbird", "-s"), ("full_causal", "--^")):
      pts = sorted((r["length"], r["seconds"]) for r in rows if r["kernel"] == kernel and r["pass_"] == kind)
      if pts:
        ax.plot(*zip(*pts), style, label=kernel)
    xs = sorted({r["length"] for r in rows})
    ref = [r for r in rows if r["kernel"] == "longformer" and r["pass_"] == kind]
    if ref:
      base = min(ref, key=lambda r: r["length"])
      ax.plot(xs, [base["seconds"] * x / base["length"] for x in xs], ":", color="gray", label="linear in L")
    ax.set(xscale="log", yscale="log", xlabel="L", ylabel=f"{kind} seconds (median)",
           title=f"{kind}: B={BATCH} N={HEADS} H={HEAD_DIM}, window {WINDOW}, {NUM_GLOBAL} global")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("results_dir", "results/sparse", "Where sparse.json and sparse.png go.", flag_values=fv)
  flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768", "65536"], "Sequence lengths L.",
                    flag_values=fv)
  flags.DEFINE_integer("full_max_len", 16384, "Longest L of full causal attention.", flag_values=fv)
  flags.DEFINE_integer("bwd_max_len", 16384, "Longest L of the fwd+bwd cases.", flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "Timed repeats per case (median reported).", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark; `argv` holds the flags only (as `python -m seqjax.bench sparse` passes them)."""
  fv = flags.FlagValues()
  _define_flags(fv)
  fv(["python -m seqjax.bench sparse"] + list(sys.argv[1:] if argv is None else argv))
  lengths = [int(v) for v in fv.lengths]
  if fv.repeats < 1 or min(lengths) < 1:
    raise ValueError(f"bad flags: --repeats must be >= 1 and lengths >= 1, got {fv.repeats} and {lengths}")
  os.makedirs(fv.results_dir, exist_ok=True)
  log = lambda msg: print(msg, flush=True)  # noqa: E731
  log(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; float32; tiles {BLOCK}")
  rows = bench(lengths, fv.full_max_len, fv.bwd_max_len, fv.repeats, log)
  summary = summarize(rows)
  for key, value in summary.items():
    log(f"{key:60s} {value}")
  result = dict(config=dict(batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, block=BLOCK, window=WINDOW,
                            num_global=NUM_GLOBAL, random_blocks=RANDOM_BLOCKS, random_block_size=RANDOM_BLOCK_SIZE,
                            repeats=fv.repeats, dtype="float32"), rows=rows, summary=summary)
  with open(os.path.join(fv.results_dir, "sparse.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(rows, os.path.join(fv.results_dir, "sparse.png"))
  log(f"wrote {fv.results_dir}/sparse.json and sparse.png")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
