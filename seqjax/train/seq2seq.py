"""The seq2seq jobs behind `python -m seqjax.main` when config.task == "seq2seq": train, evaluate, generate.

The LSTM encoder-decoder with additive attention (`seqjax.models.seq2seq_lstm`) learns `numbers_to_words`
(digits -> English words) with scheduled sampling and a length curriculum, through the LM trainer's machinery:
the same config validation, optax recipe, TrainState, mesh and shardings (parameters replicated, batch rows split
over the data axes), jitted train/eval steps (`seqjax.train.step`, with their gradient accumulation and
non-finite handling), orbax `Checkpointer`, `MetricWriter` and curves. The model enters the LM step through
`TeacherForcedSeq2Seq`, which presents it as a conditional language model of the target.

Step convention: the update that takes `state.step` from s to s + 1 trains on batch s of
`seqjax.data.numbers.padded_batches` (a pure function of (seed, s)), with targets of at most `curriculum(s)` tokens
and teacher-forcing probability `schedule(s)`; the train record logged at step s + 1 reports those two values.

Resume order (one place): `train` checks WORKDIR/config.json against the config (another config's run is refused),
restores the newest readable checkpoint in WORKDIR/checkpoints (TrainState: params, optimizer state, step, rng,
skipped steps; and the data position, which is that step), drops metrics.jsonl records after it and continues the
batch stream at that step. Step s's sampling and dropout keys are fold_in(rng, s), so a resumed run continues
bitwise as the uninterrupted one (on CPU; tested).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from seqjax import config as config_lib
from seqjax.config import Config, ConfigError
from seqjax.data import numbers
from seqjax.data.pipeline import load_builder
from seqjax.evals.lm_metrics import summarize
from seqjax.evals.text_metrics import text_metrics
from seqjax.models.seq2seq_lstm import Seq2SeqConfig, Seq2SeqLSTM, make_greedy_fn
from seqjax.train import sharding
from seqjax.train.checkpoint import Checkpointer
# The LM job's workdir helpers (one implementation for both tasks).
from seqjax.train.loop import (NonFiniteError, append_jsonl, nonfinite_record, Preemption, truncate_metrics,
                               write_json, check_workdir_config, state_fingerprint)
from seqjax.train.metrics import MetricWriter, plot_curves
from seqjax.train.optim import learning_rate_schedule, make_optimizer
from seqjax.train.schedules import LengthCurriculum, make_teacher_forcing_schedule
from seqjax.train.state import abstract_train_state, count_params, create_train_state
from seqjax.train.step import jit_train_step, leaf_names, make_eval_step, make_train_step

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The model as the LM step sees it
# ----------------------------------------------------------------------------------------------------------------


class TeacherForcedSeq2Seq(Seq2SeqLSTM):
  """`Seq2SeqLSTM` behind the LM step's model interface (`seqjax.train.step.token_losses`).

  `apply(variables, inputs, segment_ids=None, positions=None, deterministic=..., rngs=...)` returns the target
  logits [B, T, V] (float32) for `inputs` = {src [B, S], src_lengths [B], tgt_in [B, T] (BOS + gold target),
  teacher_forcing_prob [B]}; the LM step scores them against batch["targets"] (= tgt_out) weighted by
  batch["weights"] (valid target positions). Training (deterministic=False) does scheduled sampling with
  probability teacher_forcing_prob, its coin flips drawn from the "dropout" rng; evaluation (deterministic=True) is
  plain teacher forcing. A bare [B, S] source array (what `create_train_state` initialises with) stands for full-length
  sources with a BOS-only target. Parameters are those of `Seq2SeqLSTM` (same tree).
  """

  def __call__(self, inputs: Mapping[str, jax.Array] | jax.Array, *, segment_ids=None, positions=None,
               deterministic: bool = True) -> jax.Array:
    del segment_ids, positions  # Not packed: one (source, target) pair per row.
    if not isinstance(inputs, Mapping):
      src_BS = jnp.asarray(inputs)
      b, s = src_BS.shape
      inputs = {"src": src_BS, "src_lengths": jnp.full((b,), s, jnp.int32),
                "tgt_in": jnp.full((b, 1), numbers.BOS_ID, jnp.int32)}
    if deterministic:
      prob, rng = 1.0, None
    else:
      prob, rng = inputs["teacher_forcing_prob"][:, None], self.make_rng("dropout")
    return super().__call__(inputs["src"], inputs["src_lengths"], inputs["tgt_in"], teacher_forcing_prob=prob,
                            sampling_rng=rng, deterministic=deterministic)


def model_config(config: Config) -> Seq2SeqConfig:
  sc = config.seq2seq
  return Seq2SeqConfig(src_vocab=numbers.VOCAB.size, tgt_vocab=numbers.VOCAB.size, embed_dim=sc.embed_dim,
                       hidden=sc.hidden, encoder_layers=sc.encoder_layers, decoder_layers=sc.decoder_layers,
                       bidirectional_encoder=sc.bidirectional_encoder, attention_dim=sc.attention_dim,
                       dropout=sc.dropout)


def lm_batch(batch: Mapping[str, np.ndarray], teacher_forcing_prob: float, num_valid: int | None = None
             ) -> dict[str, Any]:
  """A `padded_batches`/`eval_batches` batch in the LM step's layout (inputs, targets, weights, target_bytes).

  Rows at or after `num_valid` get weight 0 (the padding rows of the last evaluation batch).
  """
  b, t = batch["tgt_out"].shape
  valid_BT = np.arange(t)[None, :] < batch["tgt_lengths"][:, None]
  if num_valid is not None:
    valid_BT &= (np.arange(b) < num_valid)[:, None]
  return {
      "inputs": {"src": batch["src"], "src_lengths": batch["src_lengths"], "tgt_in": batch["tgt_in"],
                 "teacher_forcing_prob": np.full((b,), teacher_forcing_prob, np.float32)},
      "targets": batch["tgt_out"],
      "weights": valid_BT.astype(np.float32),
      # Each character is one UTF-8 byte; EOS stands for none (bits per byte = bits per character).
      "target_bytes": (valid_BT & (batch["tgt_out"] != numbers.EOS_ID)).astype(np.int32),
  }


def put_lm_batch(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """`sharding.put_batch` on both levels of an `lm_batch` (rows split over the data axes)."""
  rest = {k: v for k, v in batch.items() if k != "inputs"}
  return {"inputs": sharding.put_batch(batch["inputs"], mesh), **sharding.put_batch(rest, mesh)}


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Seq2SeqJob:
  """Everything built from a config before the first step."""

  config: Config
  workdir: str
  mesh: jax.sharding.Mesh
  model: TeacherForcedSeq2Seq
  optimizer: Any
  checkpointer: Checkpointer
  train_pairs: list[tuple[str, str]]
  eval_pairs: list[tuple[str, str]]
  curriculum: LengthCurriculum
  teacher_forcing: Callable[[Any], Any]
  decode_max_len: int

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, "checkpoints")

  @property
  def src_len(self) -> int:
    return max(len(s) for s, _ in self.train_pairs)

  def batches(self, start_step: int) -> Iterator[Batch]:
    """The training stream from `start_step` on (batch s depends only on (seed, s))."""
    return numbers.padded_batches(self.train_pairs, self.config.train.batch_size,
                                  max_target_length=self.curriculum, seed=self.config.seed, start_step=start_step)


def _load_pairs(config: Config) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  dc, sc = config.data, config.seq2seq
  name = dc.name if "/" in dc.name else f"{dc.name}/standard"
  try:
    builder = load_builder(name, os.path.expanduser(dc.data_dir) if dc.data_dir else None)
    train_pairs, eval_pairs = numbers.load_pairs(builder, dc.train_split), numbers.load_pairs(builder, dc.eval_split)
  except ValueError as e:  # Unknown builder config or split.
    raise ConfigError(f"config.data ({name!r}, splits {dc.train_split!r}/{dc.eval_split!r}): {e}") from e
  if sc.max_digits:
    train_pairs = [p for p in train_pairs if len(p[0]) <= sc.max_digits]
    eval_pairs = [p for p in eval_pairs if len(p[0]) <= sc.max_digits]
  for split, pairs in ((dc.train_split, train_pairs), (dc.eval_split, eval_pairs)):
    if not pairs:
      raise ConfigError(f"config.data.name: split {split!r} of {name!r} has no numbers of at most "
                        f"seq2seq.max_digits={sc.max_digits} digits")
  return train_pairs, eval_pairs


def build_job(config: Config, workdir: str) -> Seq2SeqJob:
  """Builds mesh, data, model, optimizer, schedules and checkpointer; fails fast on anything inconsistent."""
  if config.task != "seq2seq":
    raise ConfigError(f"config.task: seqjax.train.seq2seq runs task 'seq2seq', got {config.task!r}")
  tc, sc = config.train, config.seq2seq
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  data_parallel = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  if (tc.batch_size // tc.grad_accum_steps) % data_parallel:
    raise ConfigError(f"config.train.batch_size: (micro-)batches of {tc.batch_size // tc.grad_accum_steps} rows "
                      f"cannot be split over the {data_parallel} data-parallel devices of mesh "
                      f"{dict(mesh.shape)}; use a multiple of {data_parallel} rows per micro-batch")
  train_pairs, eval_pairs = _load_pairs(config)
  longest = max(len(t) for _, t in train_pairs) + 1  # Target tokens incl. EOS.
  end = sc.curriculum_end or longest
  curriculum = LengthCurriculum(start=min(sc.curriculum_start, end), end=end,
                                warmup_steps=sc.curriculum_warmup_steps, every=sc.curriculum_every)
  teacher_forcing = make_teacher_forcing_schedule(sc.teacher_forcing, **sc.teacher_forcing_kwargs())
  model = TeacherForcedSeq2Seq(model_config(config))
  optimizer = make_optimizer(config.optim, tc.num_steps)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints,
                              async_save=tc.async_checkpointing)
  return Seq2SeqJob(config, workdir, mesh, model, optimizer, checkpointer, train_pairs, eval_pairs, curriculum,
                    teacher_forcing, sc.decode_max_len or longest)


def make_decode_fn(job: Seq2SeqJob) -> Callable[[Any, Mapping[str, np.ndarray]], list[str]]:
  """`decode(params, batch) -> list of strings`: jitted greedy decoding of a batch's sources."""
  greedy = make_greedy_fn(job.model, max_len=job.decode_max_len, bos_id=numbers.BOS_ID, eos_id=numbers.EOS_ID,
                          pad_id=numbers.PAD_ID)

  def decode(params, batch):
    src = sharding.put_batch({"src": batch["src"], "src_lengths": batch["src_lengths"]}, job.mesh)
    tokens, _ = greedy({"params": params}, src["src"], src["src_lengths"])
    return [numbers.VOCAB.decode(row) for row in np.asarray(jax.device_get(tokens))]

  return decode


