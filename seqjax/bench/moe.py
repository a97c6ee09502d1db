"""Benchmark of the mixture-of-experts MLP against a dense MLP with the same active parameters per token, side by
side in one run: the layer's forward and forward+backward, and a small LM's train step; and the fraction of
tokens dropped at capacity factors 1.0 and 1.25. Writes `moe.json` into --results_dir.

    python -m seqjax.bench moe --results_dir=results/moe
    python -m seqjax.bench moe --repeats=2 --only=layer          # a quick look

Sizes (float32): the layer on x [8, 256, 256] (B, T, D); the dense MLP is D -> F -> D with F = 1024, the MoE has
J = 8 experts of F / 2 = 512 each and sends every token to A = 2 of them (the same 2·D·F active weights per
token), plus its router. Cases: "dense" (the plain JAX MLP: XLA's matmuls), "dense_cpu_kernel" (the fused C++ MLP
the LM uses on a CPU, `seqjax.ops.dense.mlp`), "moe_cf1.0" / "moe_cf1.25" (capacity buffers) and "moe_dropless"
(sorted tokens and `jax.lax.ragged_dot`). fwd+bwd is the gradient of sum(y^2) w.r.t. x and every weight. The LM
step: configs/lm_pysrc.py's model (d_model 128, 4 layers, MLP 512) on [16, 256] random tokens, gradient of the
training loss (with the aux losses for MoE) and an AdamW update, dense vs every MoE block (8 experts of 256, top-2).
Timing as `seqjax.bench.ssm` (jitted, warmed up, cases round-robin, median). Dropped fractions are those of the
freshly initialised router on random inputs (near-uniform routing), the layer's and the LM's first MoE block's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from absl import flags

from seqjax.bench.ssm import _compile, _time_round_robin
from seqjax.config import ModelConfig, MoeConfig
from seqjax.models.lm import DecoderLM
from seqjax.nn.moe import MoeMlp, moe_losses
from seqjax.ops import backend
from seqjax.ops.dense import mlp as mlp_ops
from seqjax.train.tasks.lm import lm_loss_sum

BATCH, LENGTH, WIDTH, HIDDEN, EXPERTS, TOP_K = 8, 256, 256, 1024, 8, 2
MOE_CASES = {"moe_cf1.0": 1.0, "moe_cf1.25": 1.25, "moe_dropless": 0.0}


def _layer_cases():
  """name -> (f(params, x) -> y, params)."""
  key = jax.random.split(jax.random.PRNGKey(0), 3)
  w1 = jax.random.normal(key[0], (WIDTH, HIDDEN)) * WIDTH ** -0.5
  w2 = jax.random.normal(key[1], (HIDDEN, WIDTH)) * HIDDEN ** -0.5
  cases = {"dense": (lambda p, x: mlp_ops.reference_mlp(x, p[0], p[1]), (w1, w2)),
           "dense_cpu_kernel": (lambda p, x: mlp_ops.mlp(x, p[0], p[1]), (w1, w2))}
  x = jnp.zeros((BATCH, LENGTH, WIDTH))
  for name, cf in MOE_CASES.items():
    layer = MoeMlp(EXPERTS, TOP_K, HIDDEN // TOP_K, capacity_factor=cf)
    params = layer.init(key[2], x)["params"]
    cases[name] = (lambda p, x, layer=layer: layer.apply({"params": p}, x), jax.tree.map(jnp.asarray, params))
  return cases


def _grad_of(fn):
  return jax.grad(lambda p, x: jnp.sum(fn(p, x) ** 2), argnums=(0, 1))


def _ratios(times: dict, baseline: str, prefix: str) -> dict:
  return {f"{prefix}{name} / {baseline}": t / times[baseline] for name, t in times.items() if name.startswith("moe")}


def bench_layer(repeats: int, log) -> tuple[list[dict], dict]:
  x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, LENGTH, WIDTH))
  rows, summary = [], {}
  for kind in ("fwd", "fwd+bwd"):
    compiled, memory = {}, {}
    for name, (fn, params) in _layer_cases().items():
      f = fn if kind == "fwd" else _grad_of(fn)
      compiled[name], memory[name] = _compile(f, (params, x))
      compiled[name] = (lambda c, p: lambda x: c(p, x))(compiled[name], params)
    times = _time_round_robin(compiled, (x,), repeats)
    for name, t in times.items():
      rows.append(dict(part="layer", case=name, kind=kind, seconds=t, memory_bytes=memory[name]))
      log(f"layer {kind:8s} {name:18s} {t * 1e3:8.2f} ms")
    summary.update(_ratios(times, "dense", f"layer {kind}: "))
    summary.update(_ratios(times, "dense_cpu_kernel", f"layer {kind}: "))
  for name, cf in MOE_CASES.items():
    if cf:
      layer = MoeMlp(EXPERTS, TOP_K, HIDDEN // TOP_K, capacity_factor=cf)
      params = layer.init(jax.random.PRNGKey(2), x)
      _, sown = jax.jit(lambda v, x, layer=layer: layer.apply(v, x, mutable=["moe"]))(params, x)
      dropped = float(moe_losses(sown["moe"])["dropped_fraction"][0])
      summary[f"layer dropped fraction at capacity factor {cf}"] = dropped
      log(f"layer capacity factor {cf}: {dropped:.2%} of the (token, choice) assignments dropped")
  return rows, summary


def _lm_config(moe: MoeConfig | None) -> ModelConfig:
  cfg = ModelConfig(d_model=128, num_layers=4, mlp_dim=512, vocab_size=259, max_len=256, positions="rope",
                    attention=dataclasses.replace(ModelConfig().attention, num_heads=4))
  return cfg if moe is None else dataclasses.replace(cfg, moe=moe)


def bench_lm(repeats: int, log) -> tuple[list[dict], dict]:
  batch_size, length = 16, 256
  tokens = jax.random.randint(jax.random.PRNGKey(3), (batch_size, length + 1), 3, 259)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((batch_size, length))}
  configs = {"dense": _lm_config(None)}
  for name, cf in MOE_CASES.items():
    configs[name] = _lm_config(MoeConfig(num_experts=EXPERTS, top_k=TOP_K, capacity_factor=cf, expert_dim=256))
  optimizer = optax.adamw(1e-3)
  compiled, rows, summary, states = {}, [], {}, {}
  for name, cfg in configs.items():
    model = DecoderLM(cfg)
    params = jax.tree.map(jnp.asarray, model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    loss_sum = lm_loss_sum(model)

    def step(params, opt_state, batch, loss_sum=loss_sum):
      def loss(p):
        total, weight, *_ = loss_sum(p, batch, None, True)
        return total / weight
      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    states[name] = (params, optimizer.init(params))
    c, _ = _compile(step, (*states[name], batch))
    compiled[name] = (lambda c, s: lambda b: c(*s, b))(c, states[name])
    if cfg.moe.num_experts and cfg.moe.capacity_factor:
      _, sown = jax.jit(lambda p, b, model=model: model.apply({"params": p}, b, mutable=["moe"]))(
          params, batch["inputs"])
      summary[f"lm dropped fraction at capacity factor {cfg.moe.capacity_factor}"] = float(
          jnp.mean(moe_losses(sown["moe"])["dropped_fraction"]))
  times = _time_round_robin(compiled, (batch,), repeats)
  for name, t in times.items():
    rows.append(dict(part="lm", case=name, kind="train step", seconds=t))
    log(f"lm train step {name:14s} {t * 1e3:8.2f} ms")
  summary.update(_ratios(times, "dense", "lm train step: "))
  return rows, summary


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("results_dir", "results/moe", "Where moe.json goes.", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed repeats per case (median reported).", flag_values=fv)
  flags.DEFINE_list("only", ["layer", "lm"], "Which parts to run.", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the benchmark; `argv` holds the flags only (as `python -m seqjax.bench moe` passes them)."""
  fv = flags.FlagValues()
  _define_flags(fv)
  fv(["python -m seqjax.bench moe"] + list(sys.argv[1:] if argv is None else argv))
  if set(fv.only) - {"layer", "lm"} or fv.repeats < 1:
    raise ValueError(f"bad flags: --only may hold layer,lm (got {fv.only}), --repeats >= 1 (got {fv.repeats})")
  os.makedirs(fv.results_dir, exist_ok=True)
  log = lambda msg: print(msg, flush=True)  # noqa: E731
  log(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; float32; CPU MLP kernel "
      f"{'available' if backend.cpu_kernel('mlp') is not None else 'not built'}")
  rows, summary = [], {}
  for part, bench in (("layer", bench_layer), ("lm", bench_lm)):
    if part in fv.only:
      r, s = bench(fv.repeats, log)
      rows += r
      summary.update(s)
  for key, value in summary.items():
    log(f"{key:60s} {value:7.3f}{'' if 'dropped' in key else 'x'}")
  result = dict(config=dict(batch=BATCH, length=LENGTH, width=WIDTH, hidden=HIDDEN, experts=EXPERTS, top_k=TOP_K,
                            repeats=fv.repeats, dtype="float32"), rows=rows, summary=summary)
  with open(os.path.join(fv.results_dir, "moe.json"), "w") as f:
    json.dump(result, f, indent=1)
  log(f"wrote {fv.results_dir}/moe.json")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
