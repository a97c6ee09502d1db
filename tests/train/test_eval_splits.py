"""--mode=eval over several splits in one run (config.data.eval_splits): every split's metrics, each equal to an
evaluation of that split alone and to answers recomputed from the model's logits on that split's own examples, one
file per split, and every mistake (unknown split, a split longer than the learned positions) refused before any
checkpoint is read."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import ConfigError, from_config_dict, to_dict
from seqjax.data.synthetic import builders
from seqjax.train import loop
from seqjax.train.saved import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPLITS = ("validation", "test_len64", "test_len128")  # induction_heads/small: trained at 32 tokens.


def _config(data_dir, **data):
  spec = importlib.util.spec_from_file_location("synthetic_cfg", os.path.join(ROOT, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config("induction_heads,smoke").to_dict()
  cfg["data"].update(data_dir=data_dir, **data)
  cfg["model"]["attention"]["implementation"] = "reference"
  cfg["model"]["positions"] = "rope"
  cfg["train"]["eval_batches"] = 0  # Whole splits: the oracle below reads every example.
  return from_config_dict(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("run") / "work")
  loop.train(_config(data_dir), workdir)
  return data_dir, workdir


def _oracle_accuracy(data_dir, workdir, split):
  """The fraction of the split's examples whose last-position argmax is the target, from the saved model applied
  to the examples as the builder stored them (no seqjax data pipeline or evaluation code)."""
  model, params, _, _ = load(workdir)
  source = builders.make_builder("induction_heads/small", data_dir).as_data_source(split=split)
  examples = [source[i] for i in range(len(source))]
  inputs = jnp.asarray(np.stack([e["inputs"] for e in examples]))
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, inputs)
  predicted = np.asarray(jnp.argmax(logits[:, -1], -1))
  return float(np.mean(predicted == np.array([e["targets"][-1] for e in examples]))), len(examples)


def test_several_splits_in_one_run_match_single_split_evaluations(trained):
  """Each split of data.eval_splits gets the metrics an evaluation of that split alone gets, and the accuracy the
  model's own predictions on that split's examples give (a mix-up of splits, or one split's data reused for all,
  fails); eval_<split>.json and eval_splits.json hold them."""
  data_dir, workdir = trained
  result = loop.evaluate_checkpoint(_config(data_dir, eval_splits=",".join(SPLITS)), workdir)
  assert result["step"] == 12 and list(result["splits"]) == list(SPLITS)
  with open(os.path.join(workdir, "eval_splits.json"), encoding="utf-8") as f:
    assert json.load(f) == result
  alone = loop.evaluate_checkpoint(_config(data_dir, eval_split=SPLITS[-1]), workdir)
  assert alone == {"step": 12, **result["splits"][SPLITS[-1]]}
  for split in SPLITS:
    metrics = result["splits"][split]
    with open(os.path.join(workdir, f"eval_{split}.json"), encoding="utf-8") as f:
      assert json.load(f) == {"step": 12, "split": split, **metrics}
    accuracy, count = _oracle_accuracy(data_dir, workdir, split)
    assert metrics["tokens"] == count  # One answer per example, every example once.
    np.testing.assert_allclose(metrics["answer_accuracy"], accuracy, atol=1e-6)


def test_unknown_split_is_refused_with_the_list_of_splits(tmp_path):
  with pytest.raises(ConfigError, match=r"data.eval_splits.*test_len9.*splits: train, validation, test, test_len64"):
    _config(str(tmp_path), eval_splits="validation,test_len9")
  with pytest.raises(ConfigError, match="data.eval_splits.*twice"):
    _config(str(tmp_path), eval_splits="test_len64,test_len64")
  with pytest.raises(ConfigError, match="data.eval_splits.*empty name"):
    _config(str(tmp_path), eval_splits="validation,,test_len64")


def test_a_split_longer_than_learned_positions_fails_before_the_checkpoint_is_read(trained, tmp_path):
  """max_len 64 with learned positions: test_len128 cannot be read; the error names model.max_len, before any
  checkpoint is looked for (an empty workdir would otherwise say 'no checkpoint')."""
  data_dir, _ = trained
  cfg = _config(data_dir, eval_splits="test_len64,test_len128")
  cfg = from_config_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "positions": "learned", "max_len": 64}})
  with pytest.raises(ConfigError, match=r"model.max_len.*test_len128"):
    loop.evaluate_checkpoint(cfg, str(tmp_path / "empty"))
