"""Synthetic tasks through the one training loop: the LM task learns answer positions only (loss and accuracy on
them, answer metrics in the run's files), the classification task (pooled read-out over a mixer stack) trains on
ListOps, both resume exactly, and configs that name a wrong dataset, split, length or task fail at once."""

import importlib.util
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import ConfigError, from_config_dict
from seqjax.models.classifier import SequenceClassifier, pool
from seqjax.train import loop, sharding
from seqjax.train.tasks.classify import ClassifyTask
from seqjax.train.tasks.lm import LMTask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config_dict(arg):
  spec = importlib.util.spec_from_file_location("synthetic_cfg", os.path.join(ROOT, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).to_dict()


def _smoke(variant, data_dir, **sections):
  cfg = _config_dict(f"{variant},smoke")
  cfg["data"]["data_dir"] = data_dir
  cfg["model"]["attention"]["implementation"] = "reference"
  for section, values in sections.items():
    cfg[section].update(values)
  return from_config_dict(cfg)


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _once():
  chex.clear_trace_counter()
  return lambda name, fn: chex.assert_max_traces(fn, n=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic_tfds"))


def _resumes_exactly(config, workdir, final, resumed):
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(config.train.num_steps)))  # As if killed after step 6.
  os.remove(os.path.join(resumed, "final_metrics.json"))
  again = loop.train(config, resumed, wrap_jitted=_once())
  assert again["state_sha256"] == final["state_sha256"]


def test_mqar_smoke_run_writes_answer_accuracy(data_dir, tmp_path):
  """The MQAR smoke config end to end on 8 simulated devices: answer_accuracy and sequence_accuracy in the eval
  records and final_metrics.json, one compilation per step function, generation listing answers and predictions.
  (Exact resume of the synthetic stream: the ListOps run below.)"""
  config = _smoke("mqar", data_dir)
  workdir = str(tmp_path / "work")
  final = loop.train(config, workdir, wrap_jitted=_once())
  assert final["step"] == 12 and "bits_per_byte" not in final
  for key in ("answer_accuracy", "sequence_accuracy", "loss"):
    assert key in final and np.isfinite(final[key])
  assert final["answer_accuracy"] == final["accuracy"]
  # Every validation example of mqar/small has 4 answers: 2 batches x 16 rows x 4.
  assert final["tokens"] == 2 * 16 * 4
  assert [r["step"] for r in _records(workdir, "eval")] == [6, 12]
  assert "answer_accuracy" in _records(workdir, "eval")[-1]
  with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
    assert json.load(f)["answer_accuracy"] == final["answer_accuracy"]
  samples = loop.generate(config, workdir)
  assert len(samples) == config.sample.num_samples and samples[0].startswith("answers [")


def test_lm_loss_is_taken_on_answer_positions_only(data_dir):
  """The task's loss and evaluation sums against a NumPy float64 cross-entropy over the loss-mask positions; targets
  changed off the answer positions change nothing. Catches: weights that are all ones (the loss would include the
  filler positions), a mask shifted by one, sequence accuracy counting unscored rows."""
  config = _smoke("mqar", data_dir)
  mesh = sharding.make_mesh(config.mesh)
  task = LMTask(config, mesh)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  batch = next(task.train_stream(0, None))
  mask = batch["weights"] > 0
  assert mask.sum() == 4 * batch["inputs"].shape[0]  # Four answers per MQAR example.
  logits = np.asarray(jax.jit(task.model.apply)({"params": params}, jnp.asarray(batch["inputs"])), np.float64)
  loss_fn = jax.jit(task.loss_sum, static_argnums=3)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  loss_sum, weight = loss_fn(params, sharding.put_batch(batch, mesh), None, True)
  np.testing.assert_allclose(float(loss_sum), nll[mask].sum(), rtol=1e-5)
  assert float(weight) == mask.sum()
  scrambled = dict(batch, targets=np.where(mask, batch["targets"], (batch["targets"] + 7) % 8192))
  np.testing.assert_allclose(float(loss_fn(params, sharding.put_batch(scrambled, mesh), None, True)[0]),
                             float(loss_sum), rtol=1e-6)
  sums = jax.device_get(jax.jit(task.eval_sums)(params, sharding.put_batch(batch, mesh)))
  right = logits.argmax(-1) == batch["targets"]
  assert float(sums["correct"]) == right[mask].sum()
  assert float(sums["rows_correct"]) == sum(right[b][mask[b]].all() for b in range(len(mask)))
  assert float(sums["rows"]) == len(mask)


