"""Benchmark: the textbook RNN-vs-Transformer claims, measured on this machine with seqjax's own models.

    python -m seqjax.bench claims                       # everything, ~15-25 min on the shared 2-core CPU
    python -m seqjax.bench claims --parts grad,recall   # some of the parts
    python -m seqjax.bench claims --quick               # tiny sizes: a smoke run of the whole pipeline (~2 min)

Every model is a `DecoderLM` (2 blocks, MLP after each mixer) differing only in its mixer: `rnn` (tanh Elman),
`lstm`, `attention` (causal softmax, learned positions) and `mamba` (selective SSM). The parts:

1. **throughput** — "Transformers train in parallel, RNNs one step at a time": training tokens/s (forward, backward
   and an AdamW update, one jitted step) against the sequence length T at a fixed number of tokens per step
   (batch = tokens / T), the mixers taking turns so the shared CPU's load hits all alike.
2. **decode** — "attention's inference cost grows with the context, an RNN's does not" and "LSTM inference is
   faster for short single sequences": ms per generated token against the context already in the cache, batch 1
   (`seqjax.bench.decode.context_sweep`, d_model 256, 4 layers).
3. **memory** — "attention's training memory is quadratic in the length": XLA's temporary memory of the compiled
   training step (`compiled.memory_analysis().temp_size_in_bytes`, batch 1), compiled only, never run, with the
   CPU kernels off (so that every buffer is XLA's). Attention twice: the materialising reference kernel and the
   blockwise (flash-style) one that seqjax trains with.
4. **recall** — "RNNs struggle with long-range dependencies": a recall task at growing distance d. A sequence is
   one data token (of 8), d noise tokens (of 6 others), then a query token; the answer at the query is the data
   token (chance 1/8). Each mixer is trained briefly (`--recall_steps` AdamW steps, fresh examples every step) per
   distance and evaluated on 1024 new sequences.
5. **grad** — "vanishing gradients": ||dL/dx_t||, the gradient of the answer's loss at the last position with
   respect to the embedded input x_t at position t, against the distance T - 1 - t, at initialisation and after
   the recall training at the longest distance (the models of part 4), averaged over 64 sequences. It is read off
   with `flax.linen.intercept_methods` (a zero added to the embedding output), so the models are unchanged.

Writes results/claims/claims.json, one PNG per part and claims.md (the table: claim, what was measured, verdict,
with the verdict computed from the figures by the rules in `verdicts`). The sizes are CPU-scale: the verdicts are
about this scale and this machine (2 cores, no accelerator: "parallel" means what XLA on 2 cores makes of it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.bench import decode as decode_bench
from seqjax.config import AttentionConfig, ModelConfig, OptimConfig
from seqjax.models.lm import DecoderLM
from seqjax.nn import layers
from seqjax.ops import backend
from seqjax.train.optim import make_optimizer

MIXERS = ("rnn", "lstm", "attention", "mamba")
# Recall vocabulary: data tokens 0..7, noise tokens 8..13, the query token 14 (V = 16).
DATA, NOISE, QUERY, VOCAB = 8, 6, 14, 16


def model_config(mixer: str, max_len: int, d_model: int = 64, attention_impl: str = "blockwise") -> ModelConfig:
  """2 blocks of `mixer` + MLP; attention with learned positions (the others need none)."""
  return ModelConfig(mixer=mixer, d_model=d_model, num_layers=2, mlp_dim=4 * d_model, max_len=max_len,
                     vocab_size=VOCAB, positions="learned" if mixer == "attention" else "none",
                     attention=AttentionConfig(num_heads=4, implementation=attention_impl))


def _init(model: DecoderLM, seed: int = 0) -> Any:
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def _loss(model: DecoderLM, params: Any, tokens_BT: jax.Array, targets_BT: jax.Array,
          weights_BT: jax.Array) -> jax.Array:
  logits_BTV = model.apply({"params": params}, tokens_BT)
  xent_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  return jnp.sum(xent_BT * weights_BT) / jnp.maximum(jnp.sum(weights_BT), 1.0)


def make_train_step(model: DecoderLM, optimizer: optax.GradientTransformation) -> Callable:
  """(params, opt_state, tokens, targets, weights) -> (params, opt_state, loss), jitted with donation."""
  def step(params, opt_state, tokens_BT, targets_BT, weights_BT):
    loss, grads = jax.value_and_grad(functools.partial(_loss, model))(params, tokens_BT, targets_BT, weights_BT)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def _optimizer(steps: int, learning_rate: float = 3e-3) -> optax.GradientTransformation:
  return make_optimizer(OptimConfig(learning_rate=learning_rate, warmup_steps=min(20, steps // 5),
                                    weight_decay=0.0), steps)


# ----------------------------------------------------------------------------------------------- 1. throughput
def throughput(lengths: Sequence[int], tokens_per_step: int, repeats: int, log) -> list[dict]:
  steps = {}
  for mixer in MIXERS:
    for length in lengths:
      model = DecoderLM(model_config(mixer, length))
      optimizer = _optimizer(100)
      params = _init(model)
      batch = max(1, tokens_per_step // length)
      tokens = jax.random.randint(jax.random.key(length), (batch, length), 0, VOCAB, jnp.int32)
      state = [params, optimizer.init(params)]
      train_step = make_train_step(model, optimizer)

      def run(state=state, train_step=train_step, tokens=tokens):
        state[0], state[1], loss = train_step(state[0], state[1], tokens, tokens, jnp.ones(tokens.shape))
        return loss
      jax.block_until_ready(run())  # compile
      steps[(mixer, length)] = (run, batch * length)
  times: dict[tuple, list[float]] = {key: [] for key in steps}
  for _ in range(repeats):  # the points take turns
    for key, (run, _) in steps.items():
      began = time.perf_counter()
      jax.block_until_ready(run())
      times[key].append(time.perf_counter() - began)
  rows = []
  for (mixer, length), (_, tokens) in steps.items():
    seconds = float(np.median(times[(mixer, length)]))
    rows.append({"mixer": mixer, "length": length, "tokens_per_s": tokens / seconds})
    log(f"throughput {mixer:>9} T={length:>5}: {tokens / seconds:9.0f} tokens/s")
  return rows


# ----------------------------------------------------------------------------------------------- 3. memory
def memory(lengths: Sequence[int], log) -> list[dict]:
  rows = []
  variants = [(m, "blockwise") for m in MIXERS] + [("attention", "reference")]
  with backend.cpu_kernels_mode("off"):
    for mixer, impl in variants:
      name = mixer if mixer != "attention" else f"attention ({impl})"
      for length in lengths:
        model = DecoderLM(model_config(mixer, length, attention_impl=impl))
        optimizer = _optimizer(100)
        params = jax.eval_shape(lambda m=model: _init(m))
        opt_state = jax.eval_shape(optimizer.init, params)
        tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
        weights = jax.ShapeDtypeStruct((1, length), jnp.float32)
        compiled = make_train_step(model, optimizer).lower(params, opt_state, tokens, tokens, weights).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        rows.append({"mixer": name, "length": length, "temp_mib": temp / 2**20})
        log(f"memory {name:>22} T={length:>6}: {temp / 2**20:10.1f} MiB temporary")
  return rows


# ----------------------------------------------------------------------------------------------- 4. recall
def recall_batch(rng: np.random.Generator, batch: int, distance: int) -> tuple[np.ndarray, ...]:
  """Sequences [data, d noise tokens, query] (T = d + 2): tokens, targets (the data token at the query), weights."""
  tokens = np.empty((batch, distance + 2), np.int32)
  tokens[:, 0] = rng.integers(0, DATA, batch)
  tokens[:, 1:-1] = rng.integers(DATA, DATA + NOISE, (batch, distance))
  tokens[:, -1] = QUERY
  targets = np.zeros_like(tokens)
  targets[:, -1] = tokens[:, 0]
  weights = np.zeros(tokens.shape, np.float32)
  weights[:, -1] = 1.0
  return tokens, targets, weights


def train_recall(mixer: str, distance: int, steps: int, batch: int, d_model: int, seed: int = 0):
  """(initial params, trained params, model, final training loss, test accuracy on 1024 new sequences)."""
  model = DecoderLM(model_config(mixer, distance + 2, d_model=d_model))
  optimizer = _optimizer(steps)
  params0 = _init(model, seed)
  params, opt_state = jax.tree.map(jnp.array, params0), optimizer.init(params0)
  train_step = make_train_step(model, optimizer)
  rng = np.random.default_rng([seed, distance])
  loss = float("nan")
  for _ in range(steps):
    params, opt_state, loss = train_step(params, opt_state, *recall_batch(rng, batch, distance))
  tokens, targets, _ = recall_batch(np.random.default_rng([seed, distance, 1]), 1024, distance)
  logits = jax.jit(model.apply)({"params": params}, tokens)
  accuracy = float(np.mean(np.argmax(np.asarray(logits[:, -1]), -1) == targets[:, -1]))
  return params0, params, model, float(loss), accuracy


# ----------------------------------------------------------------------------------------------- 5. grad
def embedded_input_loss(model: DecoderLM, params: Any, delta_BTD, tokens_BT, targets_BT, weights_BT) -> jax.Array:
  """The summed per-row losses (the weighted mean x rows) with `delta` added to the embedding output x [B, T, D]."""
  def add_delta(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.Embed) and context.method_name == "__call__":
      return out + delta_BTD.astype(out.dtype)
    return out
  with nn.intercept_methods(add_delta):
    return _loss(model, params, tokens_BT, targets_BT, weights_BT) * tokens_BT.shape[0]


def input_gradients(model: DecoderLM, params: Any, tokens_BT, targets_BT, weights_BT) -> np.ndarray:
  """dL/dx [B, T, D]: each row's answer loss against the embedded inputs x_t of that row (read off with
  `flax.linen.intercept_methods`, a zero added to the embedding output; the model is unchanged)."""
  delta = jnp.zeros((*np.shape(tokens_BT), model.cfg.d_model), jnp.float32)
  grad = jax.jit(jax.grad(functools.partial(embedded_input_loss, model), argnums=1))
  return np.asarray(grad(params, delta, tokens_BT, targets_BT, weights_BT))


def input_gradient_norms(model: DecoderLM, params: Any, tokens_BT, targets_BT, weights_BT) -> np.ndarray:
  """||dL/dx_t|| [T], the mean over the rows of each row's norm."""
  grad_BTD = input_gradients(model, params, tokens_BT, targets_BT, weights_BT)
  return np.linalg.norm(grad_BTD, axis=-1).mean(0)


