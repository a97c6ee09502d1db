"""The seq2seq task (config.task="seq2seq") through the one training loop: the smoke config end to end (compiling
each step once per curriculum length), exact resume, the logged schedules, evaluation and generation from the
checkpoint, the task's loss inside the train step, config validation. Faults (kill -9, SIGTERM, rollback, time-based
saves) are in tests/train/test_faults.py, parametrised over tasks."""

import dataclasses
import importlib.util
import json
import logging
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from seqjax.config import ConfigError, from_config_dict, with_seq2seq_vocab_sizes
from seqjax.data import numbers
from seqjax.models.seq2seq_lstm import seq2seq_loss
from seqjax.train import loop, sharding
from seqjax.train.optim import make_optimizer
from seqjax.train.schedules import LengthCurriculum, make_teacher_forcing_schedule
from seqjax.train.state import init_train_state
from seqjax.train.step import jit_train_step, make_train_step
from seqjax.train.tasks.seq2seq import Seq2SeqTask, with_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config_dict(arg=None):
  spec = importlib.util.spec_from_file_location("seq2seq_numbers", os.path.join(ROOT, "configs", "seq2seq_numbers.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).to_dict()


def _smoke(data_dir, **train):
  cfg = _config_dict("smoke")
  cfg["data"]["data_dir"] = data_dir
  cfg["train"].update(train)
  return from_config_dict(cfg)


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("s2s_tfds"))


def _trace_guard(train_step_traces):
  """`wrap_jitted` for loop.train: the train step may compile `train_step_traces` times (once per curriculum length
  of the run's steps), the eval step once (its batches are padded to one shape)."""
  limits = {"train_step": train_step_traces, "eval_step": 1}
  chex.clear_trace_counter()
  return lambda name, fn: chex.assert_max_traces(fn, n=limits[name])


def test_smoke_run_end_to_end(data_dir, tmp_path, caplog):
  """The smoke config on the 8 simulated devices (12 steps, evaluations and checkpoints at 6 and 12), then resume,
  evaluation and generation from its workdir. One test so that parallel test workers run the training once."""
  config = _smoke(data_dir)
  assert (config.train.num_steps, config.train.checkpoint_every, config.train.eval_every) == (12, 6, 6)
  workdir = str(tmp_path / "work")
  # Targets of at most 16 tokens in steps 1-6, then the longest (checked below): two train-step programs.
  final = loop.train(config, workdir, wrap_jitted=_trace_guard(2))
  run = (config, workdir, final)
  _check_metrics_checkpoints_and_curves(run)
  _check_logged_teacher_forcing_and_curriculum_are_the_schedules(run)
  _check_resume_continues_exactly_from_the_checkpoint(run, str(tmp_path / "resumed"), caplog)
  _check_evaluate_and_generate_from_the_checkpoint(run)


def _check_metrics_checkpoints_and_curves(run):
  config, workdir, final = run
  assert jax.device_count() == 8  # Data parallel over the simulated devices.
  for key in ("step", "loss", "exact_match", "bleu", "rouge_l", "teacher_forcing_prob", "max_target_length",
              "skipped_steps", "state_sha256"):
    assert key in final, key
  assert final["step"] == 12 and final["skipped_steps"] == 0
  assert np.isfinite(final["loss"]) and 0 < final["loss"] < np.log(numbers.VOCAB.size) + 1
  assert 0 <= final["exact_match"] <= 1 and 0 <= final["bleu"] <= 100 and 0 <= final["rouge_l"] <= 1
  with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
    assert json.load(f)["state_sha256"] == final["state_sha256"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
  for name in ("curves.png", "config.json", "examples.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert [r["step"] for r in _records(workdir, "eval")] == [6, 12]
  assert {"exact_match", "bleu", "rouge_l", "loss"} <= set(_records(workdir, "eval")[-1])
  with open(os.path.join(workdir, "examples.jsonl"), encoding="utf-8") as f:
    examples = [json.loads(line) for line in f]
  assert [e["step"] for e in examples] == [6, 12]
  assert len(examples[-1]["examples"]) == config.seq2seq.log_examples
  ex = examples[-1]["examples"][0]
  assert ex["ref"] == numbers.number_to_words(int(ex["src"]))


def _check_logged_teacher_forcing_and_curriculum_are_the_schedules(run):
  config, workdir, final = run
  job_schedule = make_teacher_forcing_schedule(config.seq2seq.teacher_forcing,
                                               **config.seq2seq.teacher_forcing_kwargs())
  longest = max(len(t) for s, t in numbers.load_pairs(
      numbers.make_builder(config.data.data_dir, "small"), "train") if len(s) <= config.seq2seq.max_digits) + 1
  curriculum = LengthCurriculum(config.seq2seq.curriculum_start, longest, config.seq2seq.curriculum_warmup_steps,
                                config.seq2seq.curriculum_every)
  train = _records(workdir, "train")
  assert [r["step"] for r in train] == [3, 6, 9, 12]
  for r in train:  # The record at step N reports the values the N-th update (from state.step N - 1) used.
    np.testing.assert_allclose(r["teacher_forcing_prob"], float(job_schedule(r["step"] - 1)), rtol=1e-6)
    assert r["max_target_length"] == curriculum(r["step"] - 1)
  lengths = [r["max_target_length"] for r in train]
  assert lengths[0] == 16 and lengths[-1] == longest > 16  # It grew...
  probs = [r["teacher_forcing_prob"] for r in train]
  assert probs[0] < 1 and all(a > b for a, b in zip(probs, probs[1:]))  # ...and the probability decayed.
  np.testing.assert_allclose(final["teacher_forcing_prob"], float(job_schedule(11)), rtol=1e-6)
  assert final["max_target_length"] == longest


def _check_resume_continues_exactly_from_the_checkpoint(run, resumed, caplog):
  config, workdir, final = run
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "12"))  # As if killed after the save at step 6.
  os.remove(os.path.join(resumed, "final_metrics.json"))
  with caplog.at_level(logging.INFO, logger="seqjax.train.loop"):
    again = loop.train(config, resumed, wrap_jitted=_trace_guard(1))  # Steps 7-12: one length.
  assert "resumed from the checkpoint at step 6" in caplog.text
  assert again["state_sha256"] == final["state_sha256"]  # Same state and same data stream: bitwise.
  for key in ("loss", "exact_match", "bleu"):
    assert again[key] == final[key], key
  timeless = lambda records: [{k: v for k, v in r.items() if k != "examples_per_sec"} for r in records]  # noqa: E731
  assert timeless(_records(resumed, "train")) == timeless(_records(workdir, "train"))  # Replaced, not appended.


def _check_evaluate_and_generate_from_the_checkpoint(run):
  config, workdir, final = run
  metrics = loop.evaluate_checkpoint(config, workdir)
  assert metrics["step"] == 12
  for key in ("loss", "exact_match", "bleu", "rouge_l"):
    np.testing.assert_allclose(metrics[key], final[key], rtol=1e-6)
  out = loop.generate(dataclasses.replace(config, sample=dataclasses.replace(config.sample, prompt="12, 7 905")),
                         workdir)
  assert [o.split(" -> ")[0] for o in out] == ["12", "7", "905"]


def test_generate_rejects_a_prompt_that_is_not_digits_before_loading(tmp_path):
  cfg = _config_dict("smoke")
  cfg["sample"]["prompt"] = "twelve"
  with pytest.raises(ConfigError, match="config.sample.prompt"):
    loop.generate(from_config_dict(cfg), str(tmp_path / "nothing"))
  assert not os.path.exists(tmp_path / "nothing")  # Refused before anything was built.


def test_task_loss_in_the_train_step_is_the_seq2seq_loss(data_dir):
  """Seq2SeqTask.loss_sum through seqjax.train.step at p=1 (and eval_sums): seq2seq_loss of the plain model."""
  cfg = _config_dict("smoke")
  cfg["data"]["data_dir"] = data_dir
  cfg["seq2seq"].update(teacher_forcing="constant", teacher_forcing_prob=1.0)
  config = from_config_dict(cfg)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  task = Seq2SeqTask(config, mesh)
  assert task.config.seq2seq.src_vocab == task.config.seq2seq.tgt_vocab == numbers.VOCAB.size  # The tokenizer's.
  pairs = [(str(n), numbers.number_to_words(n)) for n in (5, 17, 204, 999, 40, 3, 61, 700)]
  batch = with_weights(next(numbers.padded_batches(pairs, 8, max_target_length=24, seed=0)))
  optimizer = make_optimizer(config.optim, 10)
  state, shardings = init_train_state(task.init_params, optimizer, seed=0, mesh=mesh)
  expected, _ = seq2seq_loss(task.model.apply({"params": state.params}, batch["src"], batch["src_lengths"],
                                              batch["tgt_in"]), batch["tgt_out"], batch["tgt_lengths"])
  sums = jax.jit(task.eval_sums)(state.params, task.device_batch(batch, 0))
  np.testing.assert_allclose(float(sums["loss_sum"] / sums["weight"]), float(expected), rtol=1e-5)
  step = jit_train_step(make_train_step(task.loss_sum, optimizer), shardings, sharding.batch_sharding(mesh))
  _, metrics = step(state, task.device_batch(batch, 0))
  np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
  assert int(metrics["tokens"]) == int(batch["tgt_lengths"].sum())


@pytest.mark.parametrize("section, field, value, message", [
    ("data", "name", "python_source", "config.data.name"),
    ("seq2seq", "src_vocab", -1, "config.seq2seq.src_vocab: must be >= 0"),
    ("seq2seq", "teacher_forcing_k", 0.5, "config.seq2seq.teacher_forcing_k"),
    ("seq2seq", "curriculum_end", 8, "config.seq2seq.curriculum_end"),
    ("seq2seq", "hidden", 0, "config.seq2seq.hidden"),
    ("seq2seq", "teacher_forcing", "cosine", "allowed: 'constant'"),
])
def test_bad_seq2seq_config_names_the_field(section, field, value, message):
  cfg = _config_dict()
  cfg[section][field] = value
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    from_config_dict(cfg)


def test_vocabulary_sizes_come_from_the_tokenizer_unless_set():
  config = from_config_dict(_config_dict("smoke"))
  assert (config.seq2seq.src_vocab, config.seq2seq.tgt_vocab) == (0, 0)
  resolved = with_seq2seq_vocab_sizes(config, 42, 40)
  assert (resolved.seq2seq.src_vocab, resolved.seq2seq.tgt_vocab) == (42, 40)
  padded = dataclasses.replace(config, seq2seq=dataclasses.replace(config.seq2seq, tgt_vocab=64))
  assert with_seq2seq_vocab_sizes(padded, 42, 42).seq2seq.tgt_vocab == 64
  small = dataclasses.replace(config, seq2seq=dataclasses.replace(config.seq2seq, src_vocab=10))
  with pytest.raises(ConfigError, match=r"config\.seq2seq\.src_vocab: 10 is smaller than the tokenizer's"):
    with_seq2seq_vocab_sizes(small, 42, 42)


def test_rollback_is_accepted_for_seq2seq():
  cfg = _config_dict("smoke")
  cfg["train"]["on_nan"] = "rollback"
  assert from_config_dict(cfg).train.on_nan == "rollback"


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_shipped_config_validates_and_skips_lm_cross_checks(arg):
  cfg = _config_dict(arg)
  cfg["sample"]["num_tokens"] = cfg["model"]["max_len"] + 1  # An LM-only constraint: not checked for seq2seq.
  config = from_config_dict(cfg)
  assert config.task == "seq2seq" and config.data.name.startswith("numbers_to_words/")
  schedule = make_teacher_forcing_schedule(config.seq2seq.teacher_forcing,
                                           **config.seq2seq.teacher_forcing_kwargs())
  assert float(schedule(0)) > float(schedule(config.train.num_steps))
  cfg["task"] = "lm"
  with pytest.raises(ConfigError, match="sample.num_tokens"):
    from_config_dict(cfg)
