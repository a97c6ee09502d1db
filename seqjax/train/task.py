"""The task interface: what the one training loop (`seqjax.train.loop`) asks of whatever it trains.

A task is what differs between, say, language modelling and translation: its data, its model, how a host batch
becomes a device batch, its loss, the values a step uses besides its batch, how it evaluates and generates, and
what its data position is. Everything else is the loop's and the same for every task: the train state and
optimizer, the one jitted train step (`seqjax.train.step.make_train_step(task.loss_sum, ...)`), the mesh,
checkpoints and resume, preemption, non-finite handling (stop / skip / rollback), fault injection, metric files.

Tasks (`config.task` picks one, `seqjax.train.tasks.get_task`):
  "lm"       `seqjax.train.tasks.lm.LMTask`: a decoder-only LM over packed byte-level documents.
  "seq2seq"  `seqjax.train.tasks.seq2seq.Seq2SeqTask`: the LSTM encoder-decoder on numbers_to_words, with
             scheduled sampling and a length curriculum.
  "classify" `seqjax.train.tasks.classify.ClassifyTask`: a pooled read-out over any mixer stack on a classification
             dataset of seqjax.data.synthetic (ListOps).

Step convention: `step` arguments below are `state.step` *before* the update, i.e. the update that takes the
state from s to s + 1 uses batch s of the stream, `step_inputs(s)` and `device_batch(batch, s)`; the loop logs its
metrics as step s + 1.

Adding a task (sequence classification, a synthetic copy or sort task, ...):
  1. seqjax/config.py: add its name to `Config.task` and a section for its own fields, checked in its `_check`.
     If it has a model of its own, that section (or a dataclass it extends) is the model's config, taken by the
     model as is; vocabulary sizes default to 0, "the tokenizer's", resolved when the task is built.
  2. seqjax/train/tasks/NAME.py: a subclass of `Task` below; register it in `seqjax/train/tasks/__init__.py`.
  3. configs/NAME.py with a `:smoke` variant; a test that trains it through `loop.train` (in-process, with
     `wrap_jitted=chex.assert_max_traces`), and its arguments in tests/train/fault_harness.py so that the fault
     tests parametrised over tasks (kill -9 / SIGTERM resume bitwise, rollback, time-based saves) cover it.

The contract the loop relies on:
  * `Task(config, mesh)` builds the data and the model and fails fast, with a `ConfigError` naming the field,
    before anything is compiled. `task.config` is the config with derived values resolved (vocabulary sizes);
    `task.model` the Flax module.
  * Host batches are flat dicts of numpy arrays whose first axis is the batch (its rows are split over the
    data-parallel devices, and into micro-batches by gradient accumulation), with a float array "weights" — the
    loss weights (fault injection's `nan_at` poisons it; the non-finite report lists non-finite float inputs).
  * The training stream resumes exactly: `train_stream(s, position)` continues with the batch that followed when
    `get_state()` returned `position` after s batches. The position is saved in each checkpoint with the state of
    the same step (JSON-serialisable), so an interrupted run continues bitwise.
  * `loss_sum` and `eval_sums` are pure functions of arrays (the loop jits them): each distinct batch shape
    compiles once, so keep shapes fixed (pad), or few (seq2seq: one per curriculum length).
  * `step_inputs(s)` is a pure function of s (so a resumed or rolled-back run recomputes the same values).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Protocol

import flax.linen as nn
import jax
import numpy as np

from seqjax.config import Config
from seqjax.train import sharding

HostBatch = dict[str, np.ndarray]
DeviceBatch = dict[str, jax.Array]
EvalStep = Callable[[Any, DeviceBatch], dict[str, jax.Array]]  # The jitted `eval_sums`.


class DataStream(Protocol):
  """A task's training batches: an iterator whose position can be saved and restored."""

  def __next__(self) -> HostBatch: ...

  def get_state(self) -> Any:
    """The position: JSON-serialisable; `Task.train_stream` resumes from it."""

  def close(self) -> None: ...


@dataclasses.dataclass
class Evaluation:
  """One evaluation: scalar metrics (written to metrics.jsonl and TensorBoard, split "eval"), a console summary,
  and optional examples (appended to WORKDIR/examples.jsonl with the step)."""

  metrics: dict[str, float]
  summary: str
  examples: list[dict[str, str]] = dataclasses.field(default_factory=list)


class Task(abc.ABC):
  """One thing the loop can train, evaluate and generate with (see the module docstring for the contract)."""

  name: ClassVar[str]
  model: nn.Module  # Set by the subclass's constructor.

  def __init__(self, config: Config, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh

  # -- Before anything is built ----------------------------------------------------------------------------------

  @classmethod
  def check_generate(cls, config: Config) -> None:
    """Checks `config.sample` for `generate` before any data or checkpoint is loaded (ConfigError)."""
    del config

  @classmethod
  def generate_saved(cls, config: Config, workdir: str) -> list[str] | None:
    """`--mode=generate` straight from the run in `workdir` (e.g. through `seqjax.load`, without building the
    data); None (the default): the loop builds the task and calls `generate` with the newest checkpoint's params."""
    del config, workdir
    return None

  # -- Parameters and data ---------------------------------------------------------------------------------------

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """The model's initial parameters (may carry `nn.LogicallyPartitioned` boxes: they place them on the mesh)."""

  @abc.abstractmethod
  def train_stream(self, step: int, position: Any | None) -> DataStream:
    """The training batches from batch `step` on; `position` is what the stream's `get_state()` returned there
    (None: a new run, step 0). Raises ConfigError if `position` is not one of this task's."""

  def device_batch(self, batch: HostBatch, step: int) -> DeviceBatch:
    """The global device batch of the update from state.step = `step`: rows split over the mesh's data axes.
    Tasks whose loss reads per-step values (`step_inputs`) add them here, as arrays with a batch axis."""
    del step
    return sharding.put_batch(batch, self.mesh)

  def step_inputs(self, step: int) -> dict[str, float]:
    """Values the update from state.step = `step` uses besides its batch (seq2seq: the teacher-forcing
    probability and the curriculum length); logged with the train record and in final_metrics.json."""
    del step
    return {}

  # -- Loss and evaluation (pure: jitted by the loop) ------------------------------------------------------------

  @abc.abstractmethod
  def loss_sum(self, params: Any, batch: DeviceBatch, rng: jax.Array, deterministic: bool
               ) -> tuple[jax.Array, jax.Array]:
    """(weighted sum of the losses, total weight), float32 scalars; the step minimises their ratio."""

  @abc.abstractmethod
  def eval_sums(self, params: Any, batch: DeviceBatch) -> dict[str, jax.Array]:
    """Sums over one evaluation batch (e.g. loss_sum, weight, bytes, correct) that `evaluate` adds up."""

  @abc.abstractmethod
  def evaluate(self, params: Any, eval_step: EvalStep, max_batches: int | None) -> Evaluation:
    """Evaluates `params` on the validation split (at most `max_batches` batches; None: all of it), calling
    `eval_step` (the jitted `eval_sums`) on each batch."""

  # -- Generation and reporting ----------------------------------------------------------------------------------

  @abc.abstractmethod
  def generate(self, params: Any) -> list[str]:
    """Outputs for `config.sample` (`--mode=generate`), one string per sample."""

  @property
  def throughput(self) -> tuple[str, float]:
    """(name of the rate logged with the train records, units per step), e.g. ("tokens_per_sec", B * T)."""
    return "examples_per_sec", float(self.config.train.batch_size)

  def describe(self) -> str:
    """A few words about the data, logged when a run starts (e.g. "49001 training pairs")."""
    return ""

