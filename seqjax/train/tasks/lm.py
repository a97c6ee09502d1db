"""The language-model task (config.task="lm"): a decoder-only LM (`seqjax.models.lm.DecoderLM`) over packed
documents from the grain pipeline (`seqjax.data.pipeline.make_lm_data`), or over the examples of a synthetic task
(`config.data.name = "mqar/len64_pairs4"`, ...: `seqjax.data.synthetic.pipeline`), whose weights are 1 only on
answer positions — so the loss and accuracy are the answers' (evaluation adds answer_accuracy and
sequence_accuracy, the fraction of examples with every answer right). A synthetic task has at most K answers per
row (`SyntheticData.answers_per_row`: MQAR's pairs, selective copying's tokens, 1 for induction heads), so its loss
and evaluation apply the head to those K positions only (`answers_only`), not all T: the same numbers, and with
MQAR's 8,192-word vocabulary most of a step's cost saved.

Batches are [B, T] arrays: inputs, targets, segment_ids, positions, weights (1 on real targets), target_bytes
(UTF-8 bytes each target stands for). The loss is the weighted token cross-entropy; evaluation reports loss,
perplexity, bits per byte and accuracy (`seqjax.evals.lm_metrics.summarize`); generation samples continuations of
`config.sample.prompt`. The data position is the grain iterator's state.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import config as config_lib
from seqjax.config import Config, ConfigError
from seqjax.data import synthetic
from seqjax.data.pipeline import make_lm_data
from seqjax.data.tokenizer import ByteTokenizer
from seqjax.decode import generate, parameter_bytes, quantize
from seqjax.evals.lm_metrics import summarize
from seqjax.models.lm import DecoderLM
from seqjax.nn import attention as attention_nn
from seqjax.nn import linear_attention as linear_attention_nn
from seqjax.nn import moe as moe_nn
from seqjax.ops.attention import ring_layout_permutation
from seqjax.train import sharding
from seqjax.train.state import token_init
from seqjax.train.step import LossFn
from seqjax.train.task import DataStream, DeviceBatch, EvalStep, Evaluation, HostBatch, Task

log = logging.getLogger(__name__)


def in_context_parallel_layout(model: nn.Module, batch: DeviceBatch) -> DeviceBatch:
  """The batch with every [B, T] array in the order the "seq" devices hold the sequence, when the step runs
  context-parallel (`seqjax.nn.attention.context_parallel_shards() > 1`) in a layout other than "contiguous".

  Positions are made explicit first (they are the tokens' places in the sequence). Token losses are summed with
  their weights, so the loss and its gradients do not change."""
  layout = getattr(getattr(model, "cfg", None), "context_parallel_layout", "contiguous")
  shards = attention_nn.context_parallel_shards()
  if shards == 1 or layout == "contiguous":
    return batch
  B, T = batch["inputs"].shape
  batch = dict(batch)
  if batch.get("positions") is None:
    batch["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  perm, _ = ring_layout_permutation(T, shards, layout)
  return {k: v[:, perm] if v is not None and v.ndim >= 2 and v.shape[:2] == (B, T) else v for k, v in batch.items()}


# The batch field (int32 [B], every row the same) that carries the update's step to the Performer's feature redraw.
FEATURE_STEP_KEY = "performer_step"


def performer_redraw_every(model_cfg: Any) -> int:
  """`model.linear.redraw_every` if the model's stack has a Performer layer, else 0 (no redraws)."""
  if model_cfg is None or "performer" not in model_cfg.mixer_pattern:
    return 0
  return model_cfg.linear.redraw_every


def performer_draws(model: nn.Module, batch: DeviceBatch, every: int) -> dict[str, Any]:
  """The extra variables of a training update whose batch carries its step (`FEATURE_STEP_KEY`): the "performer"
  collection with every Performer's feature draw set to step // every (`set_feature_draw`), so the random features
  are redrawn every `every` steps, deterministically from the step and model.linear.feature_seed. {} without
  redraws or without the field (evaluation, generation, `seqjax.load`: draw 0, the first `every` steps' features).
  """
  if not every or FEATURE_STEP_KEY not in batch:
    return {}
  tokens = jax.ShapeDtypeStruct((1, batch["inputs"].shape[1]), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init({"params": jax.random.key(0)}, t), tokens)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[linear_attention_nn.FEATURE_DRAW_COLLECTION])
  return linear_attention_nn.set_feature_draw({linear_attention_nn.FEATURE_DRAW_COLLECTION: zeros},
                                              batch[FEATURE_STEP_KEY][0], every)


ANSWER_KEYS = ("targets", "weights", "target_bytes")


