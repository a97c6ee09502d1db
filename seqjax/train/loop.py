"""The training, evaluation and generation jobs behind `python -m seqjax.main`.

Resume order (one place): on start, `train` restores the newest readable checkpoint in WORKDIR/checkpoints —
TrainState (params, optimizer state, step, rng, skipped steps) into its shardings, then the data iterator's
position — and continues from that step; with none, it initialises from `config.seed`. Because step t's dropout
key is fold_in(rng, t) and the iterator resumes at its saved position, an interrupted run continues bitwise as the
uninterrupted one would (on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from seqjax import config as config_lib
from seqjax.config import Config, ConfigError
from seqjax.data.pipeline import make_lm_data
from seqjax.decode.sampling import sample_tokens
from seqjax.evals.lm_metrics import summarize
from seqjax.models.lm import DecoderLM
from seqjax.train import sharding
from seqjax.train.checkpoint import Checkpointer
from seqjax.train.metrics import MetricWriter, plot_curves
from seqjax.train.optim import learning_rate_schedule, make_optimizer
from seqjax.train.state import TrainState, abstract_train_state, count_params, create_train_state
from seqjax.train.step import jit_train_step, make_eval_step, make_train_step, nonfinite_leaves

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Training stopped because the loss or gradients became NaN/inf (config.train.on_nan="stop")."""


@dataclasses.dataclass
class Job:
  """Everything built from a config before the first step: mesh, data, model, optimizer, checkpointer."""

  config: Config
  workdir: str
  mesh: jax.sharding.Mesh
  data: Any
  model: DecoderLM
  optimizer: Any
  checkpointer: Checkpointer

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints")


def _data_dir(config: Config, workdir: str) -> str | None:
  del workdir
  return config.data.data_dir or None


def _check_registered(config: Config) -> None:
  from seqjax.nn.mixers import available_mixers  # pylint: disable=import-outside-toplevel
  from seqjax.ops.attention import available_attentions  # pylint: disable=import-outside-toplevel
  for name in config.model.mixer_pattern:
    if name not in available_mixers():
      raise ConfigError(f"config.model.mixer: unknown mixer {name!r}; registered: {', '.join(available_mixers())}")
  if config.model.attention not in available_attentions():
    raise ConfigError(f"config.model.attention: unknown implementation {config.model.attention!r}; registered: "
                      f"{', '.join(available_attentions())}")


def build_job(config: Config, workdir: str) -> Job:
  """Builds the parts of a run, failing fast (before any compilation) on anything inconsistent."""
  mesh = sharding.make_mesh(config.mesh)
  data_parallel = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if config.train.batch_size % data_parallel:
    raise ConfigError(f"config.train.batch_size: {config.train.batch_size} rows cannot be split over the "
                      f"{data_parallel} data-parallel devices of mesh {dict(mesh.shape)}; use a multiple of "
                      f"{data_parallel}")
  micro = config.train.batch_size // config.train.grad_accum_steps
  if micro % data_parallel:
    raise ConfigError(f"config.train.grad_accum_steps: micro-batches of {micro} rows cannot be split over "
                      f"{data_parallel} data-parallel devices")
  data = make_lm_data(name=config.data.name, data_dir=_data_dir(config, workdir), seq_len=config.data.seq_len,
                      batch_size=config.train.batch_size, seed=config.seed, text_key=config.data.text_key,
                      train_split=config.data.train_split, eval_split=config.data.eval_split,
                      num_workers=config.data.num_workers)
  if data.vocab_size != config.model.vocab_size:
    raise ConfigError(f"config.model.vocab_size: {config.model.vocab_size} does not match the tokenizer of "
                      f"data {config.data.name!r}, which has {data.vocab_size} tokens")
  _check_registered(config)
  model = DecoderLM(config.model)
  optimizer = make_optimizer(config.optim, config.train.num_steps)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                              async_save=config.train.async_checkpointing)
  return Job(config, workdir, mesh, data, model, optimizer, checkpointer)


