"""The one training loop behind `python -m seqjax.main`: train, evaluate_checkpoint and generate, for every task.

What is trained is a task (`seqjax.train.task.Task`: its data, model, loss, per-step inputs, evaluation,
generation and data position; "lm" and "seq2seq" live in `seqjax.train.tasks`). Everything else is here, the same
for all of them: the mesh and batch checks, the train state and optimizer, the one jitted train step
(`seqjax.train.step`), checkpoints, resume and preemption (`seqjax.train.workdir`), non-finite handling
(`seqjax.train.nonfinite`), fault injection (`seqjax.train.faults`), metric files and the final evaluation.

Resume order (one place): on start, `train` checks WORKDIR/config.json against the config (another config's run is
refused), deletes unfinished saves, restores the newest readable checkpoint in WORKDIR/checkpoints — TrainState
(params, optimizer state, step, rng, skipped steps) into its shardings, then the task's data position saved at the
same step (the LM's grain iterator state, the seq2seq batch index) — drops metrics.jsonl records after that step,
and continues; with no checkpoint it initialises from `config.seed`. Because step t's random key is
fold_in(rng, t), a task's per-step inputs are functions of the step and its data stream resumes at the saved
position, an interrupted run continues bitwise as the uninterrupted one would (on CPU). The guarantees and their
tests: docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import tqdm

from seqjax.config import Config, ConfigError
from seqjax.train import faults as faults_lib
from seqjax.train import sharding
from seqjax.train.checkpoint import Checkpointer
from seqjax.train.metrics import MetricWriter, plot_curves
from seqjax.train.nonfinite import NonFiniteHandler, Rollback
from seqjax.train.optim import learning_rate_schedule, make_optimizer
from seqjax.train.state import TrainState, abstract_state, count_params, init_train_state
from seqjax.train.step import jit_train_step, leaf_names, make_train_step, skip_step
from seqjax.train.task import DataStream, Task
from seqjax.train.tasks import get_task
from seqjax.train.workdir import (Preemption, append_jsonl, check_workdir_config, record_config, state_fingerprint,
                                  truncate_metrics, write_json)

log = logging.getLogger(__name__)

# `wrap_jitted(name, fn)` is applied to each step function before it is jitted ("train_step", "eval_step"); tests
# pass e.g. `lambda name, fn: chex.assert_max_traces(fn, n=1)` to prove that a run compiles each step once.
WrapJitted = Callable[[str, Callable], Callable]


def _no_wrap(name: str, fn: Callable) -> Callable:
  del name
  return fn


@dataclasses.dataclass
class Job:
  """Everything built from a config before the first step: mesh, task (data and model), optimizer,
  checkpointer. `config` is the task's (derived values such as vocabulary sizes resolved)."""

  config: Config
  workdir: str
  mesh: jax.sharding.Mesh
  task: Task
  optimizer: Any
  checkpointer: Checkpointer

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints")

  def abstract_state(self) -> tuple[TrainState, Any]:
    """The state's shapes and shardings (the target of a restore), and the shardings."""
    return abstract_state(self.task.init_params, self.optimizer, mesh=self.mesh)


def build_job(config: Config, workdir: str) -> Job:
  """Builds the parts of a run, failing fast (before any compilation) on anything inconsistent."""
  task_cls = get_task(config.task)
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  data_parallel = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if config.train.batch_size % data_parallel:
    raise ConfigError(f"config.train.batch_size: {config.train.batch_size} rows cannot be split over the "
                      f"{data_parallel} data-parallel devices of mesh {dict(mesh.shape)}; use a multiple of "
                      f"{data_parallel}")
  micro = config.train.batch_size // config.train.grad_accum_steps
  if micro % data_parallel:
    raise ConfigError(f"config.train.grad_accum_steps: micro-batches of {micro} rows cannot be split over "
                      f"{data_parallel} data-parallel devices")
  task = task_cls(config, mesh)
  optimizer = make_optimizer(config.optim, config.train.num_steps)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                              async_save=config.train.async_checkpointing)
  return Job(task.config, workdir, mesh, task, optimizer, checkpointer)


