"""The seq2seq task (config.task="seq2seq"): an encoder-decoder learns `numbers_to_words` (digits -> English words)
with a length curriculum — `seq2seq.arch="lstm"`, the LSTM with additive attention
(`seqjax.models.seq2seq_lstm.Seq2SeqLSTM`, with scheduled sampling), or `"transformer"`
(`seqjax.models.seq2seq_transformer.Seq2SeqTransformer`, teacher forced).

Batches (`seqjax.data.numbers.padded_batches`, one (source, target) pair per row; each process builds every global
batch and puts its own row block, `process_row_block`): src [B, S], src_lengths [B],
tgt_in [B, T] (BOS + gold target), tgt_out [B, T] (target + EOS), tgt_lengths [B], and weights [B, T] (1 on the
target positions). Batch s is a pure function of (seed, s) with targets of at most `curriculum(s)` tokens, so the
data position is the batch index, {"next_batch": s}. The update from state.step = s feeds the gold previous token
with probability `teacher_forcing(s)` (its coin flips from the step's key) — `step_inputs(s)` reports both values,
which the train record at step s + 1 logs.

Evaluation: teacher-forced loss, perplexity, accuracy (next character) and bits per character, and decoding
(`seqjax.decode.seq2seq`: greedy, or beam search with `seq2seq.num_beams` > 1 and `seq2seq.length_penalty`) scored
by exact match, corpus BLEU (sacrebleu) and ROUGE-L (rouge-score), with a few example translations. Generation
translates the numbers of `config.sample.prompt` the same way.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from seqjax import config as config_lib
from seqjax.config import Config, ConfigError
from seqjax.data import numbers
from seqjax.data.pipeline import load_builder
from seqjax.evals.lm_metrics import summarize
from seqjax.evals.text_metrics import text_metrics
from seqjax.decode import seq2seq as seq2seq_decode
from seqjax.models.seq2seq_lstm import Seq2SeqLSTM
from seqjax.models.seq2seq_transformer import Seq2SeqTransformer
from seqjax.train import sharding
from seqjax.train.schedules import LengthCurriculum, make_teacher_forcing_schedule
from seqjax.train.task import DataStream, DeviceBatch, EvalStep, Evaluation, HostBatch, Task

# What the device sees of a host batch (the loss reads these; tgt_lengths is folded into weights).
_DEVICE_KEYS = ("src", "src_lengths", "tgt_in", "tgt_out", "weights")


def with_weights(batch: HostBatch, num_valid: int | None = None) -> HostBatch:
  """`batch` plus weights [B, T]: 1 on target positions (rows at or after `num_valid` — the padding rows of the
  last evaluation batch — get 0)."""
  b, t = batch["tgt_out"].shape
  valid_BT = np.arange(t)[None, :] < batch["tgt_lengths"][:, None]
  if num_valid is not None:
    valid_BT &= (np.arange(b) < num_valid)[:, None]
  return {**batch, "weights": valid_BT.astype(np.float32)}


class _IndexedBatches:
  """The training stream: batch s of `padded_batches`; its position is {"next_batch": s}."""

  def __init__(self, batches: Iterator[HostBatch], start: int):
    self._batches = batches
    self._next = start

  def __next__(self) -> HostBatch:
    batch = next(self._batches)
    self._next += 1
    return with_weights(batch)

  def get_state(self) -> dict[str, int]:
    return {"next_batch": self._next}

  def close(self) -> None:
    pass


def process_row_block(batch: HostBatch, rows: tuple[int, int]) -> HostBatch:
  """Row block `index` of `count` equal blocks of a global host batch (`rows` = `sharding.process_rows(mesh)`):
  what this process's devices hold, the rows `sharding.put_batch` expects from it."""
  index, count = rows
  if count == 1:
    return batch
  size = len(next(iter(batch.values())))
  if size % count:
    raise ValueError(f"a global batch of {size} rows does not split into {count} row blocks (one per group of "
                     f"processes along the mesh's batch axes); make train.batch_size a multiple of {count}")
  per = size // count
  return {k: v[index * per:(index + 1) * per] for k, v in batch.items()}


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


def _prompt_numbers(prompt: str) -> list[str]:
  return [p for p in re.split(r"[\s,]+", prompt) if p]


