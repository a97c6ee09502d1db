"""The Hugging Face decode comparison's machinery (seqjax.bench.decode_torch, seqjax.bench.torch_side) without torch:
a stand-in worker script plays the PyTorch side over the same pipe protocol. The real comparison is `-m slow`
(and runs only where .venv-torch holds torch)."""

import json
import pathlib
import sys
import textwrap
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from seqjax.bench import decode as decode_bench
from seqjax.bench import decode_torch, torch_side
from seqjax.config import AttentionConfig, ModelConfig
from seqjax.models.lm import DecoderLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF_SECONDS = 0.5  # what the stand-in reports per generate call

# Plays the PyTorch side through the shared protocol loop (torch_side.WORKER_SERVE's serve), with stand-ins for the
# torch and transformers modules it reports versions from; `mode` in the spec plants a failure.
FAKE_WORKER = textwrap.dedent('''
    import json, sys, types
    spec = json.loads(sys.argv[1])
    if spec.get("mode") == "broken":
        print(json.dumps({"error": "ImportError: no torch here"}), flush=True)
        raise SystemExit(1)
    sys.modules["torch"] = types.SimpleNamespace(__version__="fake", get_num_threads=lambda: spec["threads"])
    sys.modules["transformers"] = types.SimpleNamespace(__version__="fake")

    class Model:
        config = types.SimpleNamespace(_attn_implementation=spec["attention"])
        def parameters(self):
            return [types.SimpleNamespace(numel=lambda: 100), types.SimpleNamespace(numel=lambda: 23)]

    def handle(command):
        if command["op"] == "spec":
            return spec
        short = 1 if spec.get("mode") == "short" else 0
        return {"seconds": %r, "cpu_seconds": 0.1, "new_tokens": spec["new_tokens"] - short,
                "batch": command["batch"]}

    serve(Model(), handle)
''' % HF_SECONDS)


def _tiny_model(max_len=16, abstract=True):
  """A GPT-2-shaped DecoderLM and its params (abstract shapes: the stand-in generate never reads them)."""
  cfg = ModelConfig(mixer="attention", d_model=32, num_layers=1, mlp_dim=64, positions="rope", max_len=max_len,
                    vocab_size=19, attention=AttentionConfig(num_heads=2))
  model = DecoderLM(cfg)
  init = lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])  # noqa: E731
  return model, jax.eval_shape(init) if abstract else init()


class _FakeGenerate:
  """Stands in for `seqjax.decode.generate` (its real path is tested in tests/decode; compiling it here would
  cost seconds per batch): records the calls, takes no time worth timing."""

  def __init__(self):
    self.calls = []

  def __call__(self, model, params, prompts, *, max_new_tokens):
    self.calls.append((prompts.shape, max_new_tokens))
    return types.SimpleNamespace(tokens=jnp.zeros((prompts.shape[0], prompts.shape[1] + max_new_tokens), jnp.int32))


@pytest.fixture(autouse=True)
def fake_generate(request, monkeypatch):
  if request.node.get_closest_marker("slow"):
    return None
  fake = _FakeGenerate()
  monkeypatch.setattr(decode_torch, "generate", fake)
  return fake


def _compare(script, batches=(1, 2), rounds=2, logs=None):
  model, params = _tiny_model()
  return decode_torch.hf_comparison(model, params, batches=batches, prompt_len=4, num_new=6, rounds=rounds,
                                    venv="unused", threads=1, log=(logs if logs is not None else []).append,
                                    python=sys.executable, script=script)


