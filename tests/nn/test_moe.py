"""The mixture-of-experts MLP in the model and the trainer: expert parallelism on 8 devices = one device, the
auxiliary losses in the training loss and the metrics, MoE placement every k-th block, config errors.

(The ops are checked against float64 NumPy in tests/ops/moe; the LM's cached decoding with MoE blocks in
tests/nn/test_mixer_contract.py.)"""

import dataclasses
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from seqjax.config import ConfigError, MeshConfig
from seqjax.models.lm import DecoderLM
from seqjax.nn.moe import EXPERT_MESH_AXIS, MoeMlp, moe_losses
from seqjax.train import loop, sharding
from seqjax.train.tasks.lm import lm_loss_sum
from tests.train.helpers import synthetic_batch, tiny_config

J, B, T, D, F = 8, 8, 12, 16, 24


@pytest.mark.parametrize("capacity_factor", [1.0, 0.0], ids=["capacity", "dropless"])
def test_experts_split_over_8_devices_equal_one_device(capacity_factor):
  """Weights [J, ...] split over the mesh's "data" axis (one expert per device), tokens split by rows, traced under
  jax.set_mesh so the expert buffers are pinned to the expert axis: output, sown losses and gradients = the same
  layer on one device. Catches: capacity counted per device instead of per row, an expert applied to another
  expert's tokens after the all-to-all, a sharding rule that splits something other than the expert axis."""
  layer = MoeMlp(J, 2, F, kind="gated", activation="silu", capacity_factor=capacity_factor)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  valid = jnp.arange(T)[None] < jnp.asarray([T, T - 5] * (B // 2))[:, None]
  boxed = layer.init(jax.random.key(1), x)
  params = nn.unbox(boxed)["params"]

  def loss(params, x):
    y, sown = layer.apply({"params": params}, x, valid_BT=valid, mutable=["moe"])
    aux = moe_losses(sown["moe"])
    return jnp.sum(y ** 2) + aux["load_balance_loss"][0] + aux["router_z_loss"][0], (y, aux)

  run = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (ref_loss, (ref_y, ref_aux)), ref_grads = run(params, x)

  mesh = sharding.make_mesh(MeshConfig())
  assert dict(mesh.shape)[EXPERT_MESH_AXIS] == 8
  placed = jax.device_put(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh))["params"]
  assert placed["wi"].sharding.spec[0] == EXPERT_MESH_AXIS, placed["wi"].sharding
  assert len(placed["wi"].addressable_shards[0].data) == 1  # One expert per device.
  x_sharded = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  with jax.set_mesh(mesh):
    (got_loss, (got_y, got_aux)), got_grads = run(placed, x_sharded)
    hlo = run.lower(placed, x_sharded).compile().as_text()
  if capacity_factor:
    assert "all-to-all" in hlo or "all-gather" in hlo  # Tokens travel to their experts' devices.
  chex.assert_trees_all_close((got_loss, got_y, got_aux, got_grads), (ref_loss, ref_y, ref_aux, ref_grads),
                              rtol=1e-5, atol=1e-5)


def test_training_loss_adds_the_weighted_aux_losses_and_reports_them():
  """loss_sum / weight = token cross-entropy + load_balance_weight * sum over MoE layers of the Switch loss +
  z_loss_weight * sum of the z-losses; extras / weight = their per-layer means. Catches: aux losses left out of the
  loss (or of the gradient), a weight applied to the wrong loss, a mean over layers where the sum belongs."""
  config = tiny_config(model={"num_layers": 4, "moe": {"num_experts": 4, "top_k": 2, "every": 2,
                                                       "load_balance_weight": 0.5, "z_loss_weight": 0.25}})
  model = DecoderLM(config.model)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch().items()}
  params = nn.unbox(model.init(jax.random.key(0), batch["inputs"])["params"])
  assert sorted(k for k in params if "moe" in params[k]) == ["layer_1", "layer_3"]
  assert "mlp" in params["layer_0"] and "mlp" not in params["layer_1"]
  total, weight, extras = jax.jit(lm_loss_sum(model), static_argnums=3)(params, batch, None, True)
  logits, sown = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], segment_ids=b["segment_ids"],
                                                  positions=b["positions"], mutable=["moe"]))(params, batch)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  lb = [float(sown["moe"][f"layer_{i}"]["moe"]["load_balance_loss"][0]) for i in (1, 3)]
  z = [float(sown["moe"][f"layer_{i}"]["moe"]["router_z_loss"][0]) for i in (1, 3)]
  np.testing.assert_allclose(float(total / weight), float(jnp.mean(ce)) + 0.5 * sum(lb) + 0.25 * sum(z), rtol=1e-5)
  np.testing.assert_allclose(float(extras["moe_load_balance_loss"] / weight), np.mean(lb), rtol=1e-5)
  np.testing.assert_allclose(float(extras["moe_router_z_loss"] / weight), np.mean(z), rtol=1e-5)
  assert 0.0 <= float(extras["moe_dropped_fraction"] / weight) < 1.0
  # The router learns from the aux losses: their gradient reaches it.
  aux = lambda p: sum(lm_loss_sum(model)(p, batch, None, True)[2][k] for k in ("moe_load_balance_loss",  # noqa: E731
                                                                                "moe_router_z_loss"))
  grad = jax.jit(jax.grad(aux))(params)["layer_1"]["moe"]["router"]
  assert float(jnp.abs(grad).max()) > 0


