"""`python -m seqjax.visualize`: attention maps of a trained run (images of the right number and size) whose
probabilities are a NumPy softmax of the model's own q.k, and the seq2seq LSTM's alignment."""

import os
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

import seqjax
from seqjax import visualize
from seqjax.config import default_config_dict, from_config_dict
from seqjax.models.lm import DecoderLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lm_config(tmp, **model):
  cfg = default_config_dict().to_dict()
  cfg["model"].update(d_model=32, num_layers=2, mlp_dim=64, max_len=32, **model)
  cfg["model"]["attention"].update(num_heads=4)
  cfg["data"].update(name="python_source/small", data_dir=str(tmp / "tfds"), seq_len=16)
  cfg["sample"].update(num_tokens=8)
  cfg["train"].update(batch_size=8, num_steps=2, eval_every=2, eval_batches=1, checkpoint_every=2, log_every=1)
  return cfg


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """The workdir of a 2-step byte-level LM run: 2 attention layers of 4 heads."""
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("visualize")
  workdir = str(tmp / "work")
  loop.train(from_config_dict(_lm_config(tmp)), workdir)
  return workdir


def _pixels(path):
  height, width = matplotlib.image.imread(path).shape[:2]
  return width, height


def _numpy_layer_weights(params, normed_TD, layer):
  """float64 softmax(q.k / sqrt(H)) with the causal mask, from the layer's projection kernels and its input."""
  attn = params[f"layer_{layer}"]["AttentionMixer_0"]["attention"]
  x = np.asarray(normed_TD, np.float64)
  q = np.einsum("td,dnh->nth", x, np.asarray(attn["query"]["kernel"], np.float64))
  k = np.einsum("td,dnh->nth", x, np.asarray(attn["key"]["kernel"], np.float64))
  s = np.einsum("nth,nsh->nts", q, k) / np.sqrt(q.shape[-1])
  causal = np.tril(np.ones(s.shape[1:], bool))
  s = np.where(causal, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def test_attention_maps_of_a_trained_lm(lm_run, tmp_path):
  """Catches: a missing or extra layer image, a wrong image size, probabilities that are not the model's (a wrong
  scale, heads mixed up, the mask missing or shifted), unnormalised rows, and a fast path changed by the capture."""
  text = "def f(x):\n  return"
  outdir = str(tmp_path / "maps")
  paths = visualize.visualize(lm_run, text=text, outdir=outdir)
  assert [os.path.basename(p) for p in paths] == ["attention_layer_0.png", "attention_layer_1.png"]
  assert sorted(os.listdir(outdir)) == ["attention_layer_0.png", "attention_layer_1.png"]
  for path in paths:
    assert _pixels(path) == visualize.image_size(4, 4) == (1200, 300)

  model, params, config, tokenizer = seqjax.load(lm_run)
  tokens_T = visualize.lm_tokens(text, config, tokenizer)
  assert len(tokens_T) == len(text) + 1  # BOS first
  captured = visualize.capture_attention(model, params, tokens_T[None])
  # The input of each attention layer, taken by flax's own intermediates capture (independent of the sown weights).
  logits, state = model.apply({"params": params}, tokens_T[None], capture_intermediates=True, mutable=["intermediates"])
  np.testing.assert_array_equal(logits, model.apply({"params": params}, tokens_T[None]))
  assert sorted(captured) == [0, 1]
  for layer, weights_BNTS in captured.items():
    normed_TD = state["intermediates"][f"layer_{layer}"]["norm_mixer"]["__call__"][0][0]
    want = _numpy_layer_weights(params, normed_TD, layer)
    np.testing.assert_allclose(weights_BNTS[0], want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(weights_BNTS.sum(-1), 1.0, atol=1e-5)
    above = np.triu(np.ones(want.shape[1:], bool), k=1)
    np.testing.assert_array_equal(weights_BNTS[0][:, above], 0.0)


def test_scanned_stack_and_hybrid_pattern(tmp_path):
  """Catches: layers of a scanned stack not split, a non-attention layer given a map or the wrong index."""
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  cfg = _lm_config(tmp_path, vocab_size=16)
  for model_cfg, want in (({"scan_layers": True, "num_layers": 3}, [0, 1, 2]),
                          ({"mixer": "lstm,attention"}, [1])):
    run_cfg = _lm_config(tmp_path, vocab_size=16, **{k: v for k, v in model_cfg.items() if k != "num_layers"})
    run_cfg["model"]["num_layers"] = model_cfg.get("num_layers", cfg["model"]["num_layers"])
    model = DecoderLM(from_config_dict(run_cfg).model)
    params = model.init(jax.random.key(0), tokens)["params"]
    captured = visualize.capture_attention(model, params, tokens)
    assert sorted(captured) == want
    for weights in captured.values():
      assert weights.shape == (1, 4, 8, 8)
      np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_bad_input_is_a_clear_error(lm_run, tmp_path):
  """Each mistake names what was wrong and what to do, before any compute."""
  outdir = str(tmp_path / "maps")
  with pytest.raises(ValueError, match="exceed the run's model.max_len=32"):
    visualize.visualize(lm_run, text="x" * 40, outdir=outdir)
  with pytest.raises(ValueError, match="give --text"):
    visualize.visualize(lm_run, source="12", outdir=outdir)
  with pytest.raises(ValueError, match="--columns must be >= 1"):
    visualize.visualize(lm_run, text="a", columns=0)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    visualize.visualize(str(tmp_path / "nowhere"), text="a")
  assert not os.path.exists(outdir)


@pytest.mark.slow
def test_command_line(lm_run, tmp_path):
  """The module runs as a program (--dpi sets the size); a missing --text is one line on stderr and exit code 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  outdir = str(tmp_path / "cli")
  ok = subprocess.run([sys.executable, "-m", "seqjax.visualize", f"--workdir={lm_run}", "--text=ab",
                       f"--outdir={outdir}", "--dpi=50"], capture_output=True, text=True, env=env, cwd=ROOT,
                      check=False)
  assert ok.returncode == 0, ok.stderr
  assert sorted(os.listdir(outdir)) == ["attention_layer_0.png", "attention_layer_1.png"]
  assert _pixels(os.path.join(outdir, "attention_layer_0.png")) == visualize.image_size(4, 4, dpi=50) == (600, 150)
  bad = subprocess.run([sys.executable, "-m", "seqjax.visualize", f"--workdir={lm_run}"], capture_output=True,
                       text=True, env=env, cwd=ROOT, check=False)
  assert bad.returncode == 2 and "give --text" in bad.stderr


@pytest.mark.slow
def test_alignment_of_a_seq2seq_run(tmp_path):
  """The LSTM encoder-decoder's additive attention: one image per number, of the stated size, rows that sum to 1
  over the source characters, and the greedy translation the trainer's decoder gives."""
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel
  from tests.train.test_seq2seq_train import _config_dict  # pylint: disable=import-outside-toplevel
  cfg = _config_dict("smoke")
  cfg["data"]["data_dir"] = str(tmp_path / "tfds")
  cfg["train"].update(num_steps=2, checkpoint_every=2, eval_every=2, eval_batches=1)
  workdir = str(tmp_path / "work")
  loop.train(from_config_dict(cfg), workdir)
  paths = visualize.visualize(workdir, source="1204, 77", outdir=str(tmp_path / "maps"))
  assert [os.path.basename(p) for p in paths] == ["alignment_0.png", "alignment_1.png"]
  for path in paths:
    assert _pixels(path) == (600, 600)
  model, params, config, vocab = seqjax.load(workdir)
  output, labels, weights_TS = visualize.seq2seq_alignment(model, params, config, vocab, "1204")
  assert weights_TS.shape[1] == 4 and 1 <= weights_TS.shape[0] == len(labels) <= config.seq2seq.decode_max_len
  np.testing.assert_allclose(weights_TS.sum(-1), 1.0, atol=1e-5)
  from seqjax.data import numbers  # pylint: disable=import-outside-toplevel
  from seqjax.decode import seq2seq as seq2seq_decode  # pylint: disable=import-outside-toplevel
  tokens = seq2seq_decode.decode(model, params, np.asarray([vocab.encode("1204")]), np.asarray([4]),
                                 max_new_tokens=config.seq2seq.decode_max_len, bos_id=numbers.BOS_ID,
                                 eos_id=numbers.EOS_ID, pad_id=numbers.PAD_ID).tokens
  assert output == vocab.decode(np.asarray(tokens[0]))
