"""The training, evaluation and generation jobs behind `python -m seqjax.main`.

Resume order (one place): on start, `train` checks WORKDIR/config.json against the config (another config's run is
refused), deletes unfinished saves, restores the newest readable checkpoint in WORKDIR/checkpoints — TrainState
(params, optimizer state, step, rng, skipped steps) into its shardings, then the data iterator's position saved at
the same step — drops metrics.jsonl records after that step, and continues; with no checkpoint it initialises from
`config.seed`. Because step t's dropout key is fold_in(rng, t) and the iterator resumes at its saved position, an
interrupted run continues bitwise as the uninterrupted one would (on CPU). The guarantees and their tests:
docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from seqjax.data.tokenizer import ByteTokenizer
from seqjax.decode.sampling import sample_tokens
from seqjax.evals.lm_metrics import summarize
from seqjax.models.lm import DecoderLM
from seqjax.train import faults as faults_lib
from seqjax.train import sharding
from seqjax.train.checkpoint import Checkpointer
from seqjax.train.metrics import MetricWriter, plot_curves
from seqjax.train.optim import learning_rate_schedule, make_optimizer
from seqjax.train.state import TrainState, abstract_train_state, count_params, create_train_state
from seqjax.train.step import jit_train_step, leaf_names, make_eval_step, make_train_step, skip_step

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
  if config.model.attention.implementation not in available_attentions():
    raise ConfigError(f"config.model.attention.implementation: unknown implementation "
                      f"{config.model.attention.implementation!r}; registered: "
                      f"{', '.join(available_attentions())}")


def build_job(config: Config, workdir: str) -> Job:
  """Builds the parts of a run, failing fast (before any compilation) on anything inconsistent."""
  _check_registered(config)
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
  try:
    data = make_lm_data(name=config.data.name, data_dir=_data_dir(config, workdir), seq_len=config.data.seq_len,
                        batch_size=config.train.batch_size, seed=config.seed, text_key=config.data.text_key,
                        train_split=config.data.train_split, eval_split=config.data.eval_split,
                        num_workers=config.data.num_workers)
  except ValueError as e:  # Unknown dataset/split/feature, an empty split, one too short for a batch.
    raise ConfigError(f"config.data ({config.data.name!r}, train.batch_size={config.train.batch_size}, "
                      f"data.seq_len={config.data.seq_len}): {e}") from e
  config = config_lib.with_vocab_size(config, data.vocab_size)
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


class Preemption:
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
    if self.requested:  # A second signal: stop now (an in-flight save is still waited for on the way out).
      raise KeyboardInterrupt(f"second signal {signum}: exiting without a new checkpoint")
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


class _Rollback(Exception):
  """Raised inside the loop when on_nan="rollback" meets a non-finite step."""

  def __init__(self, step: int):
    super().__init__(step)
    self.step = step


def write_json(path: str, payload: dict) -> None:
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def append_jsonl(path: str, payload: dict) -> None:
  if jax.process_index() != 0:
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(payload, sort_keys=True) + "\n")


def _json_float(x: float) -> float | str:
  return float(x) if math.isfinite(x) else str(float(x))


# ----------------------------------------------------------------------------------------------------------------
# The workdir's config: resuming with another config is refused unless allowed.
# ----------------------------------------------------------------------------------------------------------------

# Fields that may differ between a workdir's config.json and the config resuming it, without
# train.allow_config_change: they change how long, how often or where, not what a step computes. The resumed steps
# stay bitwise those of an uninterrupted run, except: num_steps moves the learning-rate schedule's horizon (later
# steps follow the new schedule), and the mesh and grad_accum_steps change only the summation order (equal to
# float tolerance). Every other field (model, data, optimizer, batch size, seed) refuses. "section.*": all fields.
RESUMABLE_FIELDS = frozenset({
    "train.num_steps", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.checkpoint_every_secs", "train.keep_checkpoints", "train.log_every", "train.async_checkpointing",
    "train.on_nan", "train.max_rollbacks", "train.allow_config_change", "train.grad_accum_steps",
    "data.data_dir", "data.eval_split", "mesh.*", "sample.*",
})


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}.{key}" if prefix else key
    if isinstance(value, dict):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


def _resumable(field: str) -> bool:
  return field in RESUMABLE_FIELDS or f"{field.split('.')[0]}.*" in RESUMABLE_FIELDS


def check_workdir_config(config: Config, workdir: str) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the run already in `workdir` (its config.json), before anything is built.

  Returns the changed fields {name: (saved, new)}. Raises ConfigError if any of them is not in RESUMABLE_FIELDS
  and train.allow_config_change is off.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      saved = _flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise ConfigError(f"--workdir={workdir}: its config.json cannot be read ({e}); repair or remove it, or use "
                      f"another --workdir") from e
  defaults = _flatten(json.loads(json.dumps(config_lib.to_dict(Config()))))
  current = _flatten(json.loads(json.dumps(config_lib.to_dict(config))))
  changed = {}
  for field, value in current.items():
    before = saved.get(field, defaults.get(field))
    if before != value:
      changed[field] = (before, value)
  refused = {k: v for k, v in changed.items() if not _resumable(k)}
  if refused and not config.train.allow_config_change:
    listing = ", ".join(f"config.{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(refused.items()))
    raise ConfigError(f"--workdir={workdir} holds a run of another config ({listing}). Use another --workdir, "
                      f"or pass --config.train.allow_config_change=True to continue that run with these values")
  return changed


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl records after `step` (the resumed run recomputes them) and any torn last line."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
        ok = line.endswith("\n") and int(record["step"]) <= step
      except (ValueError, KeyError, TypeError):
        ok = False
      if ok:
        kept.append(line)
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)


def state_fingerprint(state: TrainState) -> str:
  """SHA-256 of every leaf of the state (values, dtypes, shapes): equal fingerprints mean bitwise-equal runs."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if not getattr(leaf, "is_fully_addressable", True):
      return "n/a (state spans processes)"
    x = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape}".encode())
    digest.update(np.ascontiguousarray(x).tobytes())
  return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _resume_or_init(job: Job, abstract: TrainState, before: int | None = None
                    ) -> tuple[int, TrainState, Any, bool]:
  """(step, state, train iterator, restored?) from the newest readable checkpoint (below `before`) or the seed."""
  config = job.config
  train_iter = job.data.train_iterator()
  restored = job.checkpointer.restore_latest(abstract, before=before)
  if restored is None:
    state, _ = create_train_state(job.model, job.optimizer, seq_len=config.data.seq_len, seed=config.seed,
                                  mesh=job.mesh)
    return 0, state, train_iter, False
  step, state, data_state = restored
  train_iter.set_state(data_state)
  return step, state, train_iter, True