def recall_and_gradients(distances: Sequence[int], steps: int, batch: int, d_model: int, log) -> tuple[list, list]:
  acc_rows, grad_rows = [], []
  longest = max(distances)
  probe = recall_batch(np.random.default_rng(7), 64, longest)
  for mixer in MIXERS:
    for distance in distances:
      began = time.perf_counter()
      params0, params, model, loss, accuracy = train_recall(mixer, distance, steps, batch, d_model)
      acc_rows.append({"mixer": mixer, "distance": distance, "accuracy": accuracy, "final_loss": loss,
                       "seconds": time.perf_counter() - began})
      log(f"recall {mixer:>9} d={distance:>4}: accuracy {accuracy:.3f} (loss {loss:.3f}, "
          f"{time.perf_counter() - began:.0f} s)")
      if distance == longest:
        for stage, p in (("init", params0), ("trained", params)):
          norms = input_gradient_norms(model, p, *probe)
          grad_rows.append({"mixer": mixer, "stage": stage, "norms": norms.tolist()})
          log(f"grad {mixer:>9} {stage:>7}: ||dL/dx|| at the last position {norms[-1]:.2e}, at the first "
              f"{norms[0]:.2e} (ratio {norms[0] / norms[-1]:.1e})")
  return acc_rows, grad_rows


