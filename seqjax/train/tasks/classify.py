"""The sequence-classification task (config.task="classify"): `seqjax.models.classifier.SequenceClassifier` — the
model.* mixer stack with a pooled read-out (config.classify.pooling) — on a classification dataset of
`seqjax.data.synthetic` (ListOps: `config.data.name = "listops/len100_500"`, ...).

Batches (`seqjax.data.synthetic.pipeline`): inputs, segment_ids, positions [B, T] (padding has segment id 0),
label [B], weights [B] (0 on the rows that pad the last evaluation batch). The loss is the cross-entropy of the
label; evaluation reports loss and accuracy (and `examples`); generation shows the predictions for the first
`sample.num_samples` validation examples. The data position is the grain iterator's state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax import config as config_lib
from seqjax.config import Config
from seqjax.data.synthetic import listops
from seqjax.models.classifier import SequenceClassifier
from seqjax.train import sharding
from seqjax.train.task import DataStream, Evaluation, EvalStep, Task
from seqjax.train.tasks.lm import _check_registered, open_synthetic, resume_iterator, sum_eval_batches


class ClassifyTask(Task):
  """Sequence classification (see the module docstring)."""

  name = "classify"

  def __init__(self, config: Config, mesh: jax.sharding.Mesh):
    _check_registered(config)
    self.data = open_synthetic(config, "classify", sharding.process_rows(mesh))  # the rows put_batch expects
    super().__init__(config_lib.with_vocab_size(config, self.data.vocab_size), mesh)
    self.model = SequenceClassifier(self.config.model, self.data.num_classes, self.config.classify.pooling)

  def describe(self) -> str:
    return f"{self.data.name}: {self.data.num_classes} classes, {self.config.classify.pooling} pooling"

  def init_params(self, rng: jax.Array) -> Any:
    return self.model.init({"params": rng}, jnp.zeros((1, self.config.data.seq_len), jnp.int32))["params"]

  def train_stream(self, step: int, position: Any | None) -> DataStream:
    del step  # The grain iterator's own state says where it is.
    return resume_iterator(self.data, position)

  def _losses(self, params, batch, rng, deterministic):
    rngs = None if deterministic else {"dropout": rng}
    logits_BC = self.model.apply({"params": params}, batch["inputs"], segment_ids=batch.get("segment_ids"),
                                 positions=batch["positions"], deterministic=deterministic, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["label"]), logits_BC

  def loss_sum(self, params, batch, rng, deterministic):
    losses_B, _ = self._losses(params, batch, rng, deterministic)
    w_B = batch["weights"].astype(jnp.float32)
    return jnp.sum(losses_B * w_B), jnp.sum(w_B)

  def eval_sums(self, params, batch):
    losses_B, logits_BC = self._losses(params, batch, None, True)
    w_B = batch["weights"].astype(jnp.float32)
    correct_B = (jnp.argmax(logits_BC, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(losses_B * w_B), "weight": jnp.sum(w_B), "correct": jnp.sum(correct_B * w_B)}

  def evaluate(self, params: Any, eval_step: EvalStep, max_batches: int | None) -> Evaluation:
    totals = sum_eval_batches(self.data.eval_batches(max_batches=max_batches), params, eval_step, self.mesh)
    weight = max(totals["weight"], 1.0)
    metrics = {"loss": totals["loss_sum"] / weight, "accuracy": totals["correct"] / weight,
               "examples": totals["weight"]}
    return Evaluation(metrics, f"validation loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f} "
                               f"({int(metrics['examples'])} examples)")

  def generate(self, params: Any) -> list[str]:
    """"EXPRESSION -> predicted P (label L)" for the first sample.num_samples validation examples."""
    batch = next(self.data.eval_batches(max_batches=1))
    device = sharding.put_batch({k: batch[k] for k in ("inputs", "segment_ids", "positions") if k in batch},
                                self.mesh)
    logits_BC = jax.jit(self.model.apply)({"params": params}, device["inputs"], segment_ids=device.get("segment_ids"),
                                          positions=device["positions"])
    predicted_B = np.asarray(jax.device_get(jnp.argmax(logits_BC, -1)))
    rows = range(min(self.config.sample.num_samples, int(batch["weights"].sum())))
    text = listops.to_text if self.data.name.startswith("listops") else (lambda t: " ".join(map(str, t)))
    return [f"{text(batch['inputs'][b])} -> predicted {predicted_B[b]} (label {batch['label'][b]})" for b in rows]

  @property
  def throughput(self) -> tuple[str, float]:
    return "tokens_per_sec", float(self.config.train.batch_size * self.config.data.seq_len)