def evaluate(job: Seq2SeqJob, eval_step, decode, params: Any) -> tuple[dict[str, float], list[dict[str, str]]]:
  """Teacher-forced loss and greedy-decoding metrics on the validation split -> (metrics, example translations).

  Metrics: loss, perplexity, accuracy (next character under teacher forcing), bits_per_byte, exact_match, bleu
  (sacrebleu corpus BLEU, 0-100), rouge_l. At most train.eval_batches batches (0: the whole split).
  """
  limit = job.config.train.eval_batches or None
  totals: dict[str, float] = {}
  hyps, refs, srcs = [], [], []
  for i, batch in enumerate(numbers.eval_batches(job.eval_pairs, job.config.train.batch_size)):
    if limit is not None and i >= limit:
      break
    n = int(batch.pop("num_valid"))
    sums = jax.device_get(eval_step(params, put_lm_batch(lm_batch(batch, 1.0, num_valid=n), job.mesh)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    hyps += decode(params, batch)[:n]
    first = i * job.config.train.batch_size
    srcs += [s for s, _ in job.eval_pairs[first:first + n]]
    refs += [t for _, t in job.eval_pairs[first:first + n]]
  metrics = {**summarize(totals), **text_metrics(hyps, refs), "examples": float(len(hyps))}
  # A few translations spread over the split (it is ordered by length): short, medium and long numbers.
  picks = np.linspace(0, len(hyps) - 1, num=min(job.config.seq2seq.log_examples, len(hyps))).astype(int)
  examples = [{"src": srcs[j], "ref": refs[j], "hyp": hyps[j]} for j in picks]
  return metrics, examples


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def _restore_or_init(job: Seq2SeqJob, abstract: Any) -> tuple[int, Any, bool]:
  restored = job.checkpointer.restore_latest(abstract)
  if restored is None:
    state, _ = create_train_state(job.model, job.optimizer, seq_len=job.src_len, seed=job.config.seed,
                                  mesh=job.mesh)
    return 0, state, False
  step, state, data_state = restored
  if not isinstance(data_state, dict) or data_state.get("next_batch") != step:
    raise ConfigError(f"the checkpoint at step {step} in {job.checkpoint_dir} holds data position {data_state!r}, "
                      f"not a seq2seq batch index; was this workdir trained with task 'lm'? Use another --workdir")
  return step, state, True


def _log_examples(progress, examples: list[dict[str, str]]) -> None:
  for ex in examples:
    mark = "ok" if ex["hyp"] == ex["ref"] else f"want: {ex['ref']}"
    progress.write(f"  {ex['src']:>12} -> {ex['hyp']}   [{mark}]")


def train(config: Config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from WORKDIR if it holds checkpoints) and returns the final metrics (also in
  WORKDIR/final_metrics.json): step, loss, exact_match, bleu, rouge_l, ..., and the teacher-forcing probability and
  curriculum length of the last step."""
  began = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  changes = check_workdir_config(config, workdir)
  job = build_job(config, workdir)
  tc = config.train
  write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
  if changes:
    log.warning("resuming with a changed config: %s", ", ".join(f"{k}: {a!r} -> {b!r}"
                                                                  for k, (a, b) in sorted(changes.items())))
    append_jsonl(os.path.join(workdir, "config_changes.jsonl"), {"changed": {k: list(v) for k, v in changes.items()}})

  abstract, state_shardings = abstract_train_state(job.model, job.optimizer, seq_len=job.src_len, mesh=job.mesh)
  start, state, resumed = _restore_or_init(job, abstract)
  log.info("%s (%d parameters; %d training pairs, %d validation pairs)",
           f"resumed from the checkpoint at step {start}" if resumed else "initialised a new run",
           count_params(state.params), len(job.train_pairs), len(job.eval_pairs))
  truncate_metrics(workdir, start)
  names = leaf_names(abstract.params)
  step_fn = jit_train_step(make_train_step(job.model, job.optimizer, grad_accum_steps=tc.grad_accum_steps,
                                           dropout=True, on_nan=tc.on_nan),  # dropout=True: the sampling rng.
                           state_shardings, sharding.batch_sharding(job.mesh))
  eval_step = jax.jit(make_eval_step(job.model))
  decode = make_decode_fn(job)
  lr_at = learning_rate_schedule(config.optim, tc.num_steps)
  writer = MetricWriter(workdir)

  def nonfinite(step: int, host: dict) -> None:
    record = nonfinite_record(step, host, names, None)
    action = "skipped" if tc.on_nan == "skip" else "stopped"
    append_jsonl(os.path.join(workdir, "nonfinite.jsonl"), {**record, "action": action})
    if tc.on_nan == "skip":
      log.warning("step %d: non-finite loss or gradients; the update was dropped and counted as skipped", step)
      return
    report = os.path.join(workdir, "nonfinite_report.json")
    write_json(report, {**record, "action": action})
    raise NonFiniteError(f"non-finite loss or gradients at step {step} (loss={record['loss']}); report: {report}. "
                         f"The checkpoints are intact: fix the cause (e.g. lower optim.learning_rate) and rerun to "
                         f"resume, or set train.on_nan='skip'")

  window: list[dict[str, float] | None] = []
  timer = {"start": time.perf_counter(), "steps": 0}
  last_eval: dict[str, float] | None = None

  def drain(done: tuple[int, Any, float, int], progress) -> None:
    """Reads step `step`'s metrics (one step late, so the host never stalls the device) and logs."""
    step, metrics, prob, max_len = done
    host = jax.device_get(metrics)
    if bool(host["finite"]):
      window.append({"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"])})
    else:
      nonfinite(step, host)
      window.append(None)
    if step % tc.log_every and step != tc.num_steps:
      return
    finite = [m for m in window if m is not None]
    avg = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan") for k in ("loss", "grad_norm")}
    avg.update(learning_rate=float(lr_at(step - 1)), teacher_forcing_prob=prob, max_target_length=float(max_len))
    if len(finite) < len(window):
      avg["skipped"] = float(len(window) - len(finite))
    if timer["steps"]:
      avg["examples_per_sec"] = tc.batch_size * timer["steps"] / max(time.perf_counter() - timer["start"], 1e-9)
    progress.set_postfix(loss=f"{avg['loss']:.3f}", p_tf=f"{prob:.2f}", len=max_len)
    writer.write(step, "train", avg)
    window.clear()

  def reset_timer():
    timer.update(start=time.perf_counter(), steps=0)

  batches = job.batches(start)
  pending = None
  step, shape = start, None
  try:
    with Preemption() as preemption, tqdm.tqdm(total=tc.num_steps, initial=start, unit="step", dynamic_ncols=True,
                                                disable=jax.process_index() != 0) as progress:
      while step < tc.num_steps:
        prob, max_len = float(job.teacher_forcing(step)), job.curriculum(step)
        batch = next(batches)
        state, metrics = step_fn(state, put_lm_batch(lm_batch(batch, prob), job.mesh))
        step += 1
        if pending is not None:
          drain(pending, progress)
        pending = (step, metrics, prob, max_len)
        progress.update(1)
        timer["steps"] += 1
        if batch["tgt_in"].shape != shape:  # First step or a longer curriculum length: it compiled. Time after it.
          shape = batch["tgt_in"].shape
          jax.block_until_ready(state.step)
          reset_timer()
        is_last = step == tc.num_steps
        due_eval = step % tc.eval_every == 0 or is_last
        due_save = step % tc.checkpoint_every == 0 or is_last or preemption.requested
        if due_eval or due_save:
          drain(pending, progress)  # Never evaluate or save a state before its step was checked.
          pending = None
        if due_eval:
          last_eval, examples = evaluate(job, eval_step, decode, state.params)
          writer.write(step, "eval", last_eval)
          append_jsonl(os.path.join(workdir, "examples.jsonl"), {"step": step, "examples": examples})
          progress.write(f"step {step}: validation loss {last_eval['loss']:.4f}, exact match "
                         f"{last_eval['exact_match']:.3f}, BLEU {last_eval['bleu']:.1f}, ROUGE-L "
                         f"{last_eval['rouge_l']:.3f} (p_tf={prob:.3f}, max length {max_len})")
          _log_examples(progress, examples)
        if due_save:
          job.checkpointer.save(step, state, {"next_batch": step})
        if due_eval or due_save:
          reset_timer()
        if preemption.requested:
          break
  finally:
    job.checkpointer.close()  # Waits for the last (asynchronous) save, also when stopping on an error.
    writer.close()

  final_step = int(jax.device_get(state.step))
  if preemption.requested and final_step < tc.num_steps:
    log.warning("preempted at step %d; the checkpoint is written, rerun the same command to resume", final_step)
    return {"step": final_step, "preempted": 1.0}
  if last_eval is None:  # Resumed a run that had already finished.
    last_eval, _ = evaluate(job, eval_step, decode, state.params)
  last = max(final_step - 1, 0)
  final = {"step": final_step, "skipped_steps": int(jax.device_get(state.skipped_steps)), **last_eval,
           "teacher_forcing_prob": float(job.teacher_forcing(last)), "max_target_length": job.curriculum(last),
           "seconds": time.perf_counter() - began, "state_sha256": state_fingerprint(state)}
  write_json(os.path.join(workdir, "final_metrics.json"), final)
  plot_curves(workdir)
  return final


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and generation from a checkpoint
# ----------------------------------------------------------------------------------------------------------------