# ----------------------------------------------------------------------------------------------- verdicts
def verdicts(result: dict) -> list[dict]:
  """One row per claim: what was measured (numbers from `result`) and the verdict, by fixed rules."""
  rows = []

  def at(part, **match):
    return [r for r in result.get(part, []) if all(r.get(k) == v for k, v in match.items())]

  if result.get("throughput"):
    lengths = sorted({r["length"] for r in result["throughput"]})
    tps = {(r["mixer"], r["length"]): r["tokens_per_s"] for r in result["throughput"]}
    ratio = {m: tps[("attention", L)] / tps[(m, L)] for m in ("rnn", "lstm") for L in [lengths[-1]]}
    holds = all(v > 1.0 for v in ratio.values())
    rows.append({"claim": "Transformers train in parallel over the sequence, RNNs step by step (faster training)",
                 "measured": f"training tokens/s at T={lengths[-1]}: attention {ratio['rnn']:.2f}x the RNN's, "
                             f"{ratio['lstm']:.2f}x the LSTM's; mamba {tps[('mamba', lengths[-1])]:.0f} vs "
                             f"attention {tps[('attention', lengths[-1])]:.0f} tokens/s",
                 "verdict": "holds" if holds else "does not hold at this scale"})
  if result.get("decode"):
    ctx = sorted({r["context"] for r in result["decode"]})
    ms = {(r["mixer"], r["context"]): r["ms_per_token"] for r in result["decode"]}
    growth = {m: ms[(m, ctx[-1])] / ms[(m, ctx[0])] for m in ("attention", "lstm", "mamba")}
    rows.append({"claim": "Attention's cost per generated token grows with the context; an RNN's is constant",
                 "measured": f"ms/token from context {ctx[0]} to {ctx[-1]}: attention x{growth['attention']:.1f}, "
                             f"LSTM x{growth['lstm']:.2f}, Mamba x{growth['mamba']:.2f}",
                 "verdict": "holds" if growth["attention"] > 1.5 and growth["lstm"] < 1.3 else "does not hold"})
    short = ms[("lstm", ctx[0])] / ms[("attention", ctx[0])]
    rows.append({"claim": "LSTM inference is faster for short single sequences",
                 "measured": f"batch 1, context {ctx[0]}: LSTM {ms[('lstm', ctx[0])]:.2f} ms/token, attention "
                             f"{ms[('attention', ctx[0])]:.2f} ms/token (ratio {short:.2f})",
                 "verdict": "holds" if short < 1.0 else "does not hold at this scale"})
  if result.get("memory"):
    lengths = sorted({r["length"] for r in result["memory"]})
    mem = {(r["mixer"], r["length"]): r["temp_mib"] for r in result["memory"]}
    k = lengths[-1] / lengths[0]
    g = {m: mem[(m, lengths[-1])] / max(mem[(m, lengths[0])], 1e-9) for m in
         ("attention (reference)", "attention (blockwise)", "lstm", "mamba")}
    rows.append({"claim": "Attention's training memory is quadratic in the length (RNNs' linear)",
                 "measured": f"temp memory from T={lengths[0]} to {lengths[-1]} (x{k:.0f}): reference attention "
                             f"x{g['attention (reference)']:.0f}, blockwise attention x{g['attention (blockwise)']:.0f}"
                             f", LSTM x{g['lstm']:.0f}, Mamba x{g['mamba']:.0f}",
                 "verdict": ("holds for the materialising kernel only; the blockwise kernel is linear"
                             if g["attention (reference)"] > 0.5 * k * k and g["attention (blockwise)"] < 2 * k
                             else "see the figure")})
  if result.get("recall"):
    distances = sorted({r["distance"] for r in result["recall"]})
    acc = {(r["mixer"], r["distance"]): r["accuracy"] for r in result["recall"]}
    desc = ", ".join(f"{m} " + "/".join(f"{acc[(m, d)]:.2f}" for d in distances) for m in MIXERS)
    best_rnn = {d: max(acc[("rnn", d)], acc[("lstm", d)]) for d in (distances[0], distances[-1])}  # rnn or lstm
    drop = best_rnn[distances[0]] - best_rnn[distances[-1]]
    attn_far = acc[("attention", distances[-1])]
    rows.append({"claim": "RNNs struggle with long-range dependencies (attention does not)",
                 "measured": f"recall accuracy at d = {'/'.join(map(str, distances))}: {desc} (chance 0.125)",
                 "verdict": ("holds" if drop > 0.2 and attn_far > best_rnn[distances[-1]] + 0.2 else
                             "does not hold at this scale" if drop <= 0.2 else "partly: see the table")})
  if result.get("grad"):
    def decay(m, stage):
      norms = at("grad", mixer=m, stage=stage)[0]["norms"]
      return norms[0] / norms[-1]
    desc = ", ".join(f"{m} {decay(m, 'init'):.0e} ({decay(m, 'trained'):.0e})" for m in MIXERS)
    rows.append({"claim": "Vanishing gradients: the loss's gradient barely reaches the first positions of an RNN",
                 "measured": f"‖dL/dx_first‖ / ‖dL/dx_last‖ at init (after training): {desc}",
                 "verdict": _gradient_verdict({m: decay(m, "init") for m in MIXERS})})
  return rows


