"""The Performer's feature redraw in training: model.linear.redraw_every = N redraws the random features every N
steps (draw = step // N, from the step alone), evaluation uses draw 0, and an interrupted run resumes bitwise."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from seqjax.config import default_config_dict, from_config_dict
from seqjax.models.lm import DecoderLM
from seqjax.train import loop
from seqjax.train.tasks.lm import FEATURE_STEP_KEY, lm_eval_sums, lm_loss_sum, performer_redraw_every
from tests.train.helpers import synthetic_batch, tiny_config

EVERY = 2


def _performer(**linear):
  linear = {"num_heads": 2, "num_features": 8, "redraw_every": EVERY, **linear}
  return tiny_config(model={"mixer": "performer", "num_layers": 1, "linear": linear})


def test_loss_uses_draw_step_over_every_and_evaluation_draw_0():
  config = _performer()
  model = DecoderLM(config.model)
  batch = {k: jax.numpy.asarray(v) for k, v in synthetic_batch().items()}
  params = model.init({"params": jax.random.key(0)}, batch["inputs"][:1])["params"]
  loss_sum = jax.jit(lambda p, b: lm_loss_sum(model)(p, b, None, True)[0])
  grad = jax.jit(jax.grad(lambda p, b: lm_loss_sum(model)(p, b, None, True)[0]))

  def at(step):
    return {**batch, FEATURE_STEP_KEY: jax.numpy.full((batch["inputs"].shape[0],), step, jax.numpy.int32)}

  losses = [float(loss_sum(params, at(s))) for s in range(5)]
  assert losses[0] == losses[1] and losses[2] == losses[3]  # Within a window: the same features.
  assert len({losses[0], losses[2], losses[4]}) == 3, losses  # Across a boundary: other features, another loss.
  g0, g1, g2 = (grad(params, at(s)) for s in (0, 1, 2))
  jax.tree.map(np.testing.assert_array_equal, g0, g1)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g2)))
  # A batch without the step (evaluation, generation) uses draw 0: the features of the first EVERY steps.
  assert float(loss_sum(params, batch)) == losses[0]
  assert float(lm_eval_sums(model, params, batch)["loss_sum"]) == pytest.approx(losses[0], rel=1e-6)


def test_redraw_every_applies_only_to_performer_stacks():
  assert performer_redraw_every(_performer().model) == EVERY
  assert performer_redraw_every(_performer(redraw_every=0).model) == 0
  assert performer_redraw_every(tiny_config(model={"mixer": "linear", "linear": {"redraw_every": 3}}).model) == 0
  assert performer_redraw_every(tiny_config(model={"mixer": "performer,attention",
                                                   "linear": {"redraw_every": 3}}).model) == 3


def test_task_puts_the_step_in_the_batch_and_logs_the_draw():
  """LMTask.device_batch / step_inputs on a stand-in task object (no data is built)."""
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from seqjax.train import sharding  # pylint: disable=import-outside-toplevel
  from seqjax.train.tasks.lm import LMTask  # pylint: disable=import-outside-toplevel

  task = SimpleNamespace(_redraw_every=EVERY, answers_per_row=0, mesh=sharding.make_mesh(tiny_config().mesh))
  device = LMTask.device_batch(task, synthetic_batch(), 5)
  np.testing.assert_array_equal(np.asarray(device[FEATURE_STEP_KEY]), np.full((8,), 5, np.int32))
  np.testing.assert_array_equal(np.asarray(device["inputs"]), synthetic_batch()["inputs"])
  assert LMTask.step_inputs(task, 5) == {"performer_feature_draw": 2}
  assert LMTask.step_inputs(SimpleNamespace(_redraw_every=0), 5) == {}


def _run_config(tmp_path):
  cfg = default_config_dict().to_dict()
  cfg["model"].update(mixer="performer", d_model=32, num_layers=1, mlp_dim=64, max_len=32)
  cfg["model"]["linear"].update(num_heads=2, num_features=8, redraw_every=EVERY)
  cfg["data"].update(name="python_source/small", data_dir=str(tmp_path / "tfds"), seq_len=32)
  cfg["sample"].update(num_tokens=8)
  cfg["train"].update(batch_size=8, num_steps=6, eval_every=6, eval_batches=1, checkpoint_every=2, log_every=1)
  return from_config_dict(cfg)


def _draws_logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["performer_feature_draw"] for r in records if r.get("split") == "train"}


@pytest.mark.slow  # Four short runs through loop.train (~1-4 min on the shared CPU).
def test_training_redraws_every_n_steps_and_resumes_exactly(tmp_path):
  config = _run_config(tmp_path)
  straight = loop.train(config, str(tmp_path / "straight"))
  # The record of step s is the update from state.step = s - 1: draws 0, 0, 1, 1, 2, 2.
  assert _draws_logged(tmp_path / "straight") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}
  assert straight["performer_feature_draw"] == 2

  def preempt_in_the_third_update(name, fn):
    if name != "train_step":
      return fn

    def sigterm_at(step):
      if int(step) == 2:  # The 3rd update (draw 1) runs: the loop finishes a step, saves it and returns.
        os.kill(os.getpid(), signal.SIGTERM)

    def wrapped(state, batch):
      jax.debug.callback(sigterm_at, state.step)
      return fn(state, batch)
    return wrapped

  first = loop.train(config, str(tmp_path / "resumed"), wrap_jitted=preempt_in_the_third_update)
  assert first["preempted"] == 1.0 and 3 <= first["step"] < 6, first
  resumed = loop.train(config, str(tmp_path / "resumed"))
  assert resumed["step"] == 6 and resumed["state_sha256"] == straight["state_sha256"]
  assert resumed["bits_per_byte"] == straight["bits_per_byte"]
  # With a window longer than the run (draw 0 throughout, the same key derivation) training ends elsewhere: the
  # redraws are really used.
  never = dataclasses.replace(config, model=dataclasses.replace(
      config.model, linear=dataclasses.replace(config.model.linear, redraw_every=100)))
  fixed = loop.train(never, str(tmp_path / "fixed"))
  assert fixed["state_sha256"] != straight["state_sha256"]