def nonfinite_record(step: int, host: dict, names: list[str], seen: tuple[Any, dict] | None) -> dict:
  """What went wrong at `step`: loss, which gradients/parameters are non-finite, which batch it was."""
  record = {
      "step": step, "loss": _json_float(float(host["loss"])), "grad_norm": _json_float(float(host["grad_norm"])),
      "nonfinite_gradients": [n for n, ok in zip(names, host["grads_finite"]) if not ok],
      "nonfinite_parameters_after_update": [n for n, ok in zip(names, host["params_finite"]) if not ok],
  }
  if seen is not None:
    position, batch = seen
    record["batch"] = {
        "iterator_state_before": position,  # train_iter.set_state(this); next(train_iter) gives the batch again.
        "shape": list(np.shape(batch["inputs"])),
        "nonfinite_inputs": sorted(k for k, v in batch.items()
                                   if np.issubdtype(np.asarray(v).dtype, np.floating) and
                                   not np.all(np.isfinite(v))),
    }
  return record


def train(config: Config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from WORKDIR if it holds checkpoints) and returns the final evaluation metrics.

  SIGTERM/SIGINT at any point (also while restoring or compiling) finish the current step, save and return
  {"step": S, "preempted": 1.0}; rerunning resumes.
  """
  with Preemption() as preemption:
    return _train(config, workdir, preemption)


def _train(config: Config, workdir: str, preemption: Preemption) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  changes = check_workdir_config(config, workdir)
  try:
    faults = faults_lib.from_env()
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if faults.active:
    log.warning("fault injection is active (%s): %s", faults_lib.ENV_VAR, faults)
  job = build_job(config, workdir)
  tc = config.train
  abstract, state_shardings = abstract_train_state(job.model, job.optimizer, seq_len=config.data.seq_len,
                                                   mesh=job.mesh)
  start, state, train_iter, resumed = _resume_or_init(job, abstract)
  truncate_metrics(workdir, start)
  # Only now that the run continues is the workdir's config replaced (a failed resume leaves it as it was).
  write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
  if changes:
    log.warning("resuming with a changed config: %s", ", ".join(f"{k}: {a!r} -> {b!r}"
                                                                  for k, (a, b) in sorted(changes.items())))
    append_jsonl(os.path.join(workdir, "config_changes.jsonl"),
                  {"step": start, "changed": {k: list(v) for k, v in changes.items()}})
  if resumed:
    log.info("resumed from the checkpoint at step %d", start)
  else:
    log.info("initialised a new run (%d parameters)", count_params(state.params))
  names = leaf_names(abstract.params)

  step_fn = jit_train_step(
      make_train_step(job.model, job.optimizer, grad_accum_steps=tc.grad_accum_steps,
                      dropout=config.model.dropout > 0, on_nan=tc.on_nan),
      state_shardings, sharding.batch_sharding(job.mesh))
  skip_fn = jax.jit(skip_step, in_shardings=(state_shardings,), out_shardings=state_shardings)
  eval_step = jax.jit(make_eval_step(job.model))
  lr_at = learning_rate_schedule(config.optim, tc.num_steps)
  writer = MetricWriter(workdir)
  tokens_per_step = tc.batch_size * config.data.seq_len

  last_eval: dict[str, float] | None = None
  last_save_time = time.monotonic()
  pending: tuple[int, dict | None] | None = None  # The previous step's metrics, read one step late (no stall).
  window: list[dict] = []
  timer = _StepTimer()  # Throughput over training steps only (not compilation, evaluation or saving).
  recent: dict[int, tuple[Any, dict]] = {}  # step -> (iterator position before its batch, the host batch).
  skip_batches: set[int] = set()  # Steps whose batch a rollback skips.
  done_through = start  # Steps <= this were logged and evaluated already (a rollback replays them silently).
  rollbacks = 0  # Rollbacks since the last save after the newest rolled-back step.
  last_rollback = 0

  def nonfinite(step: int, host: dict) -> None:
    record = nonfinite_record(step, host, names, recent.get(step))
    latest = job.checkpointer.all_steps()
    record["last_checkpoint"] = max([s for s in latest if s < step], default=None)
    if tc.on_nan == "skip":
      log.warning("step %d: non-finite loss or gradients (%s); the update was dropped and counted as skipped",
                  step, ", ".join(record["nonfinite_gradients"][:4]) or f"loss={record['loss']}")
      append_jsonl(os.path.join(workdir, "nonfinite.jsonl"), {**record, "action": "skipped"})
      return
    if tc.on_nan == "rollback" and rollbacks < tc.max_rollbacks:
      append_jsonl(os.path.join(workdir, "nonfinite.jsonl"), {**record, "action": "rolled back"})
      raise _Rollback(step)
    action = "stopped" if tc.on_nan == "stop" else f"stopped after {rollbacks} rollbacks (train.max_rollbacks)"
    append_jsonl(os.path.join(workdir, "nonfinite.jsonl"), {**record, "action": action})
    report = os.path.join(workdir, "nonfinite_report.json")
    if recent.get(step) is not None and jax.process_index() == 0:
      batch_file = os.path.join(workdir, f"nonfinite_batch_step_{step}.npz")
      np.savez(batch_file, **recent[step][1])
      record["batch"]["file"] = batch_file
    write_json(report, {**record, "action": action})
    bad = record["nonfinite_gradients"]
    raise NonFiniteError(
        f"non-finite loss or gradients at step {step} (loss={record['loss']}; non-finite gradients: "
        f"{', '.join(bad[:4]) + (' ...' if len(bad) > 4 else '') if bad else 'none'}); {action}. Report: "
        f"{report}. The checkpoints (newest: step {record['last_checkpoint']}) are intact: fix the cause (e.g. "
        f"lower optim.learning_rate, inspect the batch) and rerun to resume, or set train.on_nan='skip' or "
        f"'rollback'")

  def drain(done: tuple[int, dict | None], progress) -> None:
    step, metrics = done
    if metrics is None:  # The batch a rollback skips.
      window.append(None)
    else:
      host = jax.device_get(metrics)
      if bool(host["finite"]):
        window.append({"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"])})
      else:
        nonfinite(step, host)  # Raises for "stop" and "rollback".
        window.append(None)
    if step % tc.log_every and step != tc.num_steps:
      return
    if step > done_through:
      finite = [m for m in window if m is not None]
      avg = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan") for k in ("loss", "grad_norm")}
      avg["learning_rate"] = float(lr_at(step - 1))
      if len(finite) < len(window):
        avg["skipped"] = float(len(window) - len(finite))
      if timer.steps:
        avg["tokens_per_sec"] = tokens_per_step * timer.steps / max(time.perf_counter() - timer.start, 1e-9)
        progress.set_postfix(loss=f"{avg['loss']:.3f}", tok_s=f"{avg['tokens_per_sec']:.0f}")
      writer.write(step, "train", avg)
    window.clear()
    timer.reset()

  step = start
  try:
    with tqdm.tqdm(total=tc.num_steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0) as progress:
      while step < tc.num_steps:
        try:
          step += 1
          position = train_iter.get_state()
          host_batch = faults.poison(step, next(train_iter))
          recent[step] = (position, host_batch)
          recent.pop(step - 3, None)
          if step in skip_batches:
            state, metrics = skip_fn(state), None
          else:
            state, metrics = step_fn(state, sharding.put_batch(host_batch, job.mesh))
          if pending is not None:
            drain(pending, progress)
          pending = (step, metrics)
          progress.update(1)
          timer.steps += 1
          if step == start + 1:  # The first step compiled: time from the next one on.
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
            last_eval = evaluate(job, eval_step, state.params)
            writer.write(step, "eval", last_eval)
            progress.write(f"step {step}: validation loss {last_eval['loss']:.4f}, "
                           f"bits/byte {last_eval.get('bits_per_byte', float('nan')):.4f}")
          if due_save:
            job.checkpointer.save(step, state, train_iter.get_state(), faults.save_items(step))
            last_save_time = time.monotonic()
            if step > last_rollback:
              rollbacks = 0
          if due_eval or due_save:
            timer.reset()
          if preemption.requested:
            break
        except _Rollback as rb:
          job.checkpointer.wait()
          rollbacks += 1
          last_rollback = rb.step
          done_through = max(done_through, rb.step - 1)
          skip_batches.add(rb.step)
          getattr(train_iter, "close", lambda: None)()
          step, state, train_iter, _ = _resume_or_init(job, abstract, before=rb.step)
          log.warning("step %d: non-finite loss or gradients; rolled back to %s and skipping that step's batch "
                      "(rollback %d of at most %d in a row)", rb.step,
                      f"the checkpoint at step {step}" if step else "the initial state", rollbacks,
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
    last_eval = evaluate(job, eval_step, state.params)
  final = {"step": final_step, "skipped_steps": int(jax.device_get(state.skipped_steps)), **last_eval,
           "state_sha256": state_fingerprint(state)}
  write_json(os.path.join(workdir, "final_metrics.json"), final)
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
  prompt = np.asarray(ByteTokenizer().encode(sc.prompt, add_bos=True), np.int32)
  if len(prompt) + sc.num_tokens > config.model.max_len:  # Checked before anything is loaded or compiled.
    raise ConfigError(f"config.sample.prompt: {len(prompt)} tokens plus sample.num_tokens={sc.num_tokens} exceed "
                      f"the model's context model.max_len={config.model.max_len}; shorten the prompt or lower "
                      f"sample.num_tokens")
  job = build_job(config, workdir)
  tokenizer = job.data.tokenizer
  _, params = _restore_params(job)
  job.checkpointer.close()
  prompts = jnp.asarray(np.tile(prompt[None], (sc.num_samples, 1)))
  out = sample_tokens(job.model, params, prompts, num_tokens=sc.num_tokens, max_len=config.model.max_len,
                      rng=jax.random.PRNGKey(config.seed), temperature=sc.temperature, top_k=sc.top_k)
  return [tokenizer.decode(np.asarray(row)) for row in jax.device_get(out)]
