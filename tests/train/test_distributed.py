"""Multi-process training: two `seqjax.main` processes joined by `jax.distributed` train exactly like one process
holding both devices (the LM, and in the slow set seq2seq); each process's rows of a global batch; and the
multi-process flags are validated before anything starts."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from seqjax.train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if num_devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return env


def _train_losses(workdir: str) -> dict[int, float]:
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _saved_state(workdir: str, step: int) -> dict:
  """The TrainState saved at `step`, as numpy arrays (read without the devices that wrote it)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _train_single_and_two_processes(common: list[str], tmp_path) -> tuple[str, str, list]:
  """Runs `seqjax.main *common` as one process with two devices (workdir "single"), then as two processes of one
  device each joined by `jax.distributed` ("multi"); (single, multi, the two processes' (stdout, stderr))."""
  single = str(tmp_path / "single")
  proc = subprocess.run([sys.executable, "-m", "seqjax.main", *common, f"--workdir={single}"], cwd=ROOT,
                        env=_env(2), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  multi = str(tmp_path / "multi")
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "seqjax.main", *common, f"--workdir={multi}",
                             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return single, multi, outputs


def _assert_same_losses(single: str, multi: str, num_steps: int) -> tuple[dict, dict]:
  """Every step's train loss (log_every=1: not averages over a window) equal in the two workdirs; their
  final_metrics.json."""
  single_losses, multi_losses = _train_losses(single), _train_losses(multi)
  steps = list(range(1, num_steps + 1))
  assert sorted(multi_losses) == sorted(single_losses) == steps
  np.testing.assert_allclose([multi_losses[s] for s in steps], [single_losses[s] for s in steps], rtol=1e-5,
                             atol=1e-6)
  return tuple(json.load(open(os.path.join(d, "final_metrics.json"))) for d in (single, multi))


@pytest.mark.parametrize("mesh", [
    pytest.param([], id="data_across_processes"),
    # The sequence split across the two processes: each holds every row, half of its columns (ring attention's
    # K/V hops go between the processes); the data pipeline gives both processes the same rows.
    pytest.param(["--config.mesh.data=1", "--config.mesh.seq=2"], id="seq_across_processes",
                 marks=pytest.mark.slow)])  # ~2 min on an idle machine (three training processes)
def test_two_processes_train_like_one_process_with_two_devices(tmp_path, mesh):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  data_dir = str(tmp_path / "tfds")
  common = ["--config=configs/lm_pysrc.py:smoke", f"--config.data.data_dir={data_dir}",
            "--config.data.name=python_source/small", "--config.train.num_steps=10",
            "--config.train.log_every=1", "--config.train.eval_every=10", "--config.train.checkpoint_every=10", *mesh]
  single, multi, outputs = _train_single_and_two_processes(common, tmp_path)
  assert "process 0 of 2: 1 local devices, 2 in all" in outputs[0][1] + outputs[0][0]

  final_single, final_multi = _assert_same_losses(single, multi, 10)
  assert final_multi["step"] == 10
  assert final_multi["loss"] == pytest.approx(final_single["loss"], rel=1e-5)
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["10"]
  # The final parameters and optimizer state, leaf by leaf.
  state_single, state_multi = _saved_state(single, 10), _saved_state(multi, 10)
  assert int(state_multi["step"]) == 10
  assert jax.tree.structure(state_multi) == jax.tree.structure(state_single)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               {k: state_multi[k] for k in ("params", "opt_state")},
               {k: state_single[k] for k in ("params", "opt_state")})


@pytest.mark.slow  # ~5 min on a loaded 2-core machine: three seq2seq training processes
def test_two_processes_train_seq2seq_like_one_process_with_two_devices(tmp_path):
  """The seq2seq task with data parallelism across two processes: each builds every global batch and puts its own
  row block (`process_row_block`), and evaluation decodes with every row gathered on every process; every step's
  loss, the evaluation (loss, exact match, BLEU) and the final parameters equal one process holding both devices."""
  import jax  # pylint: disable=import-outside-toplevel

  common = ["--config=configs/seq2seq_numbers.py:smoke", f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--config.train.num_steps=4", "--config.train.log_every=1", "--config.train.eval_every=4",
            "--config.train.eval_batches=1", "--config.train.checkpoint_every=4"]
  single, multi, _ = _train_single_and_two_processes(common, tmp_path)
  final_single, final_multi = _assert_same_losses(single, multi, 4)
  for key in ("loss", "exact_match", "bleu", "examples"):
    assert final_multi[key] == pytest.approx(final_single[key], rel=1e-5), key
  state_single, state_multi = _saved_state(single, 4), _saved_state(multi, 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state_multi["params"],
               state_single["params"])


@pytest.mark.parametrize("process_ids, shape, expected_rows", [
    pytest.param([0, 0, 0, 0, 1, 1, 1, 1], (2, 2, 1, 2), [range(0, 4), range(4, 8)], id="data_across_processes"),
    pytest.param([0, 1, 0, 1], (1, 2, 2, 1), [range(0, 8), range(0, 8)], id="tensor_across_processes")])