class Seq2SeqTask(Task):
  """numbers_to_words with an encoder-decoder (see the module docstring)."""

  name = "seq2seq"

  def __init__(self, config: Config, mesh: jax.sharding.Mesh):
    self.train_pairs, self.eval_pairs = _load_pairs(config)
    config = config_lib.with_seq2seq_vocab_sizes(config, numbers.VOCAB.size, numbers.VOCAB.size)
    super().__init__(config, mesh)
    self.rows = sharding.process_rows(mesh)  # this process's row block of each global batch
    sc = config.seq2seq
    longest = max(len(t) for _, t in self.train_pairs) + 1  # Target tokens incl. EOS.
    end = sc.curriculum_end or longest
    self.curriculum = LengthCurriculum(start=min(sc.curriculum_start, end), end=end,
                                       warmup_steps=sc.curriculum_warmup_steps, every=sc.curriculum_every)
    self.teacher_forcing = make_teacher_forcing_schedule(sc.teacher_forcing, **sc.teacher_forcing_kwargs())
    self.src_len = max(len(s) for s, _ in self.train_pairs)
    self.decode_len = sc.decode_max_len or longest
    if sc.arch == "transformer":
      longest_source = max(len(s) for s, _ in self.train_pairs + self.eval_pairs)
      longest_target = max(len(t) for _, t in self.train_pairs + self.eval_pairs) + 1
      for what, n in (("a source", longest_source), ("BOS + a target", longest_target),
                      ("BOS + seq2seq.decode_max_len", 1 + self.decode_len)):
        if n > sc.max_len:
          raise ConfigError(f"seq2seq.max_len: {what} has {n} tokens, more than seq2seq.max_len={sc.max_len} (the "
                            f"transformer's positions and decoder cache); raise it")
    self.model = Seq2SeqTransformer(sc) if sc.arch == "transformer" else Seq2SeqLSTM(sc)

  @classmethod
  def check_generate(cls, config: Config) -> None:
    prompt = _prompt_numbers(config.sample.prompt)
    if not prompt or not all(p.isdigit() for p in prompt):
      raise ConfigError(f"config.sample.prompt: task 'seq2seq' translates numbers written in digits, separated by "
                        f"spaces or commas (e.g. --config.sample.prompt='1204 77'), got {config.sample.prompt!r}")

  def describe(self) -> str:
    return f"{len(self.train_pairs)} training pairs, {len(self.eval_pairs)} validation pairs"

  # -- Parameters and data ---------------------------------------------------------------------------------------

  def init_params(self, rng: jax.Array) -> Any:
    s = self.src_len
    return self.model.init({"params": rng}, jnp.zeros((1, s), jnp.int32), jnp.full((1,), s, jnp.int32),
                           jnp.full((1, 1), numbers.BOS_ID, jnp.int32))["params"]

  def train_stream(self, step: int, position: Any | None) -> DataStream:
    if position is not None and (not isinstance(position, dict) or position.get("next_batch") != step):
      raise ConfigError(f"the checkpoint at step {step} holds data position {position!r}, not this task's batch "
                        f"index {{'next_batch': {step}}}; was the workdir trained with another task? Use another "
                        f"--workdir")
    batches = numbers.padded_batches(self.train_pairs, self.config.train.batch_size,
                                     max_target_length=self.curriculum, seed=self.config.seed, start_step=step)
    return _IndexedBatches(batches, step)

  def step_inputs(self, step: int) -> dict[str, float]:
    return {"teacher_forcing_prob": float(self.teacher_forcing(step)), "max_target_length": self.curriculum(step)}

  def _put(self, batch: HostBatch, **extra: np.ndarray) -> DeviceBatch:
    """The global device batch from a global host batch: every process builds each batch (a pure function of the
    seed and the step) and gives `put_batch` its own row block, as the LM's data pipeline does."""
    return sharding.put_batch(process_row_block({**{k: batch[k] for k in _DEVICE_KEYS}, **extra}, self.rows),
                              self.mesh)

  def device_batch(self, batch: HostBatch, step: int) -> DeviceBatch:
    prob = np.full((batch["src"].shape[0],), self.step_inputs(step)["teacher_forcing_prob"], np.float32)
    return self._put(batch, teacher_forcing_prob=prob)

  # -- Loss and evaluation ---------------------------------------------------------------------------------------

  def _logits(self, params: Any, batch: DeviceBatch, rng: jax.Array | None, deterministic: bool) -> jax.Array:
    if self.config.seq2seq.arch == "transformer":  # Teacher forced, in parallel.
      rngs = None if deterministic else {"dropout": rng}
      return self.model.apply({"params": params}, batch["src"], batch["src_lengths"], batch["tgt_in"],
                              deterministic=deterministic, rngs=rngs)
    if deterministic:  # Plain teacher forcing.
      prob, sampling_rng, rngs = 1.0, None, None
    else:  # Scheduled sampling: the coin flips and dropout draw from the step's key.
      sampling_rng, dropout_rng = jax.random.split(rng)
      prob, rngs = batch["teacher_forcing_prob"][:, None], {"dropout": dropout_rng}
    return self.model.apply({"params": params}, batch["src"], batch["src_lengths"], batch["tgt_in"],
                            teacher_forcing_prob=prob, sampling_rng=sampling_rng, deterministic=deterministic,
                            rngs=rngs)

  def loss_sum(self, params, batch, rng, deterministic):
    logits_BTV = self._logits(params, batch, rng, deterministic)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["tgt_out"])
    w_BT = batch["weights"].astype(jnp.float32)
    return jnp.sum(losses_BT * w_BT), jnp.sum(w_BT)

  def eval_sums(self, params, batch):
    logits_BTV = self._logits(params, batch, None, True)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["tgt_out"])
    w_BT = batch["weights"].astype(jnp.float32)
    correct_BT = (jnp.argmax(logits_BTV, -1) == batch["tgt_out"]).astype(jnp.float32)
    # Each character is one UTF-8 byte; EOS stands for none (bits per byte = bits per character).
    chars_BT = (batch["tgt_out"] != numbers.EOS_ID).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses_BT * w_BT), "weight": jnp.sum(w_BT), "bytes": jnp.sum(chars_BT * w_BT),
            "correct": jnp.sum(correct_BT * w_BT)}

  def decode(self, params: Any, batch: HostBatch) -> list[str]:
    """Translations of a batch's sources: greedy, or beam search with seq2seq.num_beams > 1."""
    sc = self.config.seq2seq
    src = sharding.put_batch(process_row_block({"src": batch["src"], "src_lengths": batch["src_lengths"]},
                                               self.rows), self.mesh)
    out = seq2seq_decode.decode(self.model, params, src["src"], src["src_lengths"], max_new_tokens=self.decode_len,
                                bos_id=numbers.BOS_ID, eos_id=numbers.EOS_ID, pad_id=numbers.PAD_ID,
                                num_beams=sc.num_beams, length_penalty=sc.length_penalty)
    tokens = multihost_utils.process_allgather(out.tokens, tiled=True)  # every row, on every process
    return [numbers.VOCAB.decode(row) for row in np.asarray(tokens)]

  def evaluate(self, params: Any, eval_step: EvalStep, max_batches: int | None) -> Evaluation:
    """Metrics: loss, perplexity, accuracy (next character under teacher forcing), bits_per_byte, exact_match,
    bleu (sacrebleu corpus BLEU, 0-100), rouge_l; and a few translations spread over the split."""
    bs = self.config.train.batch_size
    totals: dict[str, float] = {}
    hyps, refs, srcs = [], [], []
    for i, batch in enumerate(itertools.islice(numbers.eval_batches(self.eval_pairs, bs), max_batches)):
      n = int(batch.pop("num_valid"))
      batch = with_weights(batch, num_valid=n)
      sums = jax.device_get(eval_step(params, self._put(batch)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
      hyps += self.decode(params, batch)[:n]
      srcs += [s for s, _ in self.eval_pairs[i * bs:i * bs + n]]
      refs += [t for _, t in self.eval_pairs[i * bs:i * bs + n]]
    metrics = {**summarize(totals), **text_metrics(hyps, refs), "examples": float(len(hyps))}
    # The split is ordered by length: short, medium and long numbers.
    picks = np.linspace(0, len(hyps) - 1, num=min(self.config.seq2seq.log_examples, len(hyps))).astype(int)
    examples = [{"src": srcs[j], "ref": refs[j], "hyp": hyps[j]} for j in picks]
    lines = [f"validation loss {metrics['loss']:.4f}, exact match {metrics['exact_match']:.3f}, BLEU "
             f"{metrics['bleu']:.1f}, ROUGE-L {metrics['rouge_l']:.3f}"]
    lines += [f"  {ex['src']:>12} -> {ex['hyp']}   [{'ok' if ex['hyp'] == ex['ref'] else 'want: ' + ex['ref']}]"
              for ex in examples]
    return Evaluation(metrics, "\n".join(lines), examples)

  # -- Generation ------------------------------------------------------------------------------------------------

  def generate(self, params: Any) -> list[str]:
    """["1204 -> one thousand two hundred four", ...] for the numbers of config.sample.prompt."""
    prompt = _prompt_numbers(self.config.sample.prompt)
    data_parallel = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
    rows = -(-len(prompt) // data_parallel) * data_parallel  # Padded to whole rows per device.
    padded = prompt + [prompt[0]] * (rows - len(prompt))
    batch = numbers.pad_batch([numbers.VOCAB.encode(p) for p in padded], [[]] * rows, max(map(len, padded)), 1)
    return [f"{p} -> {w}" for p, w in zip(prompt, self.decode(params, batch))]
