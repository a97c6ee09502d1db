"""Checkpoints move between meshes: a run saved on 8 devices (data 8) restores on (fsdp 4, tensor 2), on (data 2,
seq 4) and on 1 device, and evaluates to the same loss there.

Orbax restores each array into the sharding of the abstract state it is given (`Checkpointer.restore` with the
abstract state built on the *new* mesh, `seqjax.train.state.abstract_train_state`), reading only the pieces each
device needs. Bugs caught: a restore that keeps the saved layout (the arrays would not be sharded over the new
mesh's fsdp / tensor axes), one that scrambles shards when the layout changes (the parameters and the loss would
differ), and a loss that changes with the mesh (the sequence-sharded step dealing tokens differently).
"""

import jax
import numpy as np
import pytest

from seqjax.models.lm import DecoderLM
from seqjax.train import sharding
from seqjax.train.checkpoint import Checkpointer
from seqjax.train.optim import make_optimizer
from seqjax.train.state import abstract_train_state, create_train_state
from seqjax.train.tasks.lm import lm_eval_sums
from tests.train.helpers import synthetic_batch, tiny_config


def _config(mesh):
  return tiny_config(mesh=mesh, model={"attention": {"implementation": "blockwise"}})


def _parts(cfg, devices):
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:devices])
  model = DecoderLM(cfg.model)
  return mesh, model, make_optimizer(cfg.optim, cfg.train.num_steps)


def _eval_loss(model, params, mesh):
  """The mean token loss of a fixed packed batch, computed on `mesh` (sequence-sharded when it has "seq")."""
  with sharding.mesh_context(mesh):
    sums = jax.jit(lambda p, b: lm_eval_sums(model, p, b))(params, sharding.put_batch(synthetic_batch(seed=2), mesh))
  return float(sums["loss_sum"] / sums["weight"])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A train state created on (data 8) and saved; its arrays and its evaluation loss on that mesh."""
  cfg = _config({"data": 8})
  mesh, model, optimizer = _parts(cfg, 8)
  state, _ = create_train_state(model, optimizer, seq_len=cfg.data.seq_len, seed=3, mesh=mesh)
  directory = str(tmp_path_factory.mktemp("reshard") / "ckpt")
  ckpt = Checkpointer(directory, keep=1)
  ckpt.save(2, state, None)
  ckpt.close()
  return directory, jax.tree.map(np.asarray, state), _eval_loss(model, state.params, mesh)


def _split_axes(tree):
  """The mesh axes (of size > 1) some array of `tree` is really split over."""
  axes = set()
  for leaf in jax.tree.leaves(tree):
    sizes = dict(zip(leaf.sharding.mesh.axis_names, leaf.sharding.mesh.devices.shape))
    for entry in leaf.sharding.spec:
      axes.update(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a and sizes[a] > 1)
  return axes


@pytest.mark.parametrize("mesh, devices, sharded_over", [
    pytest.param({"data": 1, "fsdp": 4, "tensor": 2}, 8, {"fsdp", "tensor"}, id="fsdp4_tensor2"),
    pytest.param({"data": 2, "seq": 4}, 8, set(), id="data2_seq4"),
    pytest.param({"data": 1}, 1, set(), id="one_device")])
def test_restore_on_another_mesh_gives_the_same_loss(saved_run, mesh, devices, sharded_over):
  directory, saved_state, saved_loss = saved_run
  cfg = _config(mesh)
  new_mesh, model, optimizer = _parts(cfg, devices)
  abstract, _ = abstract_train_state(model, optimizer, seq_len=cfg.data.seq_len, mesh=new_mesh)
  ckpt = Checkpointer(directory, keep=1)
  restored_step, state, _ = ckpt.restore_latest(abstract, with_data=False)
  ckpt.close()
  assert restored_step == 2
  # Every array lives on the new mesh, in the layout the new mesh's rules give it.
  jax.tree.map(lambda got, want: (got.sharding.mesh == new_mesh and got.sharding.is_equivalent_to(
      want.sharding, got.ndim)) or pytest.fail(f"restored {got.sharding} instead of {want.sharding}"), state, abstract)
  assert _split_axes(state.params) == sharded_over, _split_axes(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state, saved_state)
  np.testing.assert_allclose(_eval_loss(model, state.params, new_mesh), saved_loss, rtol=1e-5)


def test_a_workdir_resumes_on_another_mesh_with_another_attention_kernel(tmp_path):
  """What a pod move changes (the mesh, "auto" for the CPU's blockwise) passes the workdir's config check; a model
  field does not."""
  from seqjax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from seqjax.train import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  saved = _config({"data": 8})
  workdir_lib.record_config(saved, str(tmp_path), {}, 0)
  moved = tiny_config(mesh={"data": 2, "seq": 4}, model={"attention": {"implementation": "auto"}})
  changed = workdir_lib.check_workdir_config(moved, str(tmp_path))
  assert set(changed) == {"mesh.data", "mesh.seq", "model.attention.implementation"}, changed
  with pytest.raises(ConfigError, match="model.attention.num_heads"):
    workdir_lib.check_workdir_config(tiny_config(model={"attention": {"num_heads": 4}}), str(tmp_path))
