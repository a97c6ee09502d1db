"""Benchmark of the linear-attention kernels: the chunked form vs the recurrent form (forward and forward+backward)
for "linear", "retnet", "gla" and "deltanet", and the mixers' decode step time against the context length. Writes
`linear.json` and `linear.png` into --results_dir.

    python -m seqjax.bench linear --results_dir=results/linear
    python -m seqjax.bench linear --lengths=1024 --repeats=2 --decode_contexts=128,1024   # a quick look
    python -m seqjax.bench linear --variants=deltanet --only=forms                        # one variant, one part

Sizes: B = 1, N = 4 heads, P = H = 64 (d_model 256), float32. Inputs are what each variant's op receives (the
mixers' projections are outside the timed kernel): q, k, v normal; GLA's log-decay from `gla_log_decay` of normal
gate logits; RetNet's the fixed per-head decays; DeltaNet's keys L2-normalised and beta = sigmoid of the first
feature of GLA's log-decay input (so its gradient is part of fwd+bwd). fwd+bwd is the gradient of a fixed weighted sum of the output w.r.t.
q, k, v (and GLA's log-decay). Timing and memory as in `seqjax.bench.ssm` (jitted, warmed up, cases of one length
round-robin, median; XLA's compiled memory analysis, temp + output bytes). The decode step is the whole mixer's
`step` (projections, gates, norm) after a prefill of each context, timed round-robin.

The later variants: "gated_deltanet" (the delta rule's inputs, and the gate log a = the second feature of GLA's
log-decay), "rwkv" (RWKV-6's wkv: GLA's inputs as r, k, v and per-channel log-decay, a fixed bonus u) and "based"
(its linear branch: Taylor features of the first 16 channels of q and k, 273 features; the sliding-window branch
is softmax attention, benchmarked by `bench attention`). Their decode step is the whole mixer's (RWKV-6 with its
channel mix; Based with its window of 64).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import flags

from seqjax.bench.ssm import _compile, _time_round_robin
from seqjax.config import LinearAttentionConfig, ModelConfig
from seqjax.nn.mixers import make_mixer
from seqjax.ops import linear

BATCH, HEADS, KEY_DIM, VALUE_DIM = 1, 4, 64, 64
VARIANTS = ("linear", "retnet", "gla", "deltanet", "gated_deltanet", "rwkv", "based")
BASED_FEATURE_DIM = 16  # Based's q, k width before the Taylor map (1 + 16 + 256 = 273 features)
FORMS = ("chunked", "recurrent")


def _inputs(length):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k = (jax.random.normal(key, (BATCH, length, HEADS, KEY_DIM)) for key in ks[:2])
  v = jax.random.normal(ks[2], (BATCH, length, HEADS, VALUE_DIM))
  g = linear.gla_log_decay(jax.random.normal(ks[3], (BATCH, length, HEADS, KEY_DIM)))
  return q, k, v, g


def _op(variant, mode, chunk):
  """f(q, k, v, g) -> o for the variant in the given form (g is used by GLA only)."""
  if variant == "linear":
    return lambda q, k, v, g: linear.linear_attention(q, k, v, mode=mode, chunk_size=chunk)
  if variant == "retnet":
    return lambda q, k, v, g: linear.retention(q, k, v, linear.retnet_log_decay(HEADS), mode=mode,
                                               chunk_size=chunk)
  if variant == "deltanet":
    unit = lambda k: k * jax.lax.rsqrt(jnp.sum(k * k, axis=-1, keepdims=True))  # noqa: E731
    return lambda q, k, v, g: linear.delta_rule(q, unit(k), v, jax.nn.sigmoid(g[..., 0]), mode=mode,
                                                chunk_size=chunk)
  if variant == "based":  # its linear branch: Taylor features of the first 16 channels (the window branch is softmax)
    p = BASED_FEATURE_DIM
    return lambda q, k, v, g: linear.linear_attention(q[..., :p], k[..., :p], v, feature_map_name="taylor",
                                                      mode=mode, chunk_size=chunk)
  if variant == "rwkv":  # GLA's per-channel decay, a fixed bonus u
    bonus = jnp.linspace(-0.1, 0.1, HEADS * KEY_DIM).reshape(HEADS, KEY_DIM)
    return lambda q, k, v, g: linear.rwkv6_wkv(q, k, v, g, bonus, mode=mode, chunk_size=chunk)
  if variant == "gated_deltanet":  # the gate per head and token: the first feature of GLA's log-decay
    unit = lambda k: k * jax.lax.rsqrt(jnp.sum(k * k, axis=-1, keepdims=True))  # noqa: E731
    return lambda q, k, v, g: linear.delta_rule(q, unit(k), v, jax.nn.sigmoid(g[..., 0]), log_decay=g[..., 1],
                                                mode=mode, chunk_size=chunk)
  return lambda q, k, v, g: linear.gated_linear_attention(q, k, v, g, mode=mode, chunk_size=chunk)


def _fwd_and_fwdbwd(fn):
  def loss(*args):
    o = fn(*args)
    return jnp.sum(o * jnp.cos(jnp.arange(o.shape[1], dtype=o.dtype))[None, :, None, None])
  return {"fwd": fn, "fwdbwd": jax.grad(loss, argnums=(0, 1, 2, 3))}


def bench_forms(lengths: Sequence[int], chunk: int, repeats: int, log, variants=VARIANTS) -> list[dict]:
  rows = []
  for length in lengths:
    args = _inputs(length)
    for variant in variants:
      compiled, memory = {}, {}
      for form in FORMS:
        for kind, f in _fwd_and_fwdbwd(_op(variant, form, chunk)).items():
          compiled[(form, kind)], memory[(form, kind)] = _compile(f, args)
      times = _time_round_robin(compiled, args, repeats)
      for (form, kind), seconds in times.items():
        rows.append(dict(kernel=variant, impl=form, pass_=kind, length=length, seconds=seconds,
                         xla_bytes=memory[(form, kind)]))
      log(f"{variant:7s} L={length:6d}  " + "  ".join(
          f"{form}:{times[(form, 'fwd')] * 1e3:.1f}/{times[(form, 'fwdbwd')] * 1e3:.1f}ms "
          f"({memory[(form, 'fwdbwd')] / 2 ** 20:.0f} MiB)" for form in FORMS) + "   (fwd/fwd+bwd, fwd+bwd memory)")
  return rows


def bench_decode(contexts: Sequence[int], repeats: int, log, variants=VARIANTS) -> list[dict]:
  rows = []
  d_model = HEADS * VALUE_DIM
  for variant in variants:
    block = make_mixer(variant, ModelConfig(mixer=variant, d_model=d_model, linear=LinearAttentionConfig(
        num_heads=HEADS, key_dim=KEY_DIM, value_dim=VALUE_DIM)))
    x = jax.random.normal(jax.random.PRNGKey(2), (BATCH, max(contexts) + 1, d_model))
    params = block.init(jax.random.PRNGKey(3), x[:, :8])
    prefill = jax.jit(functools.partial(block.apply, return_state=True))
    step = jax.jit(functools.partial(block.apply, method=block.step))
    cases = {}
    for context in contexts:
      _, state = prefill(params, x[:, :context])
      cases[context] = functools.partial(step, params, x[:, context], state)
    times = _time_round_robin(cases, (), repeats * 20, settle_between=False)
    for context, seconds in times.items():
      rows.append(dict(kernel=f"{variant}_decode_step", impl=variant, pass_="step", length=context,
                       seconds=seconds, xla_bytes=None))
    log(f"decode {variant:7s} " + "  ".join(f"context={c}: {s * 1e6:.0f} us" for c, s in times.items()))
  return rows


def summarize(rows: list[dict], contexts: Sequence[int]) -> dict:
  summary = {}
  pick = {(r["kernel"], r["impl"], r["pass_"], r["length"]): r["seconds"] for r in rows}
  for (kernel, impl, kind, length), seconds in sorted(pick.items()):
    if impl == "chunked":
      summary[f"{kernel} recurrent/chunked {kind} L={length}"] = pick[(kernel, "recurrent", kind, length)] / seconds
  for variant in VARIANTS:
    steps = [r["seconds"] for r in rows if r["kernel"] == f"{variant}_decode_step"]
    if steps:
      summary[f"{variant} decode step max/min over contexts {min(contexts)}..{max(contexts)}"] = (
          max(steps) / min(steps))
  return summary


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  ax = axes[0]
  for variant in VARIANTS:
    for form, style in (("chunked", "-"), ("recurrent", "--")):
      pts = sorted((r["length"], r["seconds"]) for r in rows
                   if r["kernel"] == variant and r["impl"] == form and r["pass_"] == "fwdbwd")
      if pts:
        ax.plot(*zip(*pts), style, marker="o", label=f"{variant} {form}")
  ax.set(xscale="log", yscale="log", xlabel="L", ylabel="fwd+bwd seconds (median)",
         title=f"B={BATCH} N={HEADS} P={KEY_DIM} H={VALUE_DIM}")
  ax.legend(fontsize=7)
  ax = axes[1]
  for variant in VARIANTS:
    pts = sorted((r["length"], r["seconds"] * 1e6) for r in rows if r["kernel"] == f"{variant}_decode_step")
    if pts:
      ax.plot(*zip(*pts), marker="o", label=variant)
  ax.set(xscale="log", xlabel="context length", ylabel="µs per step", title="mixer decode step vs context",
         ylim=(0, None))
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("results_dir", "results/linear", "Where linear.json and linear.png go.", flag_values=fv)
  flags.DEFINE_list("lengths", ["1024", "4096"], "Sequence lengths L.", flag_values=fv)
  flags.DEFINE_integer("chunk", 0, "Chunk length of the chunked form (0: the op's default).", flag_values=fv)
  flags.DEFINE_list("decode_contexts", ["128", "1024", "4096", "16384"], "Prefill lengths before timing a step.",
                    flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "Timed repeats per case (median reported).", flag_values=fv)
  flags.DEFINE_list("only", ["forms", "decode"], "Which parts to run.", flag_values=fv)
  flags.DEFINE_list("variants", list(VARIANTS), "Which variants to run.", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark; `argv` holds the flags only (as `python -m seqjax.bench linear` passes them)."""
  fv = flags.FlagValues()
  _define_flags(fv)
  fv(["python -m seqjax.bench linear"] + list(sys.argv[1:] if argv is None else argv))
  lengths = [int(v) for v in fv.lengths]
  contexts = [int(v) for v in fv.decode_contexts]
  unknown = set(fv.only) - {"forms", "decode"} | set(fv.variants) - set(VARIANTS)
  if unknown or fv.repeats < 1 or min(lengths) < 1 or fv.chunk < 0:
    raise ValueError(f"bad flags: --only may hold forms,decode and --variants {','.join(VARIANTS)} (got unknown "
                     f"{sorted(unknown)}), --repeats >= 1, lengths >= 1, --chunk >= 0")
  os.makedirs(fv.results_dir, exist_ok=True)
  log = lambda msg: print(msg, flush=True)  # noqa: E731
  log(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; float32; chunk "
      f"{fv.chunk or 'default (64; GLA 16, DeltaNet 32)'}")
  rows = []
  if "forms" in fv.only:
    rows += bench_forms(lengths, fv.chunk or None, fv.repeats, log, fv.variants)
  if "decode" in fv.only:
    rows += bench_decode(contexts, fv.repeats, log, fv.variants)
  summary = summarize(rows, contexts)
  for key, value in summary.items():
    log(f"{key:60s} {value:6.2f}x")
  result = dict(config=dict(batch=BATCH, heads=HEADS, key_dim=KEY_DIM, value_dim=VALUE_DIM,
                            chunk=fv.chunk or "default", repeats=fv.repeats, dtype="float32"),
                rows=rows, summary=summary)
  with open(os.path.join(fv.results_dir, "linear.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(rows, os.path.join(fv.results_dir, "linear.png"))
  log(f"wrote {fv.results_dir}/linear.json and linear.png")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