def _restore_params(job: Seq2SeqJob) -> tuple[int, Any]:
  abstract, _ = abstract_train_state(job.model, job.optimizer, seq_len=job.src_len, mesh=job.mesh)
  restored = job.checkpointer.restore_latest(abstract, with_data=False)
  job.checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {job.checkpoint_dir}; train first (--mode=train) with this --workdir")
  step, state, _ = restored
  return step, state.params


def evaluate_checkpoint(config: Config, workdir: str) -> dict[str, float]:
  """Evaluates the newest checkpoint in WORKDIR on the validation split (see `evaluate`)."""
  job = build_job(config, workdir)
  step, params = _restore_params(job)
  metrics, examples = evaluate(job, jax.jit(make_eval_step(job.model)), make_decode_fn(job), params)
  for ex in examples:
    log.info("%s -> %s (reference: %s)", ex["src"], ex["hyp"], ex["ref"])
  return {"step": step, **metrics}


def generate(config: Config, workdir: str) -> list[str]:
  """Translates the numbers in `config.sample.prompt` (digits separated by spaces or commas) with the newest
  checkpoint: -> ["1204 -> one thousand two hundred four", ...]."""
  prompt = [p for p in re.split(r"[\s,]+", config.sample.prompt) if p]
  if not prompt or not all(p.isdigit() for p in prompt):  # Checked before anything is loaded or compiled.
    raise ConfigError(f"config.sample.prompt: task 'seq2seq' translates numbers written in digits, separated by "
                      f"spaces or commas (e.g. --config.sample.prompt='1204 77'), got {config.sample.prompt!r}")
  job = build_job(config, workdir)
  _, params = _restore_params(job)
  data_parallel = math.prod(job.mesh.shape[a] for a in sharding.BATCH_AXES)
  rows = -(-len(prompt) // data_parallel) * data_parallel  # Padded to whole rows per device.
  padded = prompt + [prompt[0]] * (rows - len(prompt))
  batch = numbers.pad_batch([numbers.VOCAB.encode(p) for p in padded], [[]] * rows, max(map(len, padded)), 1)
  words = make_decode_fn(job)(params, batch)
  return [f"{p} -> {w}" for p, w in zip(prompt, words)]