def answers_only(batch: DeviceBatch, k: int) -> DeviceBatch:
  """The batch with targets, weights and target_bytes [B, T] narrowed to each row's first `k` weighted positions
  [B, k], which it carries as `read_positions` (int32 [B, k]) for `token_losses`. A row with fewer than k answers
  is filled with positions of weight 0 (it never counts an answer twice); one with more would lose answers, which
  `check_answers_per_row` rules out on the host before the batch gets here."""
  w_BT = batch["weights"]
  # A stable sort of "not an answer" puts a row's answer positions first, in order, then its other positions.
  read_BK = jnp.argsort((w_BT <= 0).astype(jnp.int32), axis=1, stable=True)[:, :k].astype(jnp.int32)
  narrowed = {key: jnp.take_along_axis(batch[key], read_BK, axis=1) for key in ANSWER_KEYS if key in batch}
  return {**batch, **narrowed, "read_positions": read_BK}


def check_answers_per_row(weights_BT: np.ndarray, k: int) -> None:
  """ValueError if a row of a host batch has more than k weighted positions (`answers_only` would drop some)."""
  most = int(np.max(np.sum(np.asarray(weights_BT) > 0, axis=1), initial=0))
  if most > k:
    raise ValueError(f"a batch row has {most} weighted (answer) positions, more than the {k} the task declares "
                     f"per row (answers_per_example of its synthetic module); fix the generator or that function")


def token_losses(model: nn.Module, params: Any, batch: DeviceBatch, *, rng: jax.Array | None = None,
                 deterministic: bool = True, mutable: list[str] | None = None,
                 collections: dict[str, Any] | None = None):
  """Per-token cross-entropy [B, T] (float32) and the logits [B, T, V] of a model applied to batch["inputs"]; with
  `mutable` collections (e.g. ["moe"]), ((losses, logits), the sown collections). `collections`: variables besides
  the params (e.g. the Performer's feature draws, `performer_draws`). A batch from `answers_only` gives [B, K]
  losses and [B, K, V] logits at its `read_positions`."""
  rngs = None if deterministic else {"dropout": rng}
  out = model.apply({"params": params, **(collections or {})}, batch["inputs"], segment_ids=batch.get("segment_ids"),
                    positions=batch.get("positions"), deterministic=deterministic, rngs=rngs,
                    mutable=mutable or False, read_positions=batch.get("read_positions"))
  logits_BTV, sown = out if mutable else (out, None)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"]), logits_BTV
  return (losses, sown) if mutable else losses


def lm_loss_sum(model: nn.Module, answers_per_row: int = 0) -> LossFn:
  """`loss_sum(params, batch, rng, deterministic) -> (sum, weight)`: the weighted token cross-entropy of `model`
  (what `seqjax.train.step.make_train_step` takes). With mixture-of-experts blocks (config.model.moe) the sum also
  holds weight * (load_balance_weight * sum over MoE layers of the Switch loss + z_loss_weight * sum of the
  z-losses), and a third value, {"moe_load_balance_loss", "moe_router_z_loss", "moe_dropped_fraction"} (their
  means over the MoE layers) times the weight, which the step logs (docs/moe.md). With Performer layers and
  model.linear.redraw_every > 0, a batch carrying its step (`FEATURE_STEP_KEY`, added by `LMTask.device_batch`)
  uses the features of draw step // redraw_every (`performer_draws`). `answers_per_row` > 0: each row has at most
  that many weighted positions, and only they are read out (`answers_only`); the same loss and gradients."""

  cfg = getattr(model, "cfg", None)
  moe = getattr(cfg, "moe", None)
  redraw_every = performer_redraw_every(cfg)

  def loss_sum(params, batch, rng, deterministic):
    batch = in_context_parallel_layout(model, batch)
    if answers_per_row:
      batch = answers_only(batch, answers_per_row)
    draws = performer_draws(model, batch, redraw_every)
    if moe is None or not moe.num_experts:
      losses_BT, _ = token_losses(model, params, batch, rng=rng, deterministic=deterministic, collections=draws)
      w_BT = batch["weights"].astype(jnp.float32)
      return jnp.sum(losses_BT * w_BT), jnp.sum(w_BT)
    (losses_BT, _), sown = token_losses(model, params, batch, rng=rng, deterministic=deterministic,
                                        mutable=["moe"], collections=draws)
    w_BT = batch["weights"].astype(jnp.float32)
    weight = jnp.sum(w_BT)
    aux = moe_nn.moe_losses(sown.get("moe", {}))
    objective = (moe.load_balance_weight * jnp.sum(aux["load_balance_loss"]) +
                 moe.z_loss_weight * jnp.sum(aux["router_z_loss"]))
    extras = {f"moe_{k}": jnp.mean(v) * weight for k, v in aux.items()}
    return jnp.sum(losses_BT * w_BT) + objective * weight, weight, extras

  return loss_sum


