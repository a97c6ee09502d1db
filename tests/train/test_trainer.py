"""The train step: learning, data-parallel equivalence, accumulation, checkpoint round trip, NaN handling."""

import jax
import numpy as np
import pytest

from seqjax.models.lm import DecoderLM
from seqjax.train import sharding
from seqjax.train.checkpoint import Checkpointer
from seqjax.train.optim import make_optimizer
from seqjax.train.state import abstract_train_state, create_train_state
from seqjax.train.step import jit_train_step, make_train_step
from seqjax.train.tasks.lm import lm_loss_sum
from tests.train.helpers import synthetic_batch, tiny_config


def _setup(config, devices=None, **step_kwargs):
  mesh = sharding.make_mesh(config.mesh, devices)
  model = DecoderLM(config.model)
  optimizer = make_optimizer(config.optim, config.train.num_steps)
  state, shardings = create_train_state(model, optimizer, seq_len=config.data.seq_len, seed=config.seed, mesh=mesh)
  step = jit_train_step(make_train_step(lm_loss_sum(model), optimizer,
                                        grad_accum_steps=config.train.grad_accum_steps, **step_kwargs),
                        shardings, sharding.batch_sharding(mesh))
  return mesh, model, optimizer, state, shardings, step


def _run(step, state, mesh, batches):
  losses = []
  for b in batches:
    state, metrics = step(state, sharding.put_batch(b, mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_overfits_one_batch():
  config = tiny_config(train={"num_steps": 40}, optim={"learning_rate": 1e-2})
  mesh, *_, state, _, step = _setup(config)
  batch = synthetic_batch()
  _, losses = _run(step, state, mesh, [batch] * 40)
  assert losses[-1] < 0.5 * losses[0], losses


def test_data_parallel_8_devices_equals_1_device():
  assert jax.device_count() == 8
  batches = [synthetic_batch(seed=i) for i in range(3)]
  config = tiny_config()
  mesh1, *_, state1, _, step1 = _setup(config, devices=jax.devices()[:1])
  mesh8, *_, state8, _, step8 = _setup(config)
  assert dict(mesh8.shape)["data"] == 8
  state1, losses1 = _run(step1, state1, mesh1, batches)
  state8, losses8 = _run(step8, state8, mesh8, batches)
  np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               state1.params, state8.params)


def test_fsdp_mesh_shards_params_and_matches():
  batches = [synthetic_batch(seed=i) for i in range(2)]
  config = tiny_config(mesh={"data": 2, "fsdp": 4})
  mesh, *_, state, _, step = _setup(config)
  kernel = state.params["layer_0"]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp", kernel.sharding
  _, losses = _run(step, state, mesh, batches)
  ref_config = tiny_config()
  mesh1, *_, state1, _, step1 = _setup(ref_config, devices=jax.devices()[:1])
  _, ref = _run(step1, state1, mesh1, batches)
  np.testing.assert_allclose(losses, ref, rtol=1e-5)


def test_grad_accumulation_matches_full_batch():
  batches = [synthetic_batch(seed=i) for i in range(2)]
  mesh, *_, state, _, step = _setup(tiny_config(), devices=jax.devices()[:1])
  state_a, losses_a = _run(step, state, mesh, batches)
  mesh, *_, state, _, step = _setup(tiny_config(train={"grad_accum_steps": 4}), devices=jax.devices()[:1])
  state_b, losses_b = _run(step, state, mesh, batches)
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               state_a.params, state_b.params)


def test_checkpoint_roundtrip_gives_identical_next_step(tmp_path):
  config = tiny_config()
  mesh, model, optimizer, state, _, step = _setup(config)
  batches = [synthetic_batch(seed=i) for i in range(3)]
  state, _ = _run(step, state, mesh, batches[:2])
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
  ckpt.save(2, state, {"position": 7})
  ckpt.wait()
  abstract, _ = abstract_train_state(model, optimizer, seq_len=config.data.seq_len, mesh=mesh)
  restored_step, restored, data_state = ckpt.restore_latest(abstract)
  ckpt.close()
  assert restored_step == 2 and data_state == {"position": 7}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, restored)
  # donate_argnums consumes the input state, so compare the continuation from each copy.
  copy = jax.tree.map(lambda x: x.copy(), state)
  next_a, loss_a = _run(step, copy, mesh, batches[2:])
  next_b, loss_b = _run(step, restored, mesh, batches[2:])
  assert loss_a == loss_b
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), next_a, next_b)


def test_skip_mode_drops_nonfinite_updates():
  config = tiny_config()
  mesh, _, _, state, _, step = _setup(config, devices=jax.devices()[:1], on_nan="skip")
  before = jax.tree.map(lambda x: np.asarray(x).copy(), state.params)
  bad = synthetic_batch()
  bad["weights"][0, 0] = np.nan
  state, metrics = step(state, sharding.put_batch(bad, mesh))
  assert not bool(metrics["finite"])
  assert int(state.skipped_steps) == 1 and int(state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, state.params)
  state, metrics = step(state, sharding.put_batch(synthetic_batch(), mesh))
  assert bool(metrics["finite"]) and int(state.skipped_steps) == 1


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="need 16 devices but 8 are available"):
    sharding.make_mesh(tiny_config(mesh={"data": 4, "fsdp": 4}).mesh)


def test_loop_compiles_each_step_once_also_across_a_rollback(tmp_path, monkeypatch):
  """The LM through loop.train, in-process: a NaN at step 5 is rolled back (reload step 4, skip 5's batch), and the
  train and eval steps are each traced once in the whole run (chex.assert_max_traces via `wrap_jitted`)."""
  import chex  # pylint: disable=import-outside-toplevel
  from seqjax.config import default_config_dict, from_config_dict  # pylint: disable=import-outside-toplevel
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel

  cfg = default_config_dict().to_dict()
  cfg["model"].update(d_model=32, num_layers=1, mlp_dim=64, max_len=32)
  cfg["model"]["attention"].update(num_heads=2)
  cfg["data"].update(name="python_source/small", data_dir=str(tmp_path / "tfds"), seq_len=32)
  cfg["sample"].update(num_tokens=8)
  cfg["train"].update(batch_size=8, num_steps=8, eval_every=4, eval_batches=1, checkpoint_every=2, log_every=1,
                      on_nan="rollback")
  monkeypatch.setenv("SEQJAX_FAULTS", "nan_at=5")
  wrapped = []

  def guard(name, fn):
    wrapped.append(name)
    return chex.assert_max_traces(fn, n=1)

  chex.clear_trace_counter()
  final = loop.train(from_config_dict(cfg), str(tmp_path / "work"), wrap_jitted=guard)
  assert sorted(wrapped) == ["eval_step", "train_step"]
  assert final["step"] == 8 and final["skipped_steps"] == 1