def test_rounds_alternate_and_the_figures_follow_from_the_times(fake_generate):
  logs = []
  out = _compare(FAKE_WORKER, logs=logs)
  # per batch: a warm-up of each seqjax call, then each round the full decode and the prefill-only one
  assert fake_generate.calls == [((b, 4), n) for b in (1, 2) for n in (6, 1, 6, 1, 6, 1)]
  assert [r["batch"] for r in out["rows"]] == [1, 2]
  for row in out["rows"]:
    times = row["times_s"]
    assert len(times["hf"]) == len(times["seqjax"]) == len(times["seqjax_prefill"]) == 2
    assert row["hf_tokens_per_s"] == pytest.approx(row["batch"] * 6 / HF_SECONDS)
    seqjax_s = sorted(times["seqjax"])[0] / 2 + sorted(times["seqjax"])[1] / 2  # median of two
    assert row["seqjax_tokens_per_s"] == pytest.approx(row["batch"] * 6 / seqjax_s)
    assert row["ratio"] == pytest.approx(HF_SECONDS / seqjax_s)
  assert out["hf_parameters"] == 123 and out["torch"] == "fake"
  assert any("rope" in d for d in out["differences"])
  assert any("target >= 3.0x" in line for line in logs)


def test_the_worker_gets_gpt2_of_the_same_dimensions():
  model, _ = _tiny_model()
  python = sys.executable
  spec = {"gpt2": torch_side.gpt2_config_kwargs(model.cfg), "attention": "sdpa", "threads": 1, "prompt": 4,
          "new_tokens": 6}
  with torch_side.TorchWorker(python, FAKE_WORKER, spec, threads=1) as worker:
    assert worker.info == {"ready": True, "params": 123, "torch": "fake", "transformers": "fake", "threads": 1,
                           "attention": "sdpa"}
    sent = worker.request("spec")["gpt2"]
    assert (sent["n_embd"], sent["n_layer"], sent["n_head"], sent["n_inner"], sent["vocab_size"]) == (32, 1, 2, 64, 19)
    assert worker.request("generate", batch=3)["batch"] == 3
  assert worker.proc.poll() == 0  # quit ends the worker


def test_a_short_generation_is_an_error():
  with pytest.raises(RuntimeError, match="5 new tokens for 1 rows, expected 6"):
    _compare(FAKE_WORKER.replace('spec.get("mode") == "short"', "True"), batches=(1,))


def test_a_worker_that_fails_to_start_says_why():
  with pytest.raises(RuntimeError, match="no torch here"):
    _compare(FAKE_WORKER.replace('spec.get("mode") == "broken"', "True"), batches=(1,))


def test_without_the_virtualenv_the_comparison_says_how_to_get_it(tmp_path):
  missing = str(tmp_path / "no-venv")
  assert not torch_side.torch_ready(missing)
  model, params = _tiny_model()
  with pytest.raises(FileNotFoundError, match="--torch"):
    decode_torch.hf_comparison(model, params, batches=(1,), prompt_len=4, num_new=6, rounds=1, venv=missing,
                               threads=1, log=print)
  out = decode_bench.main(["--skip_sweep", "--skip_compare", "--torch_venv", missing, "--results_dir",
                           str(tmp_path / "results")])
  assert "--torch" in out["hf_gpt2"]["skipped"] and "pip install torch" in out["hf_gpt2"]["skipped"]
  saved = json.loads((tmp_path / "results" / "decode.json").read_text())
  assert saved["hf_gpt2"] == out["hf_gpt2"]


@pytest.mark.slow
def test_real_hf_comparison_when_torch_is_installed():
  venv = ROOT / torch_side.DEFAULT_VENV
  if not torch_side.torch_ready(venv):
    pytest.skip(f"no torch in {venv} (python -m seqjax.bench decode --torch creates it)")
  model, params = _tiny_model(abstract=False)
  out = decode_torch.hf_comparison(model, params, batches=(1, 2), prompt_len=4, num_new=6, rounds=1,
                                   venv=str(venv), threads=1, log=print)
  assert all(r["hf_tokens_per_s"] > 0 and r["seqjax_tokens_per_s"] > 0 for r in out["rows"])
  assert out["torch"].startswith(torch_side.DEFAULT_VERSION)