def lm_eval_sums(model: nn.Module, params: Any, batch: DeviceBatch, *, per_row: bool = False,
                 answers_per_row: int = 0) -> dict[str, jax.Array]:
  """Sums over the batch: loss, weight, target bytes and correct next-token predictions; with `per_row` also
  `rows` (rows with a weighted target) and `rows_correct` (those whose weighted targets are all predicted).
  `answers_per_row` > 0: only the weighted positions are read out (`answers_only`), the same sums."""
  batch = in_context_parallel_layout(model, batch)
  if answers_per_row:
    batch = answers_only(batch, answers_per_row)
  losses_BT, logits_BTV = token_losses(model, params, batch)
  w_BT = batch["weights"].astype(jnp.float32)
  correct_BT = (jnp.argmax(logits_BTV, -1) == batch["targets"]).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(losses_BT * w_BT), "weight": jnp.sum(w_BT),
          "bytes": jnp.sum(batch["target_bytes"].astype(jnp.float32) * w_BT),
          "correct": jnp.sum(correct_BT * w_BT)}
  if per_row:
    scored_B = jnp.any(w_BT > 0, axis=1)
    all_right_B = jnp.all((correct_BT > 0) | (w_BT == 0), axis=1) & scored_B
    sums.update(rows=jnp.sum(scored_B.astype(jnp.float32)), rows_correct=jnp.sum(all_right_B.astype(jnp.float32)))
  return sums


def answer_metrics(totals: dict[str, float]) -> dict[str, float]:
  """`summarize`'s metrics of a synthetic task's evaluation (its weights are the answers): answer_accuracy (=
  accuracy, the fraction of answers right) and sequence_accuracy (examples with all answers right)."""
  metrics = summarize(totals)
  metrics["answer_accuracy"] = metrics["accuracy"]
  metrics["sequence_accuracy"] = totals["rows_correct"] / max(totals["rows"], 1.0)
  return metrics


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


