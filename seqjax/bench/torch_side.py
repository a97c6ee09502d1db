"""The PyTorch side of the comparisons with Hugging Face GPT-2: the config mapping, PyTorch's own virtualenv, and a
worker subprocess driven over a pipe.

Used by experiments/bench_torch_gpt2.py (training throughput) and `python -m seqjax.bench decode --torch`
(cached greedy decoding). torch is never a seqjax dependency: it lives in its own virtualenv (`.venv-torch` by
default, git-ignored by `.venv-*/`), created on first use with `pip install torch==VERSION transformers`, and runs
in a worker process. A worker is a Python script (a string) run as `python -c SCRIPT SPEC_JSON` in that
virtualenv; it prints one JSON line when it is ready, then answers each JSON line it reads on stdin (a command,
`{"op": ...}`) with one JSON line, until `{"op": "quit"}`. So the two sides can take turns in rounds, and slow
phases of a shared CPU hit both.

This module imports neither torch nor jax: the mapping and the machinery are testable without either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT_VENV = ".venv-torch"
DEFAULT_VERSION = "2.13.0"
_GPT2_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu"}  # flax nn.gelu is the tanh form = gelu_new


def gpt2_config_kwargs(model_cfg: Any) -> dict[str, Any]:
  """Keyword arguments of `transformers.GPT2Config` for a model of the same dimensions as a seqjax `ModelConfig`.

  Positions: GPT-2 always has a learned table; a seqjax model with RoPE, sinusoidal or no positions is compared
  with it anyway (see `gpt2_differences`). Raises ValueError for a seqjax model that GPT-2 cannot mirror (another
  mixer, ALiBi, RMSNorm, post-norm, gated MLP, grouped-query heads, a head_dim other than d_model / num_heads,
  bfloat16).
  """
  m = model_cfg
  problems = []
  if m.mixer_pattern != ("attention",):
    problems.append(f"model.mixer={m.mixer!r} (GPT-2 has attention layers only)")
  if m.positions == "alibi":
    problems.append(f"model.positions={m.positions!r} (GPT-2 has learned positions and no attention bias)")
  if m.norm != "layernorm" or m.norm_position != "pre":
    problems.append(f"model.norm={m.norm!r}, norm_position={m.norm_position!r} (GPT-2 is pre-norm LayerNorm)")
  if m.mlp != "mlp":
    problems.append(f"model.mlp={m.mlp!r} (GPT-2 has a plain MLP)")
  if m.resolved_num_kv_heads != m.attention.num_heads:
    problems.append(f"model.attention.num_kv_heads={m.attention.num_kv_heads} (GPT-2 is multi-head)")
  if m.resolved_head_dim * m.attention.num_heads != m.d_model:
    problems.append(f"model.attention.head_dim={m.attention.head_dim} (GPT-2 has head_dim = d_model / num_heads)")
  if m.attention.qk_norm:
    problems.append("model.attention.qk_norm=True (GPT-2 has no QK-norm)")
  if m.dtype != "float32":
    problems.append(f"model.dtype={m.dtype!r} (the comparisons run float32 on a CPU)")
  if problems:
    raise ValueError("the seqjax model has no GPT-2 counterpart: " + "; ".join(problems)
                     + ". Use a config with a plain pre-norm LayerNorm Transformer (e.g. configs/lm_pysrc.py).")
  return dict(vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
              n_head=m.attention.num_heads, n_inner=m.mlp_dim, activation_function=_GPT2_ACTIVATIONS[m.activation],
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=m.tie_embeddings,
              bos_token_id=None, eos_token_id=None, use_cache=False)


def gpt2_differences(model_cfg: Any) -> list[str]:
  """What differs between the seqjax model and its GPT-2 counterpart beyond the shared dimensions."""
  diffs = ["GPT-2 has biases on its projections (seqjax has none)"]
  if model_cfg.positions != "learned":
    diffs.append(f"seqjax uses {model_cfg.positions!r} positions, GPT-2 a learned table of n_positions vectors")
  return diffs


def _venv_python(venv: Path) -> Path:
  return Path(venv) / "bin" / "python"


def torch_ready(venv: str | Path = DEFAULT_VENV, version: str = DEFAULT_VERSION) -> bool:
  """Whether `venv` holds torch==version and transformers (checked by importing them there; nothing installed)."""
  python = _venv_python(Path(venv))
  if not python.exists():
    return False
  probe = "import torch, transformers; print(torch.__version__)"
  out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
  return out.returncode == 0 and out.stdout.strip().split("+")[0] == version


def ensure_torch_venv(venv: str | Path = DEFAULT_VENV, version: str = DEFAULT_VERSION) -> Path:
  """The Python of `venv`, creating it and installing torch==version + transformers (PyPI) if needed."""
  venv = Path(venv)
  python = _venv_python(venv)
  if torch_ready(venv, version):
    return python
  print(f"creating {venv} with torch=={version} and transformers (once; a few minutes) ...", flush=True)
  base = getattr(sys, "_base_executable", None) or sys.executable
  subprocess.run([base, "-m", "venv", str(venv)], check=True)
  subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"torch=={version}", "transformers"], check=True)
  if not torch_ready(venv, version):
    out = subprocess.run([str(python), "-c", "import torch, transformers"], capture_output=True, text=True,
                         check=False)
    raise RuntimeError(f"torch=={version} does not import in {venv}:\n{out.stderr[-2000:]}")
  return python


# Put before every worker script: the protocol's loop. A script builds its model and calls serve(model, handle).
WORKER_SERVE = r'''
def serve(model, handle):
    """Reports ready (the model's parameter count, versions, threads, attention implementation), then answers each
    command line with one line, handle(command), until {"op": "quit"}."""
    import json, sys, torch, transformers
    print(json.dumps({"ready": True, "params": sum(p.numel() for p in model.parameters()),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "attention": model.config._attn_implementation}),
          flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        print(json.dumps(handle(command)), flush=True)
'''


class TorchWorker:
  """A worker script (module docstring) in a subprocess; `request(op, **args)` sends one command, returns the reply.

  The script runs after `WORKER_SERVE`, so it may end with `serve(model, handle)`.

  `info` is the worker's first line (what it reports when ready). `threads` sets OMP/MKL threads; `omp_wait_policy`
  "PASSIVE" keeps libgomp's idle threads from spinning (on a shared, loaded CPU the default policy made every
  parallel torch op ~40x slower), "" leaves the library default. Use as a context manager, or call `close()`.
  """

  def __init__(self, python: str | Path, script: str, spec: dict[str, Any], *, threads: int,
               omp_wait_policy: str = "PASSIVE"):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy:
      env["OMP_WAIT_POLICY"] = omp_wait_policy
    self.proc = subprocess.Popen([str(python), "-c", WORKER_SERVE + script, json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the torch worker exited (status {self.proc.wait()}); see its stderr above")
    reply = json.loads(line)
    if isinstance(reply, dict) and "error" in reply:
      raise RuntimeError(f"the torch worker failed: {reply['error']}")
    return reply

  def request(self, op: str, **args: Any) -> dict[str, Any]:
    self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def run(self, steps: int) -> dict[str, Any]:
    """The training worker's command: time `steps` steps."""
    return self.request("run", steps=steps)

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)

  def __enter__(self) -> "TorchWorker":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