def test_listops_classification_smoke_run(data_dir, tmp_path):
  """config.task="classify" on listops/small: loss and accuracy logged at each evaluation and in
  final_metrics.json, accuracy over exactly the validation examples seen, exact resume from the step-6 checkpoint
  (the synthetic stream's grain state restored)."""
  config = _smoke("listops", data_dir)
  assert config.task == "classify"
  workdir = str(tmp_path / "work")
  final = loop.train(config, workdir, wrap_jitted=_once())
  assert final["step"] == 12 and 0 <= final["accuracy"] <= 1 and np.isfinite(final["loss"])
  assert final["examples"] == 2 * 16
  assert {"loss", "accuracy"} <= set(_records(workdir, "eval")[-1])
  assert "loss" in _records(workdir, "train")[-1]
  _resumes_exactly(config, workdir, final, str(tmp_path / "resumed"))


def test_classify_eval_covers_the_whole_split_once(data_dir):
  """eval_batches=0 scores every validation example once (the last batch's padding rows have weight 0)."""
  config = _smoke("listops", data_dir, train={"eval_batches": 0, "batch_size": 48})
  mesh = sharding.make_mesh(config.mesh)
  task = ClassifyTask(config, mesh)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  metrics = task.evaluate(params, jax.jit(task.eval_sums), None).metrics
  assert metrics["examples"] == 128  # listops/small's validation split; 128 = 2 x 48 + 32.


@pytest.mark.parametrize("how", ["mean", "last", "first"])
def test_pooling_against_numpy(how):
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3, 5, 4)).astype(np.float32)
  seg = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
  lengths = seg.sum(1)
  want = {"mean": np.stack([h[b, :lengths[b]].mean(0) for b in range(3)]),
          "last": np.stack([h[b, lengths[b] - 1] for b in range(3)]),
          "first": h[:, 0]}[how]
  np.testing.assert_allclose(np.asarray(pool(jnp.asarray(h), jnp.asarray(seg), how)), want, rtol=1e-6)


@pytest.mark.parametrize("mixer", ["attention", "mamba", "lstm"])
@pytest.mark.parametrize("how", ["mean", "last"])
def test_classifier_ignores_padding(mixer, how):
  """A causal stack's classification of an example does not change when padding is appended. Catches: pooling over
  padding, reading the last position instead of the example's last token."""
  cfg = from_config_dict({
      "data": {"seq_len": 16}, "sample": {"num_tokens": 8},
      "model": {"mixer": mixer, "d_model": 16, "num_layers": 2, "mlp_dim": 32, "vocab_size": 16, "max_len": 16,
                "attention": {"num_heads": 2, "implementation": "reference"}, "ssm": {"state": 4}}}).model
  model = SequenceClassifier(cfg, num_classes=10, pooling=how)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 16, size=(1, 9)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens)
  padded = jnp.pad(tokens, ((0, 0), (0, 7)))
  seg = jnp.pad(jnp.ones_like(tokens), ((0, 0), (0, 7)))
  np.testing.assert_allclose(np.asarray(model.apply(params, padded, segment_ids=seg)),
                             np.asarray(model.apply(params, tokens)), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("change, message", [
    ({"data": {"name": "mqar/len65"}}, r"config\.data\.name: unknown setting 'len65' of synthetic task 'mqar'"),
    ({"data": {"name": "listops/small"}}, r"config\.task: 'listops/small' is a 'classify' dataset; set "
                                          r"task='classify'"),
    ({"data": {"seq_len": 32}}, r"config\.data\.seq_len: 32 is shorter than the 'train' examples of 'mqar/small' "
                                r"\(64 tokens\); set data\.seq_len=64"),
    ({"data": {"eval_split": "test_len128"}}, r"config\.data\.eval_split: 'mqar/small' has no split 'test_len128'"),
    ({"task": "classify"}, r"config\.task: 'mqar/small' is a 'lm' dataset; set task='lm'"),
    ({"task": "classify", "data": {"name": "python_source"}}, r"config\.data\.name: task 'classify' trains on a "
                                                              r"classification dataset"),
    ({"classify": {"pooling": "max"}}, r"config\.classify\.pooling: got 'max'; allowed: 'mean', 'last', 'first'"),
])
def test_config_errors_name_the_field(change, message):
  cfg = _config_dict("mqar,smoke")
  for key, value in change.items():
    if isinstance(value, dict):
      cfg[key].update(value)
    else:
      cfg[key] = value
  with pytest.raises(ConfigError, match=message):
    from_config_dict(cfg)


def test_longer_evaluation_than_learned_positions_is_refused(data_dir):
  config = _smoke("induction_heads", data_dir, data={"eval_split": "test_len128"}, model={"max_len": 64})
  with pytest.raises(ConfigError, match=r"config\.model\.max_len: the 'test_len128' examples of 'induction_heads/"
                                        r"small' have 128 tokens, more than the learned position table"):
    LMTask(config, sharding.make_mesh(config.mesh))


def test_answers_only_read_out_equals_the_full_head():
  """`lm_loss_sum(model, K)` (the head applied to each row's K answer positions) against the full [B, T, V] head:
  the same loss sum, weight and gradients, and the same evaluation sums, on rows with 0, 1 and K answers, an
  answer at position 0 and one at the last position. Catches (each planted once): filling short rows with position
  0 (that row's answer at 0 counted twice); narrowing the weights but not the targets fails on shapes. A row with more than K answers is refused on the host."""
  from seqjax.config import AttentionConfig, ModelConfig  # pylint: disable=import-outside-toplevel
  from seqjax.models.lm import DecoderLM  # pylint: disable=import-outside-toplevel
  from seqjax.train.tasks.lm import check_answers_per_row, lm_eval_sums, lm_loss_sum  # pylint: disable=import-outside-toplevel

  k, t, v = 3, 12, 97
  model = DecoderLM(ModelConfig(vocab_size=v, d_model=32, num_layers=2, mlp_dim=64, max_len=t, mixer="attention",
                                attention=AttentionConfig(num_heads=2, implementation="reference")))
  rng = np.random.default_rng(0)
  weights = np.zeros((4, t), np.float32)
  weights[0, [0, 5]] = 1  # Fewer than K, one at position 0.
  weights[1, [2, 7, t - 1]] = 1  # K, one at the end.
  weights[3, [4]] = 1  # Row 2 has none.
  batch = {"inputs": rng.integers(0, v, (4, t)).astype(np.int32), "targets": rng.integers(0, v, (4, t)).astype(np.int32),
           "weights": weights, "segment_ids": np.ones((4, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (4, t)).copy(),
           "target_bytes": rng.integers(1, 3, (4, t)).astype(np.int32)}
  params = model.init(jax.random.PRNGKey(1), jnp.asarray(batch["inputs"]))["params"]
  full, narrow = lm_loss_sum(model), lm_loss_sum(model, k)

  def value_and_grad(loss_sum):
    total, weight = loss_sum(params, batch, None, True)
    return total, weight, jax.grad(lambda p: loss_sum(p, batch, None, True)[0])(params)

  want_total, want_weight, want_grads = value_and_grad(full)
  got_total, got_weight, got_grads = value_and_grad(narrow)
  np.testing.assert_allclose(float(got_total), float(want_total), rtol=1e-5)
  assert float(got_weight) == float(want_weight) == 6
  chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-7)
  want = jax.device_get(lm_eval_sums(model, params, batch, per_row=True))
  got = jax.device_get(lm_eval_sums(model, params, batch, per_row=True, answers_per_row=k))
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)
  check_answers_per_row(weights, k)
  weights[2, :k + 1] = 1
  with pytest.raises(ValueError, match=r"4 weighted \(answer\) positions, more than the 3"):
    check_answers_per_row(weights, k)