def test_moe_smoke_run_from_the_config_logs_the_aux_losses(tmp_path):
  """configs/lm_pysrc.py:moe,smoke trains end to end on 8 devices (experts split over them), one compilation of
  the step; the train records carry the aux losses (finite, load balance >= 1 - eps near uniform at the start)."""
  from tests.test_config import load_config  # pylint: disable=import-outside-toplevel
  cfg = load_config("lm_pysrc", "moe,smoke")
  cfg.data.data_dir, cfg.data.name = str(tmp_path / "tfds"), "python_source/small"
  cfg.model.attention.implementation = "reference"
  cfg.train.num_steps, cfg.train.eval_every, cfg.train.checkpoint_every = 10, 10, 10
  from seqjax.config import from_config_dict  # pylint: disable=import-outside-toplevel
  config = from_config_dict(cfg)
  assert config.model.moe.num_experts == 8 and config.model.moe.expert_dim * 2 == config.model.mlp_dim
  chex.clear_trace_counter()
  workdir = str(tmp_path / "work")
  final = loop.train(config, workdir, wrap_jitted=lambda name, fn: chex.assert_max_traces(fn, n=1))
  assert final["step"] == 10 and np.isfinite(final["loss"])
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    train = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert train and all(k in r for r in train for k in ("moe_load_balance_loss", "moe_router_z_loss",
                                                          "moe_dropped_fraction"))
  for r in train:
    assert 0.99 < r["moe_load_balance_loss"] < 8 and r["moe_router_z_loss"] > 0 and 0 <= r["moe_dropped_fraction"] < 1


@pytest.mark.parametrize("change, message", [
    ({"num_layers": 2, "moe": {"num_experts": 4, "every": 3}}, "moe.every: 3 exceeds num_layers=2"),
    ({"scan_layers": True, "moe": {"num_experts": 4, "every": 2}}, "nn.scan needs identical blocks"),
    ({"mlp": "none", "moe": {"num_experts": 4}}, "model.mlp: is 'none'"),
    ({"moe": {"num_experts": 4, "top_k": 5}}, "moe.top_k: must be between 1 and num_experts=4"),
    ({"moe": {"num_experts": 4, "capacity_factor": -1.0}}, "moe.capacity_factor: must be >= 0"),
], ids=["every", "scan", "no_mlp", "top_k", "capacity"])
def test_config_errors_name_the_field(change, message):
  with pytest.raises(ConfigError, match=message):
    tiny_config(model=change)
