"""Benchmark: cached decoding (`seqjax.decode.generate`) against the uncached baseline, and the time per new token
against the context length for each mixer family.

    python -m seqjax.bench decode                                  # both parts, default sizes
    python -m seqjax.bench decode --contexts 128,1024,4096,16384   # the context sweep further out
    python -m seqjax.bench decode --skip_sweep --batches 1,8

1. **Cached vs uncached**, on the demo model's configuration (configs/lm_pysrc.py: 4 attention layers, d_model 128,
   RoPE; max_len raised to fit), greedy, prompt 64, 256 new tokens, random weights (the cost does not depend on
   them), batches 1 and 8. The baseline is what `--mode=generate` did before the KV cache: a full forward over the
   whole [B, P + N] buffer for every new token (one jitted `fori_loop`), O(N) forwards. Both compile first; the
   figure is the median wall time of `--repeats` runs, the two taking turns.
2. **Time per new token against context** for attention, sliding-window attention (window 256), Mamba, Mamba-2 and
   LSTM stacks (4 layers, d_model 256, batch 1): a jitted loop of `--steps` cached `DecoderLM.step` calls from a
   cache that already holds `context` tokens. Only the fill level matters for the cost, so the cache is the empty
   one with its position counters set to `context` (no prefill of 16k tokens needed). Attention's cache holds the
   context (its step reads every slot: linear); the sliding window's holds 256 slots; the recurrent and SSM states
   do not grow.

3. **Speculative decoding** (`--spec_target RUN --spec_draft RUN`, two trained runs on one tokenizer): tokens/s of
   plain target decoding and of speculative decoding side by side, with the acceptance rate
   (`seqjax.bench.decode_extras`).
4. **int8 weights** (`--quant_workdir RUN`): validation bits/byte with float and int8 weights, parameter memory.
5. **Against Hugging Face GPT-2** (`seqjax.bench.decode_torch`): greedy tokens/s of `generate` and of
   `transformers`' `GPT2LMHeadModel.generate` with its KV cache (PyTorch CPU) at the demo model's size, batches
   `--batches`, the two taking turns. It runs when PyTorch's virtualenv (`--torch_venv`, default .venv-torch)
   holds torch and transformers; `--torch` creates it first (pip, once), `--skip_torch` leaves the comparison out;
   without either and without the virtualenv the benchmark says how to get it and goes on.

Writes results/decode/decode.json and decode.png (the sweep).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.config import AttentionConfig, ModelConfig, SsmConfig
from seqjax.decode import generate
from seqjax.models.lm import DecoderLM


def demo_model_config(max_len: int) -> ModelConfig:
  """The demo's model (configs/lm_pysrc.py) with a context of `max_len`."""
  return ModelConfig(mixer="attention", d_model=128, num_layers=4, mlp_dim=512, positions="rope", max_len=max_len,
                     vocab_size=259, attention=AttentionConfig(num_heads=4, implementation="blockwise"))


def _params(model: DecoderLM) -> Any:
  example = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return nn.unbox(model.lazy_init(jax.random.key(0, impl="rbg"), example)["params"])


@functools.partial(jax.jit, static_argnums=(0, 1))
def uncached_greedy(model: DecoderLM, num_new: int, params: Any, prompt_BP: jax.Array) -> jax.Array:
  """The baseline: every new token is the argmax of a full forward over the whole buffer (no cache)."""
  batch, length = prompt_BP.shape
  tokens_BL = jnp.pad(prompt_BP, ((0, 0), (0, num_new)))

  def body(i, tokens_BL):
    logits_BLV = model.apply({"params": params}, tokens_BL)
    next_B = jnp.argmax(logits_BLV[:, length + i - 1], axis=-1).astype(jnp.int32)
    return tokens_BL.at[:, length + i].set(next_B)

  del batch
  return jax.lax.fori_loop(0, num_new, body, tokens_BL)


def _median_interleaved(calls: dict[str, Any], repeats: int) -> dict[str, float]:
  """Median seconds per call; the calls take turns so a shared CPU's load affects all alike (after a warm-up)."""
  for call in calls.values():
    jax.block_until_ready(call())
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      began = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - began)
  return {name: statistics.median(ts) for name, ts in times.items()}


