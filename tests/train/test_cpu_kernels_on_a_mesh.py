"""Native CPU kernels under a multi-device mesh do not gather their operands onto every device.

XLA cannot partition a custom call: inside a jitted step whose batch is split over 8 devices, an FFI kernel would
run on operands all-gathered onto every device (every layer's activations, on every step). The trainer traces its
step under its mesh (`seqjax.train.sharding.mesh_context`), and there `seqjax.ops.backend` runs the ops' JAX code
(`partitioned_trace`). Compared from the compiled HLO of the (data 8) train step of an attention LM (blockwise
attention, MLP, LayerNorm and the dense projections all have CPU kernels):
- with the kernels on ("auto") the step holds no seqjax custom call and no more all-gathers than with them off;
- the control: the same step traced without the mesh context does call the kernels and holds more all-gathers
  (so the comparison can see the bug it is for);
- on one device the kernels still run (the custom calls are in the program).
"""

import dataclasses
import re

import jax
import optax
import pytest

from seqjax.cpu_kernels import binding
from seqjax.models.lm import DecoderLM
from seqjax.ops import backend
from seqjax.train import sharding
from seqjax.train.state import abstract_train_state
from seqjax.train.step import jit_train_step, make_train_step
from seqjax.train.tasks.lm import lm_loss_sum
from tests.train.test_step import SEQ, config, uneven_batch

pytestmark = pytest.mark.skipif(binding("dense") is None, reason="the CPU kernels do not build here")


def _compiled_step_hlo(mesh_axes, *, mode, mesh_context=True):
  cfg = config(model={"attention": {"implementation": "blockwise"}})
  cfg = dataclasses.replace(cfg, mesh=config(mesh=mesh_axes).mesh)
  devices = jax.devices()[:1] if mesh_axes.get("data") == 1 else None
  mesh = sharding.make_mesh(cfg.mesh, devices)
  model = DecoderLM(cfg.model)
  optimizer = optax.sgd(0.1)
  abstract, shardings = abstract_train_state(model, optimizer, seq_len=SEQ, mesh=mesh)
  step = jit_train_step(make_train_step(lm_loss_sum(model), optimizer), shardings, sharding.batch_sharding(mesh))
  jitted = getattr(step, "jitted", step)
  batch = sharding.put_batch(uneven_batch(), mesh)
  with backend.cpu_kernels_mode(mode):
    if mesh_context:
      with sharding.mesh_context(mesh):
        return jitted.lower(abstract, batch).compile().as_text()
    return jitted.lower(abstract, batch).compile().as_text()


def _all_gathers(hlo):
  return len(re.findall(r"= [^=]*? all-gather(?:-start)?\(", hlo))


def _kernel_calls(hlo):
  return len(re.findall(r'custom_call_target="seqjax_', hlo))


def test_8_device_step_has_no_kernel_caused_all_gather():
  with_kernels = _compiled_step_hlo({"data": 8}, mode="auto")
  without = _compiled_step_hlo({"data": 8}, mode="off")
  assert _kernel_calls(with_kernels) == 0
  assert _all_gathers(with_kernels) == _all_gathers(without)
  # The control: traced without the mesh, the kernels run on gathered operands.
  leaky = _compiled_step_hlo({"data": 8}, mode="auto", mesh_context=False)
  assert _kernel_calls(leaky) > 0
  assert _all_gathers(leaky) > _all_gathers(without)


def test_one_device_step_still_runs_the_kernels():
  assert _kernel_calls(_compiled_step_hlo({"data": 1}, mode="auto")) > 0
