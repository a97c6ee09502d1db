"""The SSM mixers on a sequence-sharded mesh (the trainer's `jax.set_mesh` with mesh.seq > 1) = unsharded.

Each of s4d, s5, mamba, mamba2 and the linear mixers gla, deltanet, gated_deltanet runs on (data 2, seq 4) with
packed documents (one starting on a shard boundary, one spanning shards): output and parameter gradients equal the
unsharded module's, the step traces a `shard_map` and the compiled program holds the combine's collective (it
really ran context-parallel, not through XLA's gathering of the sequence). Catches:
Mamba's convolution without its halo from the left neighbour (or with the neighbour's tokens across a document
start), a scan that drops the incoming state, a replicated parameter's gradient not summed over the shards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from seqjax.config import ModelConfig, SsmConfig
from seqjax.nn.mixers import make_mixer
from seqjax.nn import sequence_parallel

B, T, D = 2, 32, 16  # 8 tokens per shard on seq 4
SEGMENTS = np.array([[1] * 8 + [2] * 13 + [3] * 11, [4] * 29 + [0] * 3], np.int32)
AXES = ("data", "fsdp", "tensor", "seq")


def _mesh():
  return jax.make_mesh((2, 1, 1, 4), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)


def _cfg(mixer):
  return ModelConfig(mixer=mixer, d_model=D, ssm=SsmConfig(state=4, head_dim=8, chunk=4))


@pytest.mark.parametrize("mixer", ["mamba2", "mamba", "gla", "deltanet"] + [
    pytest.param(m, marks=pytest.mark.slow) for m in ("s4d", "s5", "gated_deltanet")])  # their ops: the fast set
def test_mixer_on_sequence_sharded_mesh_equals_unsharded(mixer):
  module = make_mixer(mixer, _cfg(mixer))
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  seg = jnp.asarray(SEGMENTS)
  params = module.init(jax.random.key(1), x, segment_ids=seg)
  w = jax.random.normal(jax.random.key(2), (B, T, D))

  def loss(params, x):
    y = module.apply(params, x, segment_ids=seg)
    return jnp.sum(y * w), y

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, want_y), want_g = step(params, x)
  mesh = _mesh()
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
  with jax.set_mesh(mesh):
    assert sequence_parallel.active()
    assert "shard_map" in str(jax.make_jaxpr(step)(params, x_sharded))  # not left to XLA's partitioning
    compiled = step.lower(params, x_sharded).compile()
    (_, y), g = compiled(params, x_sharded)
    hlo = compiled.as_text()
  np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), atol=2e-5, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4), g,
               want_g)
  assert "all-gather" in hlo  # the combine of the shards' state maps (and its transpose in the backward)
  if mixer.startswith("mamba"):
    assert "collective-permute" in hlo  # the conv halo and the segment id of the left neighbour


def test_not_active_without_a_sequence_mesh():
  assert not sequence_parallel.active()
  with jax.set_mesh(jax.make_mesh((8, 1, 1, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)):
    assert not sequence_parallel.active()


def test_recurrent_mixer_refuses_a_sequence_sharded_mesh():
  """An LSTM's state is a nonlinear step-by-step recurrence: on a "seq" mesh it must refuse, not run wrong."""
  module = make_mixer("lstm", ModelConfig(mixer="lstm", d_model=D))
  x = jnp.ones((B, T, D))
  params = module.init(jax.random.key(0), x)
  with jax.set_mesh(_mesh()), pytest.raises(ValueError, match="sequence-sharded mesh"):
    module.apply(params, x)