def cached_vs_uncached(batches: Sequence[int], prompt_len: int, num_new: int, repeats: int, log) -> list[dict]:
  model = DecoderLM(demo_model_config(prompt_len + num_new))
  params = _params(model)
  rows = []
  for batch in batches:
    prompt = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 3, 259, jnp.int32)
    calls = {
        "cached": lambda p=prompt: generate(model, params, p, max_new_tokens=num_new).tokens,
        "uncached": lambda p=prompt: uncached_greedy(model, num_new, params, p),
    }
    cached_out, uncached_out = (np.asarray(call()) for call in calls.values())
    same = bool(np.array_equal(cached_out, uncached_out))
    seconds = _median_interleaved(calls, repeats)
    row = {"batch": batch, "prompt": prompt_len, "new_tokens": num_new, "same_tokens": same,
           **{f"{k}_tokens_per_s": batch * num_new / s for k, s in seconds.items()},
           "speedup": seconds["uncached"] / seconds["cached"]}
    log(f"batch {batch}: cached {row['cached_tokens_per_s']:.0f} tokens/s, uncached "
        f"{row['uncached_tokens_per_s']:.0f} tokens/s, speed-up {row['speedup']:.1f}x (same tokens: {same})")
    rows.append(row)
  return rows


SWEEP_MIXERS = {
    "attention": dict(mixer="attention"),
    "sliding_window_256": dict(mixer="attention", window=256),
    "mamba": dict(mixer="mamba", mlp="none"),
    "mamba2": dict(mixer="mamba2", mlp="none"),
    "lstm": dict(mixer="lstm", mlp="none"),
}


def _sweep_config(name: str, context: int, steps: int, mixers: dict[str, dict] | None = None) -> ModelConfig:
  kw = dict((mixers or SWEEP_MIXERS)[name])
  window = kw.pop("window", 0)
  return ModelConfig(d_model=256, num_layers=4, mlp_dim=1024, positions="rope", max_len=context + steps,
                     vocab_size=259, attention=AttentionConfig(num_heads=4, window=window),
                     ssm=SsmConfig(state=16, head_dim=64), **kw)


