"""The decode benchmark's trained-model parts: speculative decoding against plain target decoding, and int8
weight-only quantization's effect on validation bits/byte and parameter memory.

    python -m seqjax.bench decode --spec_target WORKDIR --spec_draft WORKDIR   # two trained runs, same tokenizer
    python -m seqjax.bench decode --quant_workdir WORKDIR                      # a trained LM run

Speculative decoding needs trained models (the acceptance rate of random weights means nothing): the target is
e.g. the demo model (configs/lm_pysrc.py) and the draft a run of the same config at about a quarter of its
parameters (`--config.model.d_model=64 --config.model.attention.num_heads=2 --config.model.mlp_dim=256`), both
trained on the same data. Prompts are the first bytes of validation-like Python source; both the plain and the
speculative program are compiled first, then timed taking turns (median of `repeats`).
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from seqjax.decode import dequantize, generate, parameter_bytes, quantize


def _prompts(tokenizer: Any, batch: int, length: int) -> np.ndarray:
  """[batch, length] byte tokens: slices of a standard-library module's source (BOS first)."""
  text = inspect.getsource(json.decoder) + inspect.getsource(os)
  rows = []
  for b in range(batch):
    start = 997 * b
    ids = list(tokenizer.encode(text[start:start + 4 * length], add_bos=True))[:length]
    rows.append(ids)
  return np.asarray(rows, np.int32)


def speculative_vs_plain(target_dir: str, draft_dir: str, *, batches: Sequence[int], prompt_len: int,
                         num_new: int, draft_tokens: Sequence[int], temperatures: Sequence[float], repeats: int,
                         median, log) -> list[dict]:
  """Tokens/s of plain target decoding and of speculative decoding with the draft, side by side."""
  from seqjax.train.saved import load  # pylint: disable=import-outside-toplevel
  model, params, _, tokenizer = load(target_dir)
  draft_model, draft_params, _, _ = load(draft_dir)
  target_size = sum(np.size(x) for x in jax.tree.leaves(params))
  draft_size = sum(np.size(x) for x in jax.tree.leaves(draft_params))
  log(f"target {target_size} parameters, draft {draft_size} ({draft_size / target_size:.2f} of the target)")
  rows = []
  for batch in batches:
    prompts = _prompts(tokenizer, batch, prompt_len)
    for temperature in temperatures:
      kw = dict(max_new_tokens=num_new, temperature=temperature, rng=jax.random.key(0))
      calls = {"plain": lambda kw=kw, p=prompts: generate(model, params, p, **kw).tokens}
      for k in draft_tokens:
        calls[f"k={k}"] = (lambda kw=kw, p=prompts, k=k: generate(
            model, params, p, draft=(draft_model, draft_params), num_draft_tokens=k, **kw).tokens)
      seconds = median(calls, repeats)
      for k in draft_tokens:
        out = generate(model, params, prompts, draft=(draft_model, draft_params), num_draft_tokens=k, **kw)
        same = bool(np.array_equal(np.asarray(out.tokens), np.asarray(calls["plain"]()))) if temperature == 0 else None
        row = {"batch": batch, "temperature": temperature, "num_draft_tokens": k, "prompt": prompt_len,
               "new_tokens": num_new, "target_parameters": int(target_size), "draft_parameters": int(draft_size),
               "plain_tokens_per_s": batch * num_new / seconds["plain"],
               "speculative_tokens_per_s": batch * num_new / seconds[f"k={k}"],
               "speedup": seconds["plain"] / seconds[f"k={k}"], "acceptance_rate": out.acceptance_rate,
               "same_tokens_as_greedy": same}
        log(f"batch {batch} temperature {temperature} k={k}: plain {row['plain_tokens_per_s']:.0f} tokens/s, "
            f"speculative {row['speculative_tokens_per_s']:.0f} tokens/s ({row['speedup']:.2f}x), acceptance "
            f"{row['acceptance_rate']:.2f}" + ("" if same is None else f", same tokens as greedy: {same}"))
        rows.append(row)
  return rows


def int8_report(workdir: str, log) -> dict:
  """Validation bits/byte of a trained run with float and with int8 weights, and the parameter-memory ratio."""
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel
  from seqjax.train.saved import load  # pylint: disable=import-outside-toplevel
  _, params, config, _ = load(workdir)
  job = loop.build_job(config, workdir)
  eval_step = jax.jit(job.task.eval_sums)
  batches = config.train.eval_batches or None
  qparams = quantize(params)
  result = {"float": job.task.evaluate(params, eval_step, batches).metrics,
            "int8": job.task.evaluate(dequantize(qparams), eval_step, batches).metrics,
            "float_bytes": parameter_bytes(params), "int8_bytes": parameter_bytes(qparams)}
  result["memory_ratio"] = result["int8_bytes"] / result["float_bytes"]
  result["bits_per_byte_change"] = result["int8"]["bits_per_byte"] - result["float"]["bits_per_byte"]
  log(f"int8 weights: bits/byte {result['float']['bits_per_byte']:.4f} -> {result['int8']['bits_per_byte']:.4f} "
      f"({result['bits_per_byte_change']:+.4f}); parameters {result['float_bytes']} -> {result['int8_bytes']} "
      f"bytes (ratio {result['memory_ratio']:.3f})")
  return result