def _gradient_verdict(decay: dict[str, float]) -> str:
  """Which recurrent mixers lose 100x more of the gradient over the distance than attention does, at init."""
  vanishing = [m for m in ("rnn", "lstm", "mamba") if decay[m] < 1e-2 * decay["attention"]]
  if not vanishing:
    return "does not hold at this scale"
  return f"holds for {', '.join(vanishing)} (attention's reaches every position)"


def write_table(rows: list[dict], path: pathlib.Path) -> str:
  text = "| claim | measured | verdict |\n|---|---|---|\n" + "".join(
      f"| {r['claim']} | {r['measured']} | {r['verdict']} |\n" for r in rows)
  path.write_text(text, encoding="utf-8")
  return text


# ----------------------------------------------------------------------------------------------- plots
def plot(result: dict, out_dir: pathlib.Path) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  written = []

  def lines(part, series_key, x, y, xlabel, ylabel, title, logx=True, logy=True):
    if not result.get(part):
      return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[series_key] for r in result[part]):
      mine = [r for r in result[part] if r[series_key] == name]
      ax.plot([r[x] for r in mine], [r[y] for r in mine], marker="o", label=name)
    if logx:
      ax.set_xscale("log", base=2)
    if logy:
      ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{part}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

  lines("throughput", "mixer", "length", "tokens_per_s", "sequence length T (tokens per step fixed)",
        "training tokens/s", "Training throughput against length")
  lines("decode", "mixer", "context", "ms_per_token", "context in the cache", "ms per new token (batch 1)",
        "Decoding cost against context")
  lines("memory", "mixer", "length", "temp_mib", "sequence length T (batch 1)", "XLA temp memory (MiB)",
        "Training-step memory against length")
  lines("recall", "mixer", "distance", "accuracy", "distance d (noise tokens between data and query)",
        "recall accuracy", "Recall at growing distance (chance 0.125)", logy=False)
  if result.get("grad"):
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, mixer in enumerate(MIXERS):
      for stage, style in (("init", "--"), ("trained", "-")):
        norms = np.asarray([r for r in result["grad"] if r["mixer"] == mixer and r["stage"] == stage][0]["norms"])
        ax.plot(np.arange(len(norms))[::-1], np.maximum(norms, 1e-30), style, color=f"C{i}",
                label=f"{mixer} ({stage})")
    ax.set_yscale("log")
    ax.set(xlabel="distance from the answer, T - 1 - t", ylabel="||dL / dx_t||",
           title="Gradient reaching position t (dashed: init)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / "grad.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
  return written


PARTS = ("throughput", "decode", "memory", "recall", "grad")


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m seqjax.bench claims", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
  parser.add_argument("--lengths", default="128,512,2048", help="throughput: sequence lengths")
  parser.add_argument("--tokens_per_step", type=int, default=4096)
  parser.add_argument("--contexts", default="128,1024,8192", help="decode: contexts")
  parser.add_argument("--memory_lengths", default="512,2048,8192")
  parser.add_argument("--distances", default="8,32,128", help="recall: noise tokens between data and query")
  parser.add_argument("--recall_steps", type=int, default=250)
  parser.add_argument("--recall_batch", type=int, default=32)
  parser.add_argument("--recall_width", type=int, default=32, help="recall: d_model")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
  parser.add_argument("--results_dir", default="results/claims")
  parser.add_argument("--reuse", default="", help="claims.json files (comma-separated) whose parts are taken where "
                      "this run does not measure them: halves run separately, or the table and plots redrawn "
                      "with --parts=none")
  flags = parser.parse_args(argv)
  parts = [p for p in flags.parts.split(",") if p and p != "none"]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown part(s) {unknown}; the parts are {', '.join(PARTS)}")
  ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
  if flags.quick:
    flags.lengths, flags.tokens_per_step, flags.contexts, flags.memory_lengths = "32,64", 256, "16,64", "64,256"
    flags.distances, flags.recall_steps, flags.recall_batch, flags.repeats = "4,16", 3, 8, 1
  out_dir = pathlib.Path(flags.results_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  log = functools.partial(print, flush=True)
  result: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                            "load_average": os.getloadavg(), "flags": vars(flags)}
  for path in filter(None, flags.reuse.split(",")):
    with open(path, encoding="utf-8") as f:
      earlier = json.load(f)
    result.update({part: earlier[part] for part in PARTS if part in earlier and part not in parts})
  began = time.perf_counter()
  if "throughput" in parts:
    result["throughput"] = throughput(ints(flags.lengths), flags.tokens_per_step, flags.repeats, log)
  if "decode" in parts:
    mixers = {m: dict(mixer=m, **({} if m == "attention" else {"mlp": "none"})) for m in MIXERS}
    result["decode"] = decode_bench.context_sweep(ints(flags.contexts), 16, flags.repeats, log, mixers=mixers)
  if "memory" in parts:
    result["memory"] = memory(ints(flags.memory_lengths), log)
  with open(out_dir / "claims.json", "w", encoding="utf-8") as f:  # the timing parts, before the long training
    json.dump(result, f, indent=1)
  if "recall" in parts or "grad" in parts:
    result["recall"], result["grad"] = recall_and_gradients(ints(flags.distances), flags.recall_steps,
                                                            flags.recall_batch, flags.recall_width, log)
  result["seconds"] = time.perf_counter() - began
  result["verdicts"] = verdicts(result)
  images = plot(result, out_dir)
  with open(out_dir / "claims.json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  log(write_table(result["verdicts"], out_dir / "claims.md"))
  log(f"wrote {out_dir / 'claims.json'}, {out_dir / 'claims.md'}, {', '.join(images)} in {result['seconds']:.0f} s")
  return result


if __name__ == "__main__":
  main()