def test_stop_when_finishes_at_the_first_evaluation_that_meets_it(data_dir, tmp_path):
  """train.stop_when: a threshold every evaluation meets stops after the first one (step 6 of 12), with its
  checkpoint saved and stopped_early in final_metrics.json, and resuming it without the rule trains on to step 12;
  one no evaluation meets trains all 12 steps; a metric the
  task does not report, or a rule that does not parse, is a ConfigError naming the field. Catches: stopping before
  the save (no checkpoint at 6), a comparison the wrong way round (the first run would go on)."""
  stop = loop.train(_smoke("mqar", data_dir, train={"stop_when": "answer_accuracy >= 0"}), str(tmp_path / "a"))
  assert stop["step"] == 6 and stop["stopped_early"] == 1.0
  assert os.path.isdir(tmp_path / "a" / "checkpoints" / "6")
  assert [r["step"] for r in _records(str(tmp_path / "a"), "eval")] == [6]
  on = loop.train(_smoke("mqar", data_dir, train={"stop_when": ""}), str(tmp_path / "a"))  # Allowed on resume.
  assert on["step"] == 12 and "stopped_early" not in on
  full = loop.train(_smoke("mqar", data_dir, train={"stop_when": "loss<=-1"}), str(tmp_path / "b"))
  assert full["step"] == 12 and "stopped_early" not in full
  with pytest.raises(ConfigError, match=r"train.stop_when names 'bleu'.*answer_accuracy"):
    loop.train(_smoke("mqar", data_dir, train={"stop_when": "bleu>=1"}), str(tmp_path / "c"))
  for bad in ("answer_accuracy>0.9", "answer_accuracy>=high", ">=0.5"):
    with pytest.raises(ConfigError, match="train.stop_when"):
      _smoke("mqar", data_dir, train={"stop_when": bad})
