"""The harness's training smoke run (`python -m seqjax.conformance NAME --train`): can the mixer learn to recall?

The mixer is stacked in the LM (`seqjax.models.lm.DecoderLM`: 2 blocks of width 64 with their MLPs) and trained for
a fixed wall-clock budget (2 minutes by default) on multi-query associative recall (`seqjax.data.synthetic.mqar`,
Zoology's task) at a size that learns in that time on a CPU: 64 tokens, 4 key-value pairs, a vocabulary of 128 (keys
in [1, 64), values in [64, 128)). Every step draws a fresh batch (no example is seen twice); the loss is the LM's
weighted cross-entropy (`seqjax.train.tasks.lm.lm_loss_sum`) on the 4 answer positions only, with the project's
optimizer recipe (`seqjax.train.optim`, constant rate after a warmup). The figure reported is the answer accuracy on
1,024 held-out examples, against chance: a model that only learned to copy one of the example's 4 values scores 1/4,
one that recalls scores near 1.

It is a smoke run, not a benchmark: it tells a mixer that can retrieve a token by content from one that cannot (or
that does not train at all), in the time a researcher waits. docs/conformance.md has the figures of a few mixers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax.config import AttentionConfig, ModelConfig, OptimConfig, SparseAttentionConfig, override
from seqjax.data.synthetic import mqar
from seqjax.models.lm import DecoderLM
from seqjax.train.optim import make_optimizer
from seqjax.train.tasks.lm import lm_eval_sums, lm_loss_sum

# The task: small enough to be learnt in minutes by a width-64 model on a CPU, hard enough that copying fails.
SETTING = mqar.MqarSetting(seq_len=64, num_pairs=4, vocab_size=128)


@dataclasses.dataclass(frozen=True)
class RecallResult:
  mixer: str
  accuracy: float  # answers right on the held-out examples
  chance: float  # 1 / num_pairs: copying one of the example's values
  steps: int
  seconds: float
  final_loss: float

  def cell(self) -> str:
    """The table cell: accuracy against chance, and the steps taken."""
    return f"{self.accuracy:.2f} (chance {self.chance:.2f}, {self.steps} steps)"


def model_config(name: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """The LM trained: 2 blocks of `name`, width 64, 2 heads, rotary positions, sparse windows of 16."""
  cfg = ModelConfig(mixer=name, d_model=64, num_layers=2, mlp_dim=128, vocab_size=SETTING.vocab_size,
                    max_len=SETTING.seq_len, positions="rope", attention=AttentionConfig(num_heads=2),
                    sparse=SparseAttentionConfig(window=16, block_size=8, chunk=16, projected_len=32))
  return override(cfg, overrides) if overrides else cfg


def batch_of(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """The LM task's batch format (seqjax.data.synthetic.pipeline) of equally long examples."""
  inputs = np.stack([e["inputs"] for e in examples]).astype(np.int32)
  b, t = inputs.shape
  return {"inputs": inputs, "targets": np.stack([e["targets"] for e in examples]).astype(np.int32),
          "weights": np.stack([e["loss_mask"] for e in examples]).astype(np.float32),
          "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
          "target_bytes": np.zeros((b, t), np.int32)}


def train_recall(name: str, *, seconds: float = 120.0, batch_size: int = 32, learning_rate: float = 3e-3,
                 overrides: Mapping[str, Any] | None = None, seed: int = 0, max_steps: int = 100_000,
                 eval_examples: int = 1024) -> RecallResult:
  """Trains the LM with mixer `name` on MQAR for `seconds` of wall clock (after compiling; at most `max_steps`)
  and returns the held-out answer accuracy. Raises ValueError for a non-positive budget before building anything."""
  if seconds <= 0 or batch_size <= 0 or max_steps <= 0:
    raise ValueError(f"train_recall needs a positive seconds, batch_size and max_steps, got {seconds}, "
                     f"{batch_size}, {max_steps}")
  model = DecoderLM(model_config(name, overrides))
  train_rng, eval_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
  held_out = batch_of(mqar.generate(SETTING, "test", eval_rng, eval_examples))
  example = jax.ShapeDtypeStruct((1, SETTING.seq_len), jnp.int32)
  params = jax.jit(lambda key: nn.unbox(model.lazy_init(key, example)["params"]))(jax.random.key(seed))
  optimizer = make_optimizer(OptimConfig(learning_rate=learning_rate, warmup_steps=50, end_lr_fraction=1.0,
                                         weight_decay=0.0), max_steps)
  loss_sum = lm_loss_sum(model)

  @jax.jit
  def train_step(params, opt_state, batch):
    def loss(params):
      total, weight = loss_sum(params, batch, None, True)[:2]
      return total / weight
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  eval_sums = jax.jit(lambda params, batch: lm_eval_sums(model, params, batch))
  opt_state = optimizer.init(params)
  next_batch = lambda: batch_of(mqar.generate(SETTING, "train", train_rng, batch_size))  # noqa: E731
  params, opt_state, loss = train_step(params, opt_state, next_batch())  # compiles
  steps, start = 1, time.perf_counter()
  while steps < max_steps and time.perf_counter() - start < seconds:
    params, opt_state, loss = train_step(params, opt_state, next_batch())
    steps += 1
  final_loss = float(loss)
  elapsed = time.perf_counter() - start
  correct = weight = 0.0
  for i in range(0, eval_examples, 256):
    sums = eval_sums(params, {k: v[i:i + 256] for k, v in held_out.items()})
    correct, weight = correct + float(sums["correct"]), weight + float(sums["weight"])
  return RecallResult(name, correct / weight, 1.0 / SETTING.num_pairs, steps, elapsed, final_loss)
