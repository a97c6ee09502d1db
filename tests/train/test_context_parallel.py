"""Context parallelism in the LM: a train step on a sequence-sharded mesh equals the 1-device step.

On a mesh with mesh.seq > 1 the batch is split along the sequence and attention runs inside `shard_map` over the
"seq" axis (`model.context_parallel`: "ring" or "all_gather"). Compared, as in test_step.py, by one plain-SGD step
(loss, grad_norm and the parameter deltas) against one device, on packed rows with padding. Catches: a shard
attending with the wrong global positions or to the wrong documents (the loss changes), gradients of K/V not
returned to their shard (the deltas change), and a mesh on which attention silently does not run context-parallel
(the compiled step must hold the ring's collective-permutes, or the all-gather).
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from seqjax.models.lm import DecoderLM
from seqjax.train import sharding
from seqjax.train.state import abstract_train_state
from seqjax.train.step import jit_train_step, make_train_step
from seqjax.train.tasks.lm import lm_loss_sum
from tests.train.test_step import assert_same_step, config, one_sgd_step, shared_case, uneven_batch
from tests.random_params import random_lm_params


def _with(cfg, mesh, strategy, layout="contiguous"):
  return dataclasses.replace(cfg, mesh=config(mesh=mesh).mesh,
                             model=dataclasses.replace(cfg.model, context_parallel=strategy,
                                                       context_parallel_layout=layout))


@pytest.mark.parametrize("mesh, strategy, layout", [
    pytest.param({"data": 2, "seq": 4}, "ring", "contiguous", id="data2_seq4_ring"),
    pytest.param({"data": 2, "seq": 4}, "ring", "zigzag", id="data2_seq4_ring_zigzag"),
    pytest.param({"seq": 8, "data": 1}, "ring", "striped", id="seq8_ring_striped"),
    pytest.param({"data": 2, "seq": 4}, "all_gather", "zigzag", id="data2_seq4_all_gather_zigzag")])
def test_sequence_sharded_step_equals_1_device(mesh, strategy, layout):
  """Zigzag and striped: the step deals each batch to the "seq" devices in the layout's order (tokens, targets,
  weights, positions, segment ids) and the loss is the same."""
  cfg, params, batch, single = shared_case("blockwise")
  assert_same_step(one_sgd_step(_with(cfg, mesh, strategy, layout), params, batch), single, params,
                   what=f"{strategy} {layout} on {mesh}")


@pytest.mark.parametrize("strategy, collective", [("ring", "collective_permute"), ("all_gather", "all_gather")])
def test_the_step_really_runs_context_parallel(strategy, collective):
  cfg, params, batch, _ = shared_case("blockwise")
  cfg = _with(cfg, {"data": 2, "seq": 4}, strategy)
  mesh = sharding.make_mesh(cfg.mesh)
  model = DecoderLM(cfg.model)
  optimizer = optax.sgd(0.1)
  abstract, shardings = abstract_train_state(model, optimizer, seq_len=16, mesh=mesh)
  step = jit_train_step(make_train_step(lm_loss_sum(model), optimizer), shardings, sharding.batch_sharding(mesh))
  with sharding.mesh_context(mesh):
    hlo = step.jitted.lower(abstract, sharding.put_batch(batch, mesh)).as_text()
  assert collective in hlo


@pytest.mark.slow  # ~20 s; the fast set keeps the attention cases, the ten-step test below the hybrid too
def test_hybrid_with_rope_sequence_sharded_equals_1_device():
  """mamba2 + attention with RoPE (positions come from the sharded batch)."""
  cfg = config(model={"mixer": "mamba2,attention", "num_layers": 2, "positions": "rope",
                      "attention": {"implementation": "blockwise"}})
  params = random_lm_params(DecoderLM(cfg.model), 16)
  batch = uneven_batch()
  single = one_sgd_step(cfg, params, batch, jax.devices()[:1])
  sharded = one_sgd_step(dataclasses.replace(cfg, mesh=config(mesh={"data": 2, "seq": 4}).mesh), params, batch)
  assert_same_step(sharded, single, params, rtol=5e-5, what="hybrid on (data 2, seq 4)")


def test_mesh_context_only_on_sequence_sharded_meshes():
  cfg = config(mesh={"data": 2, "seq": 4})
  assert sharding.sequence_sharded(sharding.make_mesh(cfg.mesh))
  assert not sharding.sequence_sharded(sharding.make_mesh(config(mesh={"data": 8}).mesh))
  assert sharding.batch_sharding(sharding.make_mesh(cfg.mesh)).spec == jax.sharding.PartitionSpec(
      sharding.BATCH_AXES, "seq")


@pytest.mark.slow
@pytest.mark.parametrize("mixer, mesh, layout", [
    pytest.param("attention", {"data": 2, "seq": 4}, "zigzag", id="attention_data2_seq4_zigzag"),
    pytest.param("attention", {"seq": 8, "data": 1}, "striped", id="attention_seq8_striped"),
    pytest.param("mamba2", {"data": 2, "seq": 4}, "contiguous", id="mamba2_data2_seq4"),
    pytest.param("mamba2,attention", {"seq": 8, "data": 1}, "contiguous", id="hybrid_seq8"),
    pytest.param("mamba2", {"seq": 8, "data": 1}, "contiguous", id="mamba2_seq8"),
    pytest.param("mamba2,attention", {"data": 2, "seq": 4}, "contiguous", id="hybrid_data2_seq4")])
def test_ten_adamw_steps_equal_1_device(mixer, mesh, layout):
  """Ten AdamW steps (the trainer's optimizer, warm-up and clipping) on a sequence-sharded mesh = one device."""
  from tests.train.test_trainer import _run, _setup  # pylint: disable=import-outside-toplevel
  batches = [uneven_batch(seed=i) for i in range(10)]
  base = config(model={"mixer": mixer, "num_layers": 2, "positions": "rope", "context_parallel_layout": layout,
                       "attention": {"implementation": "blockwise"}})
  mesh1, *_, state1, _, step1 = _setup(base, devices=jax.devices()[:1])
  sharded_cfg = dataclasses.replace(base, mesh=config(mesh=mesh).mesh)
  mesh8, *_, state8, _, step8 = _setup(sharded_cfg)
  state1, losses1 = _run(step1, state1, mesh1, batches)
  state8, losses8 = _run(step8, state8, mesh8, batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
               state8.params, state1.params)


@pytest.mark.parametrize("mixer, mesh", [
    pytest.param("mamba2", {"seq": 8, "data": 1}, id="mamba2_seq8"),
    pytest.param("deltanet", {"data": 2, "seq": 4}, id="deltanet_data2_seq4"),
    pytest.param("mamba2,attention", {"data": 2, "seq": 4}, id="hybrid_data2_seq4",
                 marks=pytest.mark.slow)])  # ~25 s of CPU; the ten-step tests below train the hybrid too
def test_ssm_sequence_sharded_step_equals_1_device_and_data_8(mixer, mesh):
  """Mamba-2 layers run context-parallel (`seqjax.nn.sequence_parallel`): the conv halo from the left neighbour
  (on seq 8 a shard holds 2 tokens, so the 3-token halo spans two shards), the SSD states combined across "seq";
  DeltaNet's matrix state maps likewise (`delta_rule_context_parallel`); packed rows with documents crossing shard
  boundaries. One plain-SGD step = one device = (data 8)."""
  cfg = config(model={"mixer": mixer, "num_layers": len(mixer.split(",")), "positions": "rope",
                      "attention": {"implementation": "blockwise"}})
  params = random_lm_params(DecoderLM(cfg.model), 16)
  batch = uneven_batch()
  single = one_sgd_step(cfg, params, batch, jax.devices()[:1])
  data8 = one_sgd_step(dataclasses.replace(cfg, mesh=config(mesh={"data": 8}).mesh), params, batch)
  sharded = one_sgd_step(dataclasses.replace(cfg, mesh=config(mesh=mesh).mesh), params, batch)
  assert_same_step(sharded, single, params, rtol=5e-5, what=f"{mixer} on {mesh} vs 1 device")
  assert_same_step(sharded, data8, params, rtol=5e-5, what=f"{mixer} on {mesh} vs (data 8)")


def test_evaluation_runs_context_parallel_and_equals_1_device():
  """The trainer's evaluation step (`sharding.eval_in_mesh_context`) is traced under the mesh like the train step:
  on (data 2, seq 4) with the zigzag layout the LM's attention runs as ring attention and the sums equal one
  device's; a batch whose length the seq devices (x 2 for zigzag) do not split falls back to XLA's partitioning."""
  from seqjax.nn import attention as attention_nn  # pylint: disable=import-outside-toplevel
  from seqjax.train.tasks.lm import lm_eval_sums  # pylint: disable=import-outside-toplevel
  cfg, params, batch, _ = shared_case("blockwise")
  cfg = _with(cfg, {"data": 2, "seq": 4}, "ring", "zigzag")
  model = DecoderLM(cfg.model)
  mesh = sharding.make_mesh(cfg.mesh)
  traced_shards = []

  def sums(params, batch):
    traced_shards.append(attention_nn.context_parallel_shards())
    return lm_eval_sums(model, params, batch)

  want = jax.device_get(jax.jit(sums)(params, batch))
  step = sharding.eval_in_mesh_context(jax.jit(sums), mesh, cfg.model.context_parallel_layout)
  got = jax.device_get(step(params, sharding.put_batch(batch, mesh)))
  assert traced_shards == [1, 4]  # one device, then context-parallel over the 4 seq devices
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
  short = {k: v[:, :12] for k, v in batch.items()}  # 12 tokens: not a multiple of 2 x 4
  want_short = jax.device_get(jax.jit(sums)(params, short))
  got_short = jax.device_get(step(params, sharding.put_batch(short, mesh)))
  assert traced_shards[2:] == [1, 1]
  np.testing.assert_allclose(got_short["loss_sum"], want_short["loss_sum"], rtol=2e-5)