class LMTask(Task):
  """Byte-level language modelling (see the module docstring)."""

  name = "lm"

  def __init__(self, config: Config, mesh: jax.sharding.Mesh):
    _check_registered(config)
    self.synthetic = synthetic.is_synthetic(config.data.name)
    rows = sharding.process_rows(mesh)  # this process's rows of each global batch
    if self.synthetic:
      self.data = open_synthetic(config, "lm", rows)
    else:
      self.data = self._open_text(config, rows)
    super().__init__(config_lib.with_vocab_size(config, self.data.vocab_size), mesh)
    self.model = DecoderLM(self.config.model)
    self._init = token_init(self.model, self.config.data.seq_len)
    self.answers_per_row = self.data.answers_per_row if self.synthetic else 0
    self._loss_sum = lm_loss_sum(self.model, self.answers_per_row)
    self._redraw_every = performer_redraw_every(self.config.model)

  @staticmethod
  def _open_text(config: Config, rows: tuple[int, int] | None = None):
    index, count = rows or (None, None)
    try:
      return make_lm_data(name=config.data.name, data_dir=config.data.data_dir or None,
                          seq_len=config.data.seq_len, batch_size=config.train.batch_size, seed=config.seed,
                          text_key=config.data.text_key, train_split=config.data.train_split,
                          eval_split=config.data.eval_split, num_workers=config.data.num_workers,
                          process_index=index, process_count=count)
    except ValueError as e:  # Unknown dataset/split/feature, an empty split, one too short for a batch.
      raise ConfigError(f"config.data ({config.data.name!r}, train.batch_size={config.train.batch_size}, "
                        f"data.seq_len={config.data.seq_len}): {e}") from e

  @classmethod
  def check_generate(cls, config: Config) -> None:
    if synthetic.is_synthetic(config.data.name):
      return  # Generation shows the model's answers to validation examples: nothing to check.
    sc = config.sample
    prompt = ByteTokenizer().encode(sc.prompt, add_bos=True)
    if len(prompt) + sc.num_tokens > config.model.max_len:
      raise ConfigError(f"config.sample.prompt: {len(prompt)} tokens plus sample.num_tokens={sc.num_tokens} "
                        f"exceed the model's context model.max_len={config.model.max_len}; shorten the prompt or "
                        f"lower sample.num_tokens")
    vocab = config.model.vocab_size or ByteTokenizer().vocab_size
    bad = [i for i in sc.stop_token_ids(eos_id=ByteTokenizer().eos_id) if i >= vocab]
    if bad:
      raise ConfigError(f"config.sample.stop_tokens: ids {bad} are outside the vocabulary of {vocab} tokens")
    if sc.top_k > vocab:
      raise ConfigError(f"config.sample.top_k: {sc.top_k} is larger than the vocabulary ({vocab} tokens)")

  def init_params(self, rng: jax.Array) -> Any:
    return self._init(rng)

  def train_stream(self, step: int, position: Any | None) -> DataStream:
    del step  # The grain iterator's own state says where it is.
    return resume_iterator(self.data, position)

  def step_inputs(self, step: int) -> dict[str, float]:
    """With Performer feature redraws: the draw the update from `step` uses (logged with the train record)."""
    return {"performer_feature_draw": step // self._redraw_every} if self._redraw_every else {}

  def device_batch(self, batch: HostBatch, step: int) -> DeviceBatch:
    """The device batch; with Performer feature redraws (model.linear.redraw_every > 0) it also carries the
    update's step (`FEATURE_STEP_KEY`, int32 [B]), from which the loss sets the draw: step // redraw_every. A
    function of the step only, so a resumed or rolled-back run redraws the same features at the same steps."""
    if self.answers_per_row:
      check_answers_per_row(batch["weights"], self.answers_per_row)
    if not self._redraw_every:
      return super().device_batch(batch, step)
    rows = batch["inputs"].shape[0]
    return sharding.put_batch({**batch, FEATURE_STEP_KEY: np.full((rows,), step, np.int32)}, self.mesh)

  def loss_sum(self, params, batch, rng, deterministic):
    return self._loss_sum(params, batch, rng, deterministic)

  def eval_sums(self, params, batch):
    return lm_eval_sums(self.model, params, batch, per_row=self.synthetic, answers_per_row=self.answers_per_row)

  def evaluate(self, params: Any, eval_step: EvalStep, max_batches: int | None) -> Evaluation:
    batches = self.data.eval_batches(max_batches=max_batches)
    if self.answers_per_row:
      batches = _checked(batches, self.answers_per_row)
    totals = sum_eval_batches(batches, params, eval_step, self.mesh)
    if self.synthetic:
      metrics = answer_metrics(totals)
      return Evaluation(metrics, f"validation loss {metrics['loss']:.4f}, answer accuracy "
                                 f"{metrics['answer_accuracy']:.4f}, sequence accuracy "
                                 f"{metrics['sequence_accuracy']:.4f}")
    metrics = summarize(totals)
    return Evaluation(metrics, f"validation loss {metrics['loss']:.4f}, bits/byte "
                               f"{metrics.get('bits_per_byte', float('nan')):.4f}")

  @classmethod
  def generate_saved(cls, config: Config, workdir: str) -> list[str] | None:
    """Continuations from the newest checkpoint, loaded with `seqjax.load` (no data is built). The workdir must
    hold a run of this config (config.sample may differ). A synthetic task's answers need its data: None."""
    if synthetic.is_synthetic(config.data.name):
      return None
    from seqjax.train.saved import load  # pylint: disable=import-outside-toplevel
    from seqjax.train.workdir import check_workdir_config  # pylint: disable=import-outside-toplevel
    check_workdir_config(config, workdir)
    model, params, _, tokenizer = load(workdir)
    return sample_text(model, params, tokenizer, config.sample, seed=config.seed)

  def _answers(self, params: Any) -> list[str]:
    """A synthetic task's answers on the first sample.num_samples validation examples: each example's answers,
    the model's predictions at the same positions (argmax given the inputs), and how many are right."""
    batch = next(self.data.eval_batches(max_batches=1))
    device = sharding.put_batch({k: batch[k] for k in ("inputs", "segment_ids") if k in batch}, self.mesh)
    logits_BTV = jax.jit(self.model.apply)({"params": params}, device["inputs"],
                                           segment_ids=device.get("segment_ids"))
    predicted_BT = np.asarray(jax.device_get(jnp.argmax(logits_BTV, -1)))
    out = []
    for b in range(min(self.config.sample.num_samples, batch["inputs"].shape[0])):
      where = np.flatnonzero(batch["weights"][b])
      want, got = batch["targets"][b, where].tolist(), predicted_BT[b, where].tolist()
      right = sum(w == g for w, g in zip(want, got))
      out.append(f"answers {want}\npredicted {got}\n{right}/{len(want)} right")
    return out

  def generate(self, params: Any) -> list[str]:
    if self.synthetic:
      return self._answers(params)
    return sample_text(self.model, params, self.data.tokenizer, self.config.sample, seed=self.config.seed)

  @property
  def throughput(self) -> tuple[str, float]:
    return "tokens_per_sec", float(self.config.train.batch_size * self.config.data.seq_len)


def _checked(batches, k: int):
  for batch in batches:
    check_answers_per_row(batch["weights"], k)
    yield batch


def resume_iterator(data: Any, position: Any | None) -> DataStream:
  """`data.train_iterator()`, moved to `position` (a grain iterator state; None: the start)."""
  stream = data.train_iterator()
  if position is not None:
    stream.set_state(position)
  return stream


def sum_eval_batches(batches, params: Any, eval_step: EvalStep, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """The sums of `eval_step` over host batches, added up on the host."""
  totals: dict[str, float] = {}
  for batch in batches:
    sums = jax.device_get(eval_step(params, sharding.put_batch(batch, mesh)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  return totals


def open_synthetic(config: Config, kind: str, rows: tuple[int, int] | None = None):
  """The batches of the synthetic dataset config.data.name for a task that trains on `kind` ("lm" or "classify")
  examples (`rows`: this process's row block and the number of blocks, `sharding.process_rows`; default by process);
  ConfigError names the field to change (a name, a split, data.seq_len, a model that cannot read the evaluation
  split's length)."""
  from seqjax.data.synthetic.pipeline import make_synthetic_data  # pylint: disable=import-outside-toplevel
  dc = config.data
  index, count = rows or (None, None)
  try:
    data = make_synthetic_data(name=dc.name, data_dir=dc.data_dir or None, seq_len=dc.seq_len,
                               batch_size=config.train.batch_size, seed=config.seed, train_split=dc.train_split,
                               eval_split=dc.eval_split, process_index=index, process_count=count)
  except ValueError as e:
    raise ConfigError(f"config.data ({dc.name!r}): {e}") from e
  if data.kind != kind:  # Also checked when the config is validated; here for configs built by hand.
    raise ConfigError(f"config.task: {dc.name!r} is a {data.kind!r} dataset; train it with "
                      f"--config.task={data.kind}")
  if data.eval_len > config.model.max_len and config.model.positions == "learned":
    raise ConfigError(f"config.model.max_len: the {dc.eval_split!r} examples of {dc.name!r} have {data.eval_len} "
                      f"tokens, more than the learned position table (model.max_len={config.model.max_len}); raise "
                      f"model.max_len to {data.eval_len} (positions past the training length stay untrained)")
  return data


def sample_text(model: DecoderLM, params: Any, tokenizer: ByteTokenizer, sc: config_lib.SampleConfig, *,
                seed: int) -> list[str]:
  """`sc.num_samples` continuations of `sc.prompt` (`seqjax.decode.generate` with every option of config.sample),
  each the prompt and its continuation up to its stop token. Logs the decoding rate in new tokens per second,
  measured on a second run of the compiled program. `sc.quantize` decodes with int8 weights
  (`seqjax.decode.quantize`) and logs the parameter memory ratio int8 / float."""
  if sc.quantize:
    float_bytes = parameter_bytes(params)
    params = quantize(params)
    log.info("int8 weights: parameters %d -> %d bytes (ratio %.3f)", float_bytes, parameter_bytes(params),
             parameter_bytes(params) / float_bytes)
  prompt = np.asarray(tokenizer.encode(sc.prompt, add_bos=True), np.int32)
  prompts = jnp.asarray(np.tile(prompt[None], (sc.num_samples, 1)))

  def run():
    return jax.block_until_ready(generate(
        model, params, prompts, max_new_tokens=sc.num_tokens, temperature=sc.temperature, top_k=sc.top_k,
        top_p=sc.top_p, min_p=sc.min_p, stop_tokens=sc.stop_token_ids(eos_id=tokenizer.eos_id),
        rng=jax.random.key(seed), num_beams=sc.num_beams, length_penalty=sc.length_penalty,
        pad_id=tokenizer.pad_id))

  began = time.perf_counter()
  run()  # Compiles.
  compiled = time.perf_counter()
  out = run()
  seconds = time.perf_counter() - compiled
  new_tokens = int(np.sum(np.asarray(out.lengths) - len(prompt)))
  log.info("generated %d new tokens in %.3f s: %.1f tokens/s (batch %d, num_beams %d; compiled in %.1f s)",
           new_tokens, seconds, new_tokens / seconds, sc.num_samples, sc.num_beams, compiled - began)
  tokens, lengths = jax.device_get((out.tokens, out.lengths))
  return [tokenizer.decode(row[:length]) for row, length in zip(tokens, lengths)]