def test_seq2seq_batches_follow_process_rows(monkeypatch, process_ids, shape, expected_rows):
  """Each process keeps the row block `process_rows` names of every global seq2seq batch (the rows `put_batch`
  expects from it): disjoint halves with data across processes, all rows when the processes split a row's work."""
  import jax  # pylint: disable=import-outside-toplevel
  from seqjax.train import sharding  # pylint: disable=import-outside-toplevel
  from seqjax.train.tasks.seq2seq import process_row_block  # pylint: disable=import-outside-toplevel
  batch = {"src": np.arange(8 * 3).reshape(8, 3), "src_lengths": np.arange(8)}
  for process, want in enumerate(expected_rows):
    monkeypatch.setattr(jax, "process_index", lambda process=process: process)
    rows = process_row_block(batch, sharding.process_rows(_Mesh(process_ids, shape)))
    np.testing.assert_array_equal(rows["src"], batch["src"][list(want)])
    np.testing.assert_array_equal(rows["src_lengths"], batch["src_lengths"][list(want)])
  with pytest.raises(ValueError, match="train.batch_size a multiple of 2"):
    process_row_block({"src": np.zeros((7, 3))}, (0, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(auto=True, coordinator_address="h:1", num_processes=None, process_id=None), "do not combine"),
    (dict(auto=False, coordinator_address="h:1", num_processes=2, process_id=None), "missing --process_id"),
    (dict(auto=False, coordinator_address="nohost", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(auto=False, coordinator_address="h:1", num_processes=0, process_id=0), "--num_processes must be"),
    (dict(auto=False, coordinator_address="h:1", num_processes=2, process_id=2), r"\[0, 2\)"),
])
def test_bad_multiprocess_flags_are_named(kwargs, message):
  with pytest.raises(distributed.DistributedConfigError, match=message):
    distributed.make_spec(**kwargs)


def test_no_flags_means_a_single_process():
  spec = distributed.make_spec(auto=False, coordinator_address=None, num_processes=None, process_id=None)
  assert not spec.enabled
  distributed.initialize(spec)  # a no-op: nothing to join


def test_cli_reports_bad_multiprocess_flags_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "seqjax.main", "--config=configs/lm_pysrc.py:smoke",
                         f"--workdir={tmp_path}", "--num_processes=2"], cwd=ROOT, env=_env(1),
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert "missing --coordinator_address, --process_id" in proc.stderr
  assert "Traceback" not in proc.stderr


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


class _Mesh:
  """What `sharding.process_rows` reads of a mesh: its device array (here fake devices of two processes)."""

  def __init__(self, process_ids, shape):
    self.axis_names = ("data", "fsdp", "tensor", "seq")
    self.devices = np.array([_Device(p) for p in process_ids], dtype=object).reshape(shape)


@pytest.mark.parametrize("process_ids, shape, expected", [
    pytest.param([0, 0, 1, 1], (2, 1, 1, 2), [(0, 2), (1, 2)], id="data_across_seq_within"),
    pytest.param([0, 1, 0, 1], (2, 1, 1, 2), [(0, 1), (0, 1)], id="seq_across_processes"),
    pytest.param([0, 1, 0, 1], (1, 2, 2, 1), [(0, 1), (0, 1)], id="tensor_across_processes"),
    pytest.param([0, 0, 0, 0, 1, 1, 1, 1], (2, 2, 1, 2), [(0, 2), (1, 2)], id="data_fsdp_blocks")])
def test_process_rows(monkeypatch, process_ids, shape, expected):
  """Which rows of the global batch each process's data pipeline must give: whole row blocks; shared by the
  processes that split the same rows along another axis."""
  import jax  # pylint: disable=import-outside-toplevel
  from seqjax.train import sharding  # pylint: disable=import-outside-toplevel
  for process, want in enumerate(expected):
    monkeypatch.setattr(jax, "process_index", lambda process=process: process)
    assert sharding.process_rows(_Mesh(process_ids, shape)) == want


def test_process_rows_refuses_scattered_blocks(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  from seqjax.train import sharding  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with pytest.raises(ValueError, match="row blocks"):
    sharding.process_rows(_Mesh([0, 1, 1, 0], (4, 1, 1, 1)))


def test_batch_from_a_row_block_equals_the_process_local_path():
  """The path `put_batch` takes when several processes hold the same rows (each device cutting its columns)
  builds the same global array as the one-process path, on a (data 2, seq 4) mesh."""
  import jax  # pylint: disable=import-outside-toplevel
  from seqjax.config import MeshConfig  # pylint: disable=import-outside-toplevel
  from seqjax.train import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(MeshConfig(data=2, seq=4))
  rows = np.arange(4 * 16, dtype=np.int32).reshape(4, 16)
  direct = sharding.put_batch({"x": rows}, mesh)["x"]
  built = sharding._from_row_block(sharding.batch_sharding(mesh), rows, 0, 1)  # pylint: disable=protected-access
  assert built.sharding == direct.sharding
  for a, b in zip(built.addressable_shards, direct.addressable_shards):
    assert a.device == b.device and a.index == b.index
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
  np.testing.assert_array_equal(np.asarray(jax.device_get(built)), rows)