def evaluate(job: Job, eval_step, params: Any) -> dict[str, float]:
  """Loss, perplexity, bits per byte and accuracy over the (deterministic) validation batches."""
  limit = job.config.train.eval_batches or None
  totals: dict[str, float] = {}
  for batch in job.data.eval_batches(max_batches=limit):
    sums = jax.device_get(eval_step(params, sharding.put_batch(batch, job.mesh)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return summarize(totals)


class _Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (finish the step, save, exit 0)."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    log.warning("received signal %d: finishing the current step, saving a checkpoint, then exiting", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _StepTimer:
  def __init__(self):
    self.reset()

  def reset(self):
    self.start = time.perf_counter()
    self.steps = 0


def _write_json(path: str, payload: dict) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def train(config: Config, workdir: str) -> dict[str, float]:
  """Trains (resuming from WORKDIR if it holds checkpoints) and returns the final evaluation metrics."""
  os.makedirs(workdir, exist_ok=True)
  job = build_job(config, workdir)
  tc = config.train
  _write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))

  train_iter = job.data.train_iterator()
  abstract, state_shardings = abstract_train_state(job.model, job.optimizer, seq_len=config.data.seq_len,
                                                   mesh=job.mesh)
  restored = job.checkpointer.restore_latest(abstract)
  if restored is None:
    state, _ = create_train_state(job.model, job.optimizer, seq_len=config.data.seq_len, seed=config.seed,
                                  mesh=job.mesh)
    log.info("initialised a new run (%d parameters)", count_params(state.params))
  else:
    step, state, data_state = restored
    if data_state is not None:
      train_iter.set_state(data_state)
    log.info("resumed from the checkpoint at step %d", step)

  step_fn = jit_train_step(
      make_train_step(job.model, job.optimizer, grad_accum_steps=tc.grad_accum_steps,
                      dropout=config.model.dropout > 0, on_nan=tc.on_nan),
      state_shardings, sharding.batch_sharding(job.mesh))
  eval_step = jax.jit(make_eval_step(job.model))
  lr_at = learning_rate_schedule(config.optim, tc.num_steps)
  writer = MetricWriter(workdir)
  tokens_per_step = tc.batch_size * config.data.seq_len

  start = int(jax.device_get(state.step))
  last_eval: dict[str, float] | None = None
  last_save_time = time.monotonic()
  pending: tuple[int, dict] | None = None  # The previous step's metrics, read one step late (no stall).
  window: list[dict] = []
  timer = _StepTimer()  # Throughput over training steps only (not compilation, evaluation or saving).

  def save(step: int, state: TrainState) -> None:
    nonlocal last_save_time
    job.checkpointer.save(step, state, train_iter.get_state())
    last_save_time = time.monotonic()

  def drain(done: tuple[int, dict]) -> None:
    step, metrics = done
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not metrics.pop("finite") and tc.on_nan == "stop":
      raise NonFiniteError(
          f"non-finite loss or gradients at step {step} (loss={metrics['loss']}); stopped without saving the "
          f"damaged state. Lower optim.learning_rate, or set train.on_nan='skip' to drop such updates")
    window.append(metrics)
    if step % tc.log_every == 0 or step == tc.num_steps:
      avg = {k: float(np.mean([m[k] for m in window])) for k in ("loss", "grad_norm")}
      avg["learning_rate"] = float(lr_at(step - 1))
      if timer.steps:
        avg["tokens_per_sec"] = tokens_per_step * timer.steps / max(time.perf_counter() - timer.start, 1e-9)
        progress.set_postfix(loss=f"{avg['loss']:.3f}", tok_s=f"{avg['tokens_per_sec']:.0f}")
      writer.write(step, "train", avg)
      window.clear()
      timer.reset()

  with _Preemption() as preemption, tqdm.tqdm(total=tc.num_steps, initial=start, unit="step",
                                              dynamic_ncols=True, disable=jax.process_index() != 0) as progress:
    for step in range(start + 1, tc.num_steps + 1):
      batch = sharding.put_batch(next(train_iter), job.mesh)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        drain(pending)
      pending = (step, metrics)
      progress.update(1)
      timer.steps += 1
      if step == start + 1:  # The first step compiled: time from the next one on.
        jax.block_until_ready(state.step)
        timer.reset()
      is_last = step == tc.num_steps
      due_eval = step % tc.eval_every == 0 or is_last
      due_save = (step % tc.checkpoint_every == 0 or is_last or preemption.requested or
                  (tc.checkpoint_every_secs > 0 and time.monotonic() - last_save_time >= tc.checkpoint_every_secs))
      if due_eval or due_save:
        drain(pending)  # Never evaluate or save a state whose update was not finite.
        pending = None
      if due_eval:
        last_eval = evaluate(job, eval_step, state.params)
        writer.write(step, "eval", last_eval)
        progress.write(f"step {step}: validation loss {last_eval['loss']:.4f}, "
                       f"bits/byte {last_eval.get('bits_per_byte', float('nan')):.4f}")
      if due_save:
        save(step, state)
      if due_eval or due_save:
        timer.reset()
      if preemption.requested:
        break
    if pending is not None:
      drain(pending)

  job.checkpointer.close()
  writer.close()
  final_step = int(jax.device_get(state.step))
  if preemption.requested and final_step < tc.num_steps:
    log.warning("preempted at step %d; the checkpoint is written, rerun the same command to resume", final_step)
    return {"step": final_step, "preempted": 1.0}
  if last_eval is None:  # Resumed a run that had already finished.
    last_eval = evaluate(job, eval_step, state.params)
  final = {"step": final_step, "skipped_steps": int(jax.device_get(state.skipped_steps)), **last_eval}
  _write_json(os.path.join(workdir, "final_metrics.json"), final)
  plot_curves(workdir)
  return final