def _filled(cache: dict, context: int) -> dict:
  """The cache with every position counter at `context` (what a prefill of `context` tokens leaves behind)."""
  def fill(path, leaf):
    last = path[-1]
    name = getattr(last, "name", getattr(last, "key", None))
    return jnp.full_like(leaf, context) if name in ("index", "position") else leaf
  return jax.tree_util.tree_map_with_path(fill, cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _steps(model: DecoderLM, steps: int, params: Any, cache: dict) -> jax.Array:
  def body(_, carry):
    token_B, cache = carry
    logits_BV, cache = model.apply({"params": params}, token_B, cache, method="step")
    return jnp.argmax(logits_BV, -1).astype(jnp.int32), cache
  token_B = jnp.full(cache["position"].shape, 3, jnp.int32)
  return jax.lax.fori_loop(0, steps, body, (token_B, cache))[0]


def context_sweep(contexts: Sequence[int], steps: int, repeats: int, log,
                  mixers: dict[str, dict] | None = None) -> list[dict]:
  """ms per new token for each mixer (`mixers`: name -> ModelConfig fields, default SWEEP_MIXERS) and context."""
  rows = []
  for name in mixers or SWEEP_MIXERS:
    for context in contexts:
      model = DecoderLM(_sweep_config(name, context, steps, mixers))
      params = _params(model)
      cache = _filled(model.init_cache(1), context)
      seconds = _median_interleaved({name: lambda m=model, p=params, c=cache: _steps(m, steps, p, c)},
                                    repeats)[name]
      rows.append({"mixer": name, "context": context, "ms_per_token": 1e3 * seconds / steps})
      log(f"{name:>20} context {context:>6}: {1e3 * seconds / steps:.3f} ms per new token")
  return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in SWEEP_MIXERS:
    mine = [r for r in rows if r["mixer"] == name]
    ax.plot([r["context"] for r in mine], [r["ms_per_token"] for r in mine], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context (tokens already in the cache)")
  ax.set_ylabel("ms per new token (batch 1)")
  ax.set_title("Cached decoding: time per new token vs context")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m seqjax.bench decode", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="1,8", help="batch sizes of the cached-vs-uncached and the HF GPT-2 comparisons")
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--contexts", default="128,512,2048,8192", help="contexts of the per-token sweep")
  parser.add_argument("--steps", type=int, default=32, help="cached steps timed per sweep point")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_sweep", action="store_true")
  parser.add_argument("--skip_compare", action="store_true")
  parser.add_argument("--results_dir", default="results/decode")
  parser.add_argument("--spec_target", default="", help="a trained LM run: speculative decoding's target")
  parser.add_argument("--spec_draft", default="", help="a trained LM run on the same tokenizer: the draft")
  parser.add_argument("--spec_batches", default="1,8")
  parser.add_argument("--spec_new_tokens", type=int, default=128)
  parser.add_argument("--spec_draft_tokens", default="2,4")
  parser.add_argument("--spec_temperatures", default="0,1")
  parser.add_argument("--quant_workdir", default="", help="a trained LM run: int8 bits/byte and memory")
  parser.add_argument("--torch", action="store_true", help="compare with HF GPT-2, creating --torch_venv if needed")
  parser.add_argument("--skip_torch", action="store_true", help="leave out the HF GPT-2 comparison")
  parser.add_argument("--torch_venv", default=".venv-torch", help="PyTorch's virtualenv for the HF comparison")
  parser.add_argument("--torch_rounds", type=int, default=5, help="alternating timed calls per side and batch")
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of the HF side")
  flags = parser.parse_args(argv)
  out_dir = pathlib.Path(flags.results_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  log = functools.partial(print, flush=True)
  result: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__}
  if not flags.skip_compare:
    result["cached_vs_uncached"] = cached_vs_uncached([int(b) for b in flags.batches.split(",")], flags.prompt,
                                                      flags.new_tokens, flags.repeats, log)
  if not flags.skip_sweep:
    result["per_token_vs_context"] = context_sweep([int(c) for c in flags.contexts.split(",")], flags.steps,
                                                   flags.repeats, log)
    plot(result["per_token_vs_context"], out_dir / "decode.png")
  if not flags.skip_torch:
    from seqjax.bench import decode_torch, torch_side  # pylint: disable=import-outside-toplevel
    if flags.torch or torch_side.torch_ready(flags.torch_venv):
      model = DecoderLM(demo_model_config(flags.prompt + flags.new_tokens))
      result["hf_gpt2"] = decode_torch.hf_comparison(
          model, _params(model), batches=[int(b) for b in flags.batches.split(",")], prompt_len=flags.prompt,
          num_new=flags.new_tokens, rounds=flags.torch_rounds, venv=flags.torch_venv, threads=flags.threads,
          log=log, create=flags.torch)
    else:
      result["hf_gpt2"] = {"skipped": decode_torch.how_to_get_it(flags.torch_venv)}
      log(f"skipped: {result['hf_gpt2']['skipped']}")
  if flags.spec_target and flags.spec_draft:
    from seqjax.bench import decode_extras  # pylint: disable=import-outside-toplevel
    result["speculative"] = decode_extras.speculative_vs_plain(
        flags.spec_target, flags.spec_draft, batches=[int(b) for b in flags.spec_batches.split(",")],
        prompt_len=flags.prompt, num_new=flags.spec_new_tokens,
        draft_tokens=[int(k) for k in flags.spec_draft_tokens.split(",")],
        temperatures=[float(t) for t in flags.spec_temperatures.split(",")], repeats=flags.repeats,
        median=_median_interleaved, log=log)
  if flags.quant_workdir:
    from seqjax.bench import decode_extras  # pylint: disable=import-outside-toplevel
    result["int8"] = decode_extras.int8_report(flags.quant_workdir, log)
  with open(out_dir / "decode.json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  log(f"wrote {out_dir / 'decode.json'}" + ("" if flags.skip_sweep else f" and {out_dir / 'decode.png'}"))
  return result


if __name__ == "__main__":
  main()
