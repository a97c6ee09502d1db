"""The accelerator program, proven on a CPU: the LM's jitted train step exports for TPU and for CUDA.

`jax.export.export(jitted, platforms=(...))` lowers the whole step (forward, backward, optimizer) for a platform
this machine does not have, and refuses custom calls it cannot vouch for. The bug this catches: an op dispatching
to a native CPU kernel (`seqjax.cpu_kernels`, an FFI custom call) by asking which backend the *process* has, so that
a program lowered here for a pod still calls the CPU kernel. Each case also reads the custom-call targets of the
exported module and asserts none is a CPU kernel. Default settings throughout (CPU kernels on "auto", the LM's
default "blockwise" attention, which on a CPU runs the C++ kernel); abstract shapes only, nothing is compiled.

cuDNN attention cannot be lowered without cuDNN present, and a Pallas GPU (Triton) kernel needs
`disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]`; neither is in this step.
"""

import re

import jax
import optax
import pytest

from seqjax.models.lm import DecoderLM
from seqjax.ops import backend
from seqjax.train import sharding
from seqjax.train.state import abstract_train_state
from seqjax.train.step import make_train_step
from seqjax.train.tasks.lm import lm_loss_sum
from tests.train.helpers import synthetic_batch, tiny_config

SEQ = 16


def _custom_call_targets(mlir_text):
  return set(re.findall(r"custom_call @([\w$.]+)", mlir_text)) | set(
      re.findall(r'call_target_name = "([^"]+)"', mlir_text))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("mixer", ["attention", "mamba2", "mamba2,attention"])
def test_train_step_exports_for_tpu_and_cuda_without_cpu_calls(mixer):
  assert backend.get_cpu_kernels() == "auto" and jax.default_backend() == "cpu"  # the defaults of this machine
  cfg = tiny_config(model={"num_layers": 2, "mixer": mixer, "attention": {"implementation": "blockwise"}})
  model = DecoderLM(cfg.model)
  optimizer = optax.adamw(1e-3)
  state, _ = abstract_train_state(model, optimizer, seq_len=SEQ, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  step = jax.jit(make_train_step(lm_loss_sum(model), optimizer))
  args = (_abstract(state), _abstract(synthetic_batch(seq_len=SEQ)))
  for platform in ("tpu", "cuda"):
    exported = jax.export.export(step, platforms=(platform,))(*args)
    assert exported.platforms == (platform,)
    targets = _custom_call_targets(exported.mlir_module())
    assert not {t for t in targets if t.startswith("seqjax_")}, (platform, targets)


TRITON = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("mixer", ["attention", "mamba2,attention"])
def test_train_step_with_auto_attention_exports_with_each_platforms_kernel(mixer):
  """With attention "auto", the one jitted train step lowers to the splash kernel (`tpu_custom_call`) for TPU, the
  Triton kernel for CUDA (this process has no cuDNN, so "auto" takes the Pallas GPU kernel), and to neither for the
  CPU it runs on. Bug caught: "auto" deciding by the process's backend (blockwise everywhere, or an interpreted
  kernel in a pod's program). Length 128: splash tiles in multiples of 128 (shorter contexts fall back to blockwise).
  """
  seq = 128
  cfg = tiny_config(model={"num_layers": 2, "mixer": mixer, "max_len": seq, "attention": {"implementation": "auto"}},
                    data={"seq_len": seq})
  model = DecoderLM(cfg.model)
  optimizer = optax.adamw(1e-3)
  state, _ = abstract_train_state(model, optimizer, seq_len=seq, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  step = jax.jit(make_train_step(lm_loss_sum(model), optimizer))
  args = (_abstract(state), _abstract(synthetic_batch(seq_len=seq)))
  tpu = _custom_call_targets(jax.export.export(step, platforms=("tpu",))(*args).mlir_module())
  cuda = _custom_call_targets(jax.export.export(
      step, platforms=("cuda",), disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
                              .mlir_module())
  cpu = _custom_call_targets(step.lower(*args).as_text())
  assert "tpu_custom_call" in tpu and TRITON not in tpu, tpu
  assert TRITON in cuda and "tpu_custom_call" not in cuda, cuda
  assert not {"tpu_custom_call", TRITON} & cpu, cpu
  assert not {t for t in tpu | cuda if t.startswith("seqjax_")}, (tpu, cuda)
