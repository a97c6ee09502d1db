"""The decode benchmark's comparison with Hugging Face: greedy tokens/s of `seqjax.decode.generate` against
`transformers`' `GPT2LMHeadModel.generate` (its KV cache, PyTorch on the CPU) of the same size.

    python -m seqjax.bench decode --skip_sweep --skip_compare --torch      # creates .venv-torch on first use

Both models have the demo model's dimensions (configs/lm_pysrc.py: 4 layers, d_model 128, 4 heads, MLP 512, 259
byte tokens; the context raised to prompt + new tokens) and random weights (the cost does not depend on them).
GPT-2 has projection biases and a learned position table where seqjax has RoPE and no biases (printed).

- seqjax: `generate(model, params, prompts, max_new_tokens=N)`, one jitted program (prefill, then a
  `lax.while_loop` of cached steps), compiled before timing.
- Hugging Face: `model.generate(ids, attention_mask=1, do_sample=False, num_beams=1, use_cache=True,
  max_new_tokens=N, min_new_tokens=N)` under `torch.inference_mode()`, eager PyTorch, `torch.set_num_threads`
  (`--threads`), `OMP_WAIT_POLICY=PASSIVE`, SDPA attention; GPT-2 has no EOS here, so every row gets exactly N
  tokens (checked). It runs in PyTorch's own virtualenv as a worker over a pipe (`seqjax.bench.torch_side`).

Method: both sides decode once untimed (compilation, warm-up), then `--torch_rounds` rounds alternate one timed
call of each side, so the load of a shared CPU hits both; tokens/s is batch x N / the median call. Also timed in
the same rounds: seqjax with `max_new_tokens=1` (the prefill and the first token), so the per-token cost of the
loop is (t(N) - t(1)) / (N - 1).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from seqjax.bench import torch_side
from seqjax.decode import generate

TARGET_RATIO = 3.0  # issue 13: seqjax at least 3x HF's cached generate at batch 1

_HF_DECODE_WORKER = r'''
import json, sys, time
spec = json.loads(sys.argv[1])
try:
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    config = GPT2Config(**spec["gpt2"], attn_implementation=spec["attention"])
    config.use_cache = True
    model = GPT2LMHeadModel(config).eval()
except Exception as e:  # reported to the driver instead of a bare exit
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    raise SystemExit(1)
P, N, V = spec["prompt"], spec["new_tokens"], spec["gpt2"]["vocab_size"]


def handle(command):
    ids = torch.randint(3, V, (command["batch"], P), generator=torch.Generator().manual_seed(command["batch"]))
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             use_cache=True, max_new_tokens=N, min_new_tokens=N, pad_token_id=0)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "new_tokens": out.shape[1] - P, "batch": out.shape[0]}


serve(model, handle)
'''


def how_to_get_it(venv: str) -> str:
  return (f"the Hugging Face GPT-2 comparison needs PyTorch in its own virtualenv ({venv} holds no torch=="
          f"{torch_side.DEFAULT_VERSION} + transformers): run `python -m seqjax.bench decode --torch` once to create "
          f"it (pip install torch=={torch_side.DEFAULT_VERSION} transformers, a few minutes), or --skip_torch")


def hf_comparison(model: Any, params: Any, *, batches: Sequence[int], prompt_len: int, num_new: int, rounds: int,
                  venv: str, threads: int, log, create: bool = False, python: str | None = None,
                  script: str = _HF_DECODE_WORKER) -> dict[str, Any]:
  """Greedy tokens/s of seqjax `generate` and of HF GPT-2 `generate` of the same size, side by side per batch.

  The HF side runs `script` (default: the worker above) with `python` (default: the virtualenv `venv`'s, which
  `create=True` creates when it lacks torch; otherwise FileNotFoundError saying how to get it).
  """
  gpt2 = torch_side.gpt2_config_kwargs(model.cfg)
  if python is None:
    if create:
      python = torch_side.ensure_torch_venv(venv)
    elif torch_side.torch_ready(venv):
      python = Path(venv) / "bin" / "python"
    else:
      raise FileNotFoundError(how_to_get_it(venv))
  spec = {"gpt2": gpt2, "attention": "sdpa", "threads": threads, "prompt": prompt_len, "new_tokens": num_new}
  load_before = os.getloadavg()
  rows = []
  with torch_side.TorchWorker(python, script, spec, threads=threads) as worker:
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    log(f"parameters: seqjax {ours:,}, HF GPT-2 {worker.info['params']:,} (torch {worker.info['torch']}, "
        f"transformers {worker.info['transformers']}, {worker.info['threads']} threads, "
        f"{worker.info['attention']} attention)")
    for diff in torch_side.gpt2_differences(model.cfg):
      log(f"  note: {diff}")
    for batch in batches:
      prompts = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 3, model.cfg.vocab_size, jnp.int32)
      calls = {"seqjax": lambda p=prompts: generate(model, params, p, max_new_tokens=num_new).tokens,
               "seqjax_prefill": lambda p=prompts: generate(model, params, p, max_new_tokens=1).tokens}
      first = worker.request("generate", batch=batch)
      if first["new_tokens"] != num_new or first["batch"] != batch:
        raise RuntimeError(f"HF generate returned {first['new_tokens']} new tokens for {first['batch']} rows, "
                           f"expected {num_new} for {batch}")
      for call in calls.values():
        jax.block_until_ready(call())
      times: dict[str, list[float]] = {"hf": [], "seqjax": [], "seqjax_prefill": []}
      for _ in range(rounds):
        times["hf"].append(worker.request("generate", batch=batch)["seconds"])
        for name, call in calls.items():
          began = time.perf_counter()
          jax.block_until_ready(call())
          times[name].append(time.perf_counter() - began)
      med = {name: statistics.median(ts) for name, ts in times.items()}
      row = {"batch": batch, "prompt": prompt_len, "new_tokens": num_new,
             "seqjax_tokens_per_s": batch * num_new / med["seqjax"], "hf_tokens_per_s": batch * num_new / med["hf"],
             "ratio": med["hf"] / med["seqjax"], "seqjax_prefill_ms": 1e3 * med["seqjax_prefill"],
             "seqjax_ms_per_step": 1e3 * (med["seqjax"] - med["seqjax_prefill"]) / (num_new - 1),
             "hf_ms_per_step": 1e3 * med["hf"] / num_new, "times_s": times}
      log(f"batch {batch}: seqjax {row['seqjax_tokens_per_s']:.0f} tokens/s, HF GPT-2 {row['hf_tokens_per_s']:.0f} "
          f"tokens/s, ratio {row['ratio']:.2f}x (seqjax: prefill {row['seqjax_prefill_ms']:.1f} ms, then "
          f"{row['seqjax_ms_per_step']:.3f} ms per step; HF {row['hf_ms_per_step']:.2f} ms per token)")
      rows.append(row)
  result = {"rows": rows, "target_ratio_batch_1": TARGET_RATIO, "load_average_before_after": [load_before,
                                                                                                os.getloadavg()],
            "seqjax_parameters": ours, "hf_parameters": worker.info["params"], "torch": worker.info["torch"],
            "transformers": worker.info["transformers"], "threads": threads,
            "differences": torch_side.gpt2_differences(model.cfg)}
  one = [r for r in rows if r["batch"] == 1]
  if one:
    verdict = "met" if one[0]["ratio"] >= TARGET_RATIO else "MISSED"
    log(f"batch 1 ratio {one[0]['ratio']:.2f}x (target >= {TARGET_RATIO}x: {verdict}); load average "
        f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
  return result