def _resume_or_init(job: Job, abstract: TrainState, before: int | None = None
                    ) -> tuple[int, TrainState, DataStream, bool]:
  """(step, state, train stream, restored?) from the newest readable checkpoint (below `before`) or the seed."""
  restored = job.checkpointer.restore_latest(abstract, before=before)
  if restored is None:
    state, _ = init_train_state(job.task.init_params, job.optimizer, seed=job.config.seed, mesh=job.mesh)
    return 0, state, job.task.train_stream(0, None), False
  step, state, position = restored
  return step, state, job.task.train_stream(step, position), True


class _StepTimer:
  """Throughput over training steps only (not compilation, evaluation or saving)."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.start = time.perf_counter()
    self.steps = 0


def _faults() -> faults_lib.Faults:
  try:
    faults = faults_lib.from_env()
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if faults.active:
    log.warning("fault injection is active (%s): %s", faults_lib.ENV_VAR, faults)
  return faults


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train(config: Config, workdir: str, *, wrap_jitted: WrapJitted | None = None) -> dict[str, Any]:
  """Trains (resuming from WORKDIR if it holds checkpoints) and returns the final metrics (also written to
  WORKDIR/final_metrics.json): step, skipped_steps, the task's evaluation, its step inputs of the last step,
  seconds, state_sha256.

  SIGTERM/SIGINT at any point (also while restoring or compiling) finish the current step, save and return
  {"step": S, "preempted": 1.0}; rerunning resumes. `wrap_jitted`: see `WrapJitted`.
  """
  with Preemption() as preemption:
    return _train(config, workdir, preemption, wrap_jitted or _no_wrap)


def _meets(rule: tuple[str, str, float], metrics: dict[str, float]) -> bool:
  """Whether an evaluation meets train.stop_when; ConfigError if it does not report the metric."""
  name, op, value = rule
  if name not in metrics:
    raise ConfigError(f"config.train.stop_when names {name!r}, which this task's evaluation does not report; it "
                      f"reports: {', '.join(sorted(metrics))}")
  return metrics[name] >= value if op == ">=" else metrics[name] <= value


def _train(config: Config, workdir: str, preemption: Preemption, wrap_jitted: WrapJitted) -> dict[str, Any]:
  began = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  changes = check_workdir_config(config, workdir)
  faults = _faults()
  job = build_job(config, workdir)
  task, tc = job.task, config.train
  abstract, state_shardings = job.abstract_state()
  start, state, stream, resumed = _resume_or_init(job, abstract)
  truncate_metrics(workdir, start)
  # Only now that the run continues is the workdir's config replaced (a failed resume leaves it as it was).
  record_config(config, workdir, changes, start)
  about = "; ".join(filter(None, [f"{count_params(state.params)} parameters", task.describe()]))
  if resumed:
    log.info("resumed from the checkpoint at step %d (%s)", start, about)
  else:
    log.info("initialised a new run (%s)", about)

  step_fn = jit_train_step(
      wrap_jitted("train_step", make_train_step(task.loss_sum, job.optimizer, grad_accum_steps=tc.grad_accum_steps,
                                                on_nan=tc.on_nan)),
      state_shardings, sharding.batch_sharding(job.mesh))
  skip_fn = jax.jit(skip_step, in_shardings=(state_shardings,), out_shardings=state_shardings)
  eval_step = sharding.eval_in_mesh_context(jax.jit(wrap_jitted("eval_step", task.eval_sums)), job.mesh,
                                            config.model.context_parallel_layout)
  eval_batches = tc.eval_batches or None
  stop_rule = tc.stop_rule()
  stopped_early = False
  lr_at = learning_rate_schedule(config.optim, tc.num_steps)
  rate_name, units_per_step = task.throughput
  writer = MetricWriter(workdir)
  on_nonfinite = NonFiniteHandler(workdir, tc.on_nan, tc.max_rollbacks, leaf_names(abstract.params))

  last_eval: dict[str, float] | None = None
  last_save_time = time.monotonic()
  pending: tuple[int, dict | None] | None = None  # The previous step's metrics, read one step late (no stall).
  window: list[dict | None] = []
  timer = _StepTimer()
  shapes = None  # The last batch's shapes: a new one compiles the step (time from the step after it).
  recent: dict[int, tuple[Any, dict]] = {}  # step -> (data position before its batch, the host batch).
  skip_batches: set[int] = set()  # Steps whose batch a rollback skips.
  done_through = start  # Steps <= this were logged and evaluated already (a rollback replays them silently).

  def drain(done: tuple[int, dict | None], progress) -> None:
    step, metrics = done
    if metrics is None:  # The batch a rollback skips.
      window.append(None)
    else:
      host = jax.device_get(metrics)
      if bool(host["finite"]):
        window.append({"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"]),
                       **{k: float(v) for k, v in host.get("extras", {}).items()}})
      else:  # Returns for "skip"; raises for "stop" and "rollback".
        on_nonfinite(step, host, recent.get(step),
                     max([s for s in job.checkpointer.all_steps() if s < step], default=None))
        window.append(None)
    if step % tc.log_every and step != tc.num_steps:
      return
    if step > done_through:
      finite = [m for m in window if m is not None]
      keys = finite[0] if finite else ("loss", "grad_norm")  # The loss, grad_norm and the task's extras.
      avg = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan") for k in keys}
      avg["learning_rate"] = float(lr_at(step - 1))
      avg.update(task.step_inputs(step - 1))  # What the update logged as `step` used (see seqjax.train.task).
      if len(finite) < len(window):
        avg["skipped"] = float(len(window) - len(finite))
      if timer.steps:
        avg[rate_name] = units_per_step * timer.steps / max(time.perf_counter() - timer.start, 1e-9)
        progress.set_postfix(loss=f"{avg['loss']:.3f}", rate=f"{avg[rate_name]:.0f}")
      writer.write(step, "train", avg)
    window.clear()
    timer.reset()

  step = start
  try:
    with tqdm.tqdm(total=tc.num_steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0) as progress:
      while step < tc.num_steps:
        try:
          step += 1  # The update from state.step = step - 1, logged as `step`.
          faults.before_step()
          position = stream.get_state()
          host_batch = faults.poison(step, next(stream))
          recent[step] = (position, host_batch)
          recent.pop(step - 3, None)
          if step in skip_batches:
            state, metrics = skip_fn(state), None
          else:
            state, metrics = step_fn(state, task.device_batch(host_batch, step - 1))
          if pending is not None:
            drain(pending, progress)
          pending = (step, metrics)
          progress.update(1)
          timer.steps += 1
          batch_shapes = {k: np.shape(v) for k, v in host_batch.items()}
          if batch_shapes != shapes:  # This step compiled (the first one, or a new curriculum length).
            shapes = batch_shapes
            jax.block_until_ready(state.step)
            timer.reset()
          is_last = step == tc.num_steps
          due_eval = (step % tc.eval_every == 0 or is_last) and step > done_through
          due_save = (step % tc.checkpoint_every == 0 or is_last or preemption.requested or
                      (tc.checkpoint_every_secs > 0 and
                       time.monotonic() - last_save_time >= tc.checkpoint_every_secs))
          if due_eval or due_save:
            drain(pending, progress)  # Never evaluate or save a state before its step was checked.
            pending = None
          if due_eval:
            faults.before_eval()
            evaluation = task.evaluate(state.params, eval_step, eval_batches)
            last_eval = evaluation.metrics
            writer.write(step, "eval", last_eval)
            if evaluation.examples:
              append_jsonl(os.path.join(workdir, "examples.jsonl"), {"step": step, "examples": evaluation.examples})
            progress.write(f"step {step}: {evaluation.summary}")
            stopped_early = stop_rule is not None and _meets(stop_rule, last_eval)
            if stopped_early:
              log.info("step %d: the evaluation meets train.stop_when=%r; saving and stopping early", step,
                       tc.stop_when)
          if due_save or stopped_early:
            job.checkpointer.save(step, state, stream.get_state(), faults.save_items(step))
            last_save_time = time.monotonic()
            on_nonfinite.saved(step)
          if due_eval or due_save:
            timer.reset()
          if preemption.requested or stopped_early:
            break
        except Rollback as rb:
          job.checkpointer.wait()
          on_nonfinite.rolled_back(rb.step)
          done_through = max(done_through, rb.step - 1)
          skip_batches.add(rb.step)
          stream.close()
          step, state, stream, _ = _resume_or_init(job, abstract, before=rb.step)
          log.warning("step %d: non-finite loss or gradients; rolled back to %s and skipping that step's batch "
                      "(rollback %d of at most %d in a row)", rb.step,
                      f"the checkpoint at step {step}" if step else "the initial state", on_nonfinite.rollbacks,
                      tc.max_rollbacks)
          pending, recent = None, {}
          window.clear()
          progress.n = step
          progress.refresh()
  finally:
    job.checkpointer.close()  # Waits for the last (asynchronous) save, also when stopping on an error.
    writer.close()

  final_step = int(jax.device_get(state.step))
  if preemption.requested and final_step < tc.num_steps:
    log.warning("preempted at step %d; the checkpoint is written, rerun the same command to resume", final_step)
    return {"step": final_step, "preempted": 1.0}
  if last_eval is None:  # Resumed a run that had already finished.
    last_eval = task.evaluate(state.params, eval_step, eval_batches).metrics
  final = {"step": final_step, "skipped_steps": int(jax.device_get(state.skipped_steps)), **last_eval,
           **(task.step_inputs(final_step - 1) if final_step else {}), "seconds": time.perf_counter() - began,
           "state_sha256": state_fingerprint(state)}
  if stopped_early:
    final["stopped_early"] = 1.0
  write_json(os.path.join(workdir, "final_metrics.json"), final)
  plot_curves(workdir)
  return final


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and generation from a checkpoint
# ----------------------------------------------------------------------------------------------------------------


def _restore_params(job: Job) -> tuple[int, Any]:
  abstract, _ = job.abstract_state()
  try:
    restored = job.checkpointer.restore_latest(abstract, with_data=False)
  finally:
    job.checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {job.checkpoint_dir}; train first (--mode=train) with this "
                            f"--workdir")
  step, state, _ = restored
  return step, state.params


def evaluate_checkpoint(config: Config, workdir: str) -> dict[str, Any]:
  """Evaluates the newest checkpoint in WORKDIR on `config.data.eval_split`, or on every split of
  `config.data.eval_splits` in one run (e.g. an induction-heads model at 2x ... 16x its training length).

  Each split's metrics (and the checkpoint's step) are written to WORKDIR/eval_<split>.json. One split: returns
  {"step", **metrics}. Several: returns {"step", "splits": {split: metrics}}, also written to
  WORKDIR/eval_splits.json. Every split's data are opened (and checked against the model, e.g. a learned position
  table shorter than the split's examples) before the checkpoint is restored or anything is compiled."""
  splits = config.data.eval_split_list
  configs = [dataclasses.replace(config, data=dataclasses.replace(config.data, eval_split=s, eval_splits=""))
             for s in splits]
  job = build_job(configs[0], workdir)
  tasks = [job.task] + [get_task(c.task)(c, job.mesh) for c in configs[1:]]
  step, params = _restore_params(job)
  results = {}
  for split, task in zip(splits, tasks):
    eval_step = sharding.eval_in_mesh_context(jax.jit(task.eval_sums), job.mesh,
                                              config.model.context_parallel_layout)
    evaluation = task.evaluate(params, eval_step, config.train.eval_batches or None)
    log.info("the checkpoint at step %d on %r: %s", step, split, evaluation.summary)
    results[split] = evaluation.metrics
    write_json(os.path.join(workdir, f"eval_{split}.json"), {"step": step, "split": split, **evaluation.metrics})
  if not config.data.eval_splits:
    return {"step": step, **results[splits[0]]}
  combined = {"step": step, "splits": results}
  write_json(os.path.join(workdir, "eval_splits.json"), combined)
  return combined


def generate(config: Config, workdir: str) -> list[str]:
  """The task's outputs for `config.sample` (LM: continuations of the prompt; seq2seq: translations of its
  numbers) from the newest checkpoint. The request is checked before anything is loaded or compiled."""
  task_cls = get_task(config.task)
  task_cls.check_generate(config)
  outputs = task_cls.generate_saved(config, workdir)
  if outputs is not None:
    return outputs
  job = build_job(config, workdir)
  _, params = _restore_params(job)
  return job.task.generate(params)
