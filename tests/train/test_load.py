"""`seqjax.load`: a trained run's model, params, config and tokenizer; generation from them; clear errors for a
missing or damaged workdir."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import seqjax
from seqjax.config import ConfigError, default_config_dict, from_config_dict
from seqjax.decode import generate
from seqjax.train.checkpoint import CheckpointRestoreError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The workdir of a 4-step LM run (checkpoints at steps 2 and 4)."""
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("load")
  cfg = default_config_dict().to_dict()
  cfg["model"].update(d_model=32, num_layers=1, mlp_dim=64, max_len=32)
  cfg["model"]["attention"].update(num_heads=2)
  cfg["data"].update(name="python_source/small", data_dir=str(tmp / "tfds"), seq_len=16)
  cfg["sample"].update(num_tokens=8)
  cfg["train"].update(batch_size=8, num_steps=4, eval_every=4, eval_batches=1, checkpoint_every=2, log_every=2)
  workdir = str(tmp / "work")
  loop.train(from_config_dict(cfg), workdir)
  return workdir


def test_load_gives_the_trained_model_and_generates(run):
  model, params, config, tokenizer = seqjax.load(run)
  assert config.model.vocab_size == tokenizer.vocab_size == 259 and config.train.num_steps == 4
  _, params2, _, _ = seqjax.load(run, step=2)
  leaves, leaves2 = jax.tree.leaves(params), jax.tree.leaves(params2)
  assert len(leaves) == len(leaves2) and any(not np.array_equal(a, b) for a, b in zip(leaves, leaves2))
  prompt = tokenizer.encode("def ", add_bos=True)[None]
  out = generate(model, params, prompt, max_new_tokens=8)
  assert out.tokens.shape == (1, prompt.shape[1] + 8)
  # The params are the ones the trainer itself restores from the newest checkpoint.
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel
  step, trained = loop._restore_params(loop.build_job(config, run))  # pylint: disable=protected-access
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, params, trained)


def test_missing_or_damaged_workdirs_are_clear_errors(run, tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    seqjax.load(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    seqjax.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
    seqjax.load(run, step=3)
  broken = shutil.copytree(run, str(tmp_path / "broken"))
  with open(os.path.join(broken, "config.json"), "w", encoding="utf-8") as f:
    f.write("{not json")
  with pytest.raises(ConfigError, match="cannot be read as a config"):
    seqjax.load(broken)
  damaged = shutil.copytree(run, str(tmp_path / "damaged"))
  with open(os.path.join(damaged, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  cfg["model"]["d_model"] = 48  # another config than the checkpoint's
  with open(os.path.join(damaged, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointRestoreError, match="do not match"):
    seqjax.load(damaged)
  shutil.rmtree(os.path.join(damaged, "checkpoints"))
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    seqjax.load(damaged)


@pytest.mark.slow
def test_load_a_seq2seq_run(tmp_path):
  """The seq2seq task's run: its LSTM encoder-decoder, the trained params and the numbers vocabulary."""
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel
  from seqjax.data import numbers  # pylint: disable=import-outside-toplevel
  from tests.train.test_seq2seq_train import _config_dict  # pylint: disable=import-outside-toplevel
  cfg = _config_dict("smoke")
  cfg["data"]["data_dir"] = str(tmp_path / "tfds")
  cfg["train"].update(num_steps=2, checkpoint_every=2, eval_every=2, eval_batches=1)
  workdir = str(tmp_path / "work")
  loop.train(from_config_dict(cfg), workdir)
  model, params, config, tokenizer = seqjax.load(workdir)
  assert type(model).__name__ == "Seq2SeqLSTM" and tokenizer is numbers.VOCAB and config.task == "seq2seq"
  step, trained = loop._restore_params(loop.build_job(config, workdir))  # pylint: disable=protected-access
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, params, trained)