def _restore_params(job: Job) -> tuple[int, Any]:
  abstract, _ = abstract_train_state(job.model, job.optimizer, seq_len=job.config.data.seq_len, mesh=job.mesh)
  restored = job.checkpointer.restore_latest(abstract, with_data=False)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {job.checkpoint_dir}; train first (--mode=train) with this "
                            f"--workdir")
  step, state, _ = restored
  return step, state.params


def evaluate_checkpoint(config: Config, workdir: str) -> dict[str, float]:
  """Evaluates the newest checkpoint in WORKDIR on the validation split."""
  job = build_job(config, workdir)
  step, params = _restore_params(job)
  metrics = {"step": step, **evaluate(job, jax.jit(make_eval_step(job.model)), params)}
  job.checkpointer.close()
  return metrics


def generate(config: Config, workdir: str) -> list[str]:
  """Samples `config.sample.num_samples` continuations of `config.sample.prompt` from the newest checkpoint."""
  sc = config.sample
  job = build_job(config, workdir)
  tokenizer = job.data.tokenizer
  prompt = np.asarray(tokenizer.encode(sc.prompt, add_bos=True), np.int32)
  if len(prompt) + sc.num_tokens > config.model.max_len:
    raise ConfigError(f"config.sample.prompt: {len(prompt)} tokens plus sample.num_tokens={sc.num_tokens} exceed "
                      f"the model's context model.max_len={config.model.max_len}; shorten the prompt or lower "
                      f"sample.num_tokens")
  _, params = _restore_params(job)
  job.checkpointer.close()
  prompts = jnp.asarray(np.tile(prompt[None], (sc.num_samples, 1)))
  out = sample_tokens(job.model, params, prompts, num_tokens=sc.num_tokens, max_len=config.model.max_len,
                      rng=jax.random.PRNGKey(config.seed), temperature=sc.temperature, top_k=sc.top_k)
  return [tokenizer.decode(np.asarray(row)) for row in jax.device_get(out)]
