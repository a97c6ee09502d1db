"""Trap: an asynchronous save still being written while the next steps donate (reuse) the state's buffers."""

import os

import jax
import numpy as np

from seqjax.models.lm import DecoderLM
from seqjax.train import sharding
from seqjax.train.checkpoint import Checkpointer
from seqjax.train.faults import DelayedCommit
from seqjax.train.optim import make_optimizer
from seqjax.train.state import abstract_train_state, create_train_state
from seqjax.train.step import jit_train_step, make_train_step
from seqjax.train.tasks.lm import lm_loss_sum
from tests.train.helpers import synthetic_batch, tiny_config


def test_async_save_is_not_corrupted_by_donated_buffers(tmp_path):
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = DecoderLM(config.model)
  optimizer = make_optimizer(config.optim, config.train.num_steps)
  state, shardings = create_train_state(model, optimizer, seq_len=config.data.seq_len, seed=0, mesh=mesh)
  step = jit_train_step(make_train_step(lm_loss_sum(model), optimizer), shardings, sharding.batch_sharding(mesh))
  before = state
  state, _ = step(state, sharding.put_batch(synthetic_batch(seed=0), mesh))
  assert jax.tree.leaves(before.params)[0].is_deleted(), "the step should donate (else this test proves nothing)"
  expected = jax.tree.map(lambda x: np.array(x, copy=True), state)

  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
  # The commit stays in flight for a second while three more steps run, each donating the previous state.
  ckpt.save(1, state, {"position": 1}, {"fault_delay": DelayedCommit(1.0)})
  saved = state
  for i in range(1, 4):
    state, _ = step(state, sharding.put_batch(synthetic_batch(seed=i), mesh))
  jax.block_until_ready(state)
  assert not [d for d in os.listdir(ckpt.directory) if d.isdigit()], "the save should still be in flight"
  # On CPU orbax reads the arrays zero-copy, and JAX declines to donate a buffer that is still referenced (the
  # step copies instead); on accelerators orbax copies to host before `save` returns. Either way the checkpoint
  # must hold the values of step 1, not of a later step written into a reused buffer.
  del saved
  ckpt.wait()
  abstract, _ = abstract_train_state(model, optimizer, seq_len=config.data.seq_len, mesh=mesh)
  restored_step, restored, data_state = ckpt.restore_latest(abstract)
  ckpt.close()
  assert restored_step == 1 and data_state == {"position": 1}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), expected, restored)
