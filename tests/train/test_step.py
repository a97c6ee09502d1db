"""The gradient scale of the train step, seen through plain SGD, and meshes against one device.

The trainer tests compare accumulation and data parallelism after AdamW steps, and Adam divides a constant factor
out of the gradient (its update is m / sqrt(v)): a step whose gradients were 4x too small passes them. Here the
optimizer is `optax.sgd(lr)`, so the parameters after one step are params - lr * gradient, and metrics["grad_norm"]
is compared directly:
- grad_accum_steps=4 against 1, and 8 devices (data=8) against 1, on a batch whose rows carry different numbers of
  real tokens (a mean of per-micro-batch or per-device means differs from the weighted mean over the batch);
- both against `jax.grad` of an independently written loss: the weighted mean token cross-entropy
  sum(w (logsumexp(logits) - logits[target])) / sum(w) from `model.apply` logits;
- tensor- and sequence-axis meshes (tensor=2 or seq=2, data filling the rest) against one device, with the LM's
  default attention kernel and with the reference one;
- one bfloat16 step against the float32 step.
Parameter changes are compared as deltas (new - old = -lr * g), never as parameters, whose size would hide them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.models.lm import DecoderLM
from seqjax.train import sharding
from seqjax.train.state import TrainState, abstract_train_state
from seqjax.train.step import jit_train_step, make_train_step
from seqjax.train.tasks.lm import lm_loss_sum
from tests.random_params import random_lm_params
from tests.train.helpers import synthetic_batch, tiny_config

LR = 0.5
SEQ = 16


def config(**overrides):
  """tiny_config with one layer (the gradient scale and the sharding do not depend on the depth; compiling does)."""
  model = {"num_layers": 1, **overrides.pop("model", {})}
  return tiny_config(model=model, **overrides)


def uneven_batch(seed=0):
  """8 rows of two packed documents; rows end in 0..7 padding positions (weight 0), so rows weigh differently."""
  batch = synthetic_batch(batch_size=8, seq_len=SEQ, seed=seed)
  for row in range(8):
    pad = row if row % 2 else 2 * row  # 0, 1, 4, 3, 8, 5, 12, 7
    if pad:
      batch["segment_ids"][row, -pad:] = 0
      batch["positions"][row, -pad:] = 0
      batch["weights"][row, -pad:] = 0.0
      batch["target_bytes"][row, -pad:] = 0
  return batch


def one_sgd_step(config, params, batch, devices=None):
  """(loss, grad_norm, params after one SGD step) of the real train step on a mesh of `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = DecoderLM(config.model)
  optimizer = optax.sgd(LR)
  _, shardings = abstract_train_state(model, optimizer, seq_len=SEQ, mesh=mesh)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                     rng=jax.random.PRNGKey(0), skipped_steps=jnp.zeros((), jnp.int32))
  state = jax.device_put(state, shardings)
  step = jit_train_step(make_train_step(lm_loss_sum(model), optimizer, grad_accum_steps=config.train.grad_accum_steps),
                        shardings, sharding.batch_sharding(mesh))
  new_state, metrics = step(state, sharding.put_batch(batch, mesh))
  return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(new_state.params)


def oracle_loss_and_grads(config, params, batch):
  """The weighted mean token cross-entropy written from the logits (no seqjax loss code), and its gradient."""
  model = DecoderLM(config.model)

  def loss(params):
    logits_BTV = model.apply({"params": params}, jnp.asarray(batch["inputs"]),
                             segment_ids=jnp.asarray(batch["segment_ids"]), positions=jnp.asarray(batch["positions"]))
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
    w_BT = jnp.asarray(batch["weights"])
    return jnp.sum(w_BT * (log_z_BT - picked_BT)) / jnp.sum(w_BT)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), jax.device_get(grads)


@functools.lru_cache(maxsize=None)
def shared_case(implementation="reference"):
  """Params, batch and the one-device step of the plain config, computed once per process and implementation."""
  cfg = config(model={"attention": {"implementation": implementation}})
  params = random_lm_params(DecoderLM(cfg.model), SEQ)
  batch = uneven_batch()
  return cfg, params, batch, one_sgd_step(cfg, params, batch, jax.devices()[:1])


def global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree))))


def assert_same_step(a, b, params, rtol=2e-5, what=""):
  """Same loss, grad norm and parameter change (as a delta, with a tolerance relative to its size)."""
  (loss_a, norm_a, new_a), (loss_b, norm_b, new_b) = a, b
  assert loss_a == pytest.approx(loss_b, rel=rtol), what
  assert norm_a == pytest.approx(norm_b, rel=rtol), what
  deltas_a = jax.tree.map(lambda n, p: np.asarray(n, np.float64) - p, new_a, params)
  deltas_b = jax.tree.map(lambda n, p: np.asarray(n, np.float64) - p, new_b, params)
  scale = max(float(np.max(np.abs(d))) for d in jax.tree.leaves(deltas_b))
  for (path, da), db in zip(jax.tree_util.tree_leaves_with_path(deltas_a), jax.tree.leaves(deltas_b)):
    np.testing.assert_allclose(da, db, rtol=0, atol=10 * rtol * scale, err_msg=f"{what} {jax.tree_util.keystr(path)}")


def test_grad_accumulation_one_sgd_step_equals_full_batch():
  """Catches (planted by rewriting make_train_step in a scratch plugin): the accumulated gradient divided by an
  extra grad_accum_steps (passes every AdamW comparison), each micro-batch normalised by its own weight (a mean of
  micro-batch means)."""
  cfg, params, batch, full = shared_case()
  accumulated = one_sgd_step(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=4)),
                             params, batch, jax.devices()[:1])
  assert_same_step(accumulated, full, params, what="grad_accum_steps=4 vs 1")


def test_data_parallel_8_devices_one_sgd_step_equals_1_device():
  """Catches (planted by monkeypatching sharding.put_batch): every device given the first rows of the batch
  (a data-parallel input bug invisible on one device)."""
  assert jax.device_count() == 8
  cfg, params, batch, single = shared_case()
  eight = one_sgd_step(cfg, params, batch)
  assert_same_step(eight, single, params, what="8 devices vs 1")


@functools.lru_cache(maxsize=None)
def oracle_step():
  cfg, params, batch, _ = shared_case()
  loss, grads = oracle_loss_and_grads(cfg, params, batch)
  return loss, global_norm(grads), jax.tree.map(lambda p, g: p - LR * np.asarray(g, np.float64), params, grads)


@pytest.mark.parametrize("grad_accum_steps, all_devices", [(1, False), (4, True)])
def test_grad_norm_and_update_match_an_independent_loss(grad_accum_steps, all_devices):
  """metrics["loss"], metrics["grad_norm"] and the SGD update against jax.grad of a loss written from the logits.

  Catches (planted by rewriting make_train_step / lm_loss_sum): grad_norm measured before the division by the total
  weight, the loss's weight taken over all positions (padding included), the extra 1 / grad_accum_steps (the
  accumulating case), the gradient of the unnormalised sum."""
  cfg, params, batch, single = shared_case()
  if grad_accum_steps == 1 and not all_devices:
    got = single
  else:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=grad_accum_steps))
    got = one_sgd_step(cfg, params, batch, None if all_devices else jax.devices()[:1])
  assert_same_step(got, oracle_step(), params, rtol=3e-5, what="train step vs independent loss")


@pytest.mark.parametrize("mesh, implementation", [({"data": 4, "tensor": 2}, "blockwise"),
                                                  ({"data": 4, "seq": 2}, "blockwise"),
                                                  pytest.param({"data": 4, "tensor": 2}, "reference",
                                                               marks=pytest.mark.slow)])  # ~6 s: XLA partitions it
def test_tensor_and_sequence_meshes_equal_1_device(mesh, implementation):
  """Loss, grad norm and the SGD update on tensor / sequence meshes of the 8 devices equal one device's.

  "blockwise" is the LM's default kernel (on a CPU the native kernel, an FFI custom call XLA does not partition, so
  it runs on gathered operands); with "reference" XLA partitions the attention itself over the tensor-sharded heads.
  Catches (planted): every device given the first rows of the batch (put_batch), on every mesh."""
  cfg, params, batch, single = shared_case(implementation)
  sharded = one_sgd_step(dataclasses.replace(cfg, mesh=config(mesh=mesh).mesh), params, batch)
  assert_same_step(sharded, single, params, what=f"mesh {mesh}")


def test_bf16_train_step_close_to_float32():
  """One step in model.dtype="bfloat16" against the float32 step, same params and batch, default attention kernel.

  Tolerances: bfloat16 rounds each activation to 8 significant bits (relative error up to 2^-9, 0.2%), while the
  softmax statistics, the loss and the gradient sums stay float32. The loss is a mean over ~90 tokens and the
  gradient norm a sum over every parameter, so their independent rounding errors largely cancel: measured here
  ~1e-4 relative. We allow 0.3% for the loss and 0.5% for the gradient norm (above one bf16 rounding, far below
  what a wrong bf16-only code path gives), and a cosine above 0.999 between the two parameter changes.

  Catches (each planted once by rewriting the bf16-only code paths in a scratch plugin): the plain-JAX LayerNorm
  (taken for bfloat16; float32 runs the CPU kernel) dropping its bias, the plain-JAX MLP (idem) applying relu
  instead of gelu."""
  cfg32, params, batch, (loss32, norm32, new32) = shared_case("blockwise")  # the LM's default kernel
  cfg16 = dataclasses.replace(cfg32, model=dataclasses.replace(cfg32.model, dtype="bfloat16"))
  loss16, norm16, new16 = one_sgd_step(cfg16, params, batch, jax.devices()[:1])
  assert loss16 == pytest.approx(loss32, rel=3e-3)
  assert norm16 == pytest.approx(norm32, rel=5e-3)
  flat = lambda new: np.concatenate([(np.asarray(n, np.float64) - p).ravel()  # noqa: E731
                                     for n, p in zip(jax.tree.leaves(new), jax.tree.leaves(params))])
  d32, d16 = flat(new32), flat(new16)
  assert float(d32 @ d16 / np.linalg.norm(d32) / np.linalg.norm(d16)) > 0.999
