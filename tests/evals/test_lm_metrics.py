"""Reported LM numbers (loss, perplexity, bits per byte, accuracy) against float64 NumPy from the model's logits.

The eval path is the LM task's per-batch sums (`seqjax.train.tasks.lm.lm_eval_sums`, what the trainer jits as its
eval step), added over batches as the task's `evaluate` does, then `seqjax.evals.lm_metrics.summarize`. The oracle
takes the logits from `model.apply` and computes, over every evaluated token of every batch (weight 1):

    loss = total nats / tokens, perplexity = exp(loss), bits per byte = total nats / ln 2 / total target bytes,
    accuracy = (argmax logits == target) / tokens

with padding (weight 0) that must count nowhere, target byte counts of 0..3 (multi-byte tokens, EOS = 0 bytes) and
targets set to the model's own argmax on ~40% of positions so that accuracy is far from 0 and 1.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.evals.lm_metrics import summarize
from seqjax.models.lm import DecoderLM
from seqjax.train.tasks.lm import lm_eval_sums
from tests.random_params import random_lm_params
from tests.train.helpers import synthetic_batch, tiny_config


def _batch_with_padding_and_bytes(logits_fn, seed):
  batch = synthetic_batch(batch_size=4, seq_len=16, seed=seed)
  rng = np.random.default_rng(100 + seed)
  # Row 1 ends in 5 padding positions, row 3 in 2: segment 0, weight 0, no bytes.
  for row, pad in ((1, 5), (3, 2)):
    batch["segment_ids"][row, -pad:] = 0
    batch["positions"][row, -pad:] = 0
    batch["weights"][row, -pad:] = 0.0
  batch["target_bytes"] = rng.integers(0, 4, size=(4, 16)).astype(np.int32) * (batch["weights"] > 0)
  logits = np.asarray(logits_fn(batch), np.float64)
  hit = rng.random((4, 16)) < 0.4  # the model's own argmax as the target here (also on some padding)
  batch["targets"] = np.where(hit, logits.argmax(-1), batch["targets"]).astype(np.int32)
  return batch, logits


def test_reported_metrics_match_float64_numpy():
  """Catches (each planted once by monkeypatching lm_eval_sums / summarize in a scratch plugin; this test failed):
  bits per byte in nats (no / ln 2), bits per byte over tokens instead of bytes, bytes counted on padding,
  accuracy counted on padding, loss averaged over all positions (padding included), perplexity as 2 ** loss,
  perplexity of the summed instead of the mean loss."""
  config = tiny_config()
  model = DecoderLM(config.model)
  params = random_lm_params(model)  # the LM's tree, values drawn in NumPy (no init compile)
  eval_sums = jax.jit(lambda p, b: lm_eval_sums(model, p, b))
  apply = jax.jit(lambda p, x, s, t: model.apply({"params": p}, x, segment_ids=s, positions=t))
  logits_fn = lambda b: apply(params, *(jnp.asarray(b[k]) for k in ("inputs", "segment_ids", "positions")))  # noqa

  totals = {}
  nats = tokens = num_bytes = correct = 0.0
  for seed in (0, 1):
    batch, logits = _batch_with_padding_and_bytes(logits_fn, seed)
    for k, v in jax.device_get(eval_sums(params, {k: jnp.asarray(v) for k, v in batch.items()})).items():
      totals[k] = totals.get(k, 0.0) + float(v)
    # The oracle: float64 log-softmax of the logits, every sum restricted to weight-1 positions.
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    real = batch["weights"] > 0
    nats += nll[real].sum()
    tokens += real.sum()
    num_bytes += batch["target_bytes"][real].sum()
    correct += (logits.argmax(-1) == batch["targets"])[real].sum()

  metrics = summarize(totals)
  loss = nats / tokens
  assert tokens == 2 * (64 - 7) and 0.2 < correct / tokens < 0.8 and num_bytes != tokens  # the data can see bugs
  assert metrics["tokens"] == tokens
  assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
  assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
  assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)
  assert metrics["accuracy"] == pytest.approx(correct / tokens, rel=1e-6)


def test_summarize_by_hand():
  """Fixed sums worked out by hand: 10 tokens, 23.0 nats, 17 bytes, 4 correct.

  Catches (planted): the same bugs as above on summarize alone (/ ln 2 dropped, tokens for bytes, 2 ** loss)."""
  m = summarize({"loss_sum": 23.0, "weight": 10.0, "bytes": 17.0, "correct": 4.0})
  assert m["loss"] == pytest.approx(2.3)
  assert m["perplexity"] == pytest.approx(9.974182454814718)  # e^2.3
  assert m["bits_per_byte"] == pytest.approx(23.0 / 0.6931471805599453 / 17.0)  # 1.9518...
  assert m["bits_per_byte"] == pytest.approx(1.9518, abs=1e-4)
  assert m["accuracy"] == pytest.approx(0.4)
  with pytest.raises(ValueError, match="no evaluated tokens"):
    summarize({"loss_sum": 0.0, "weight": 0.0, "bytes": 0.0, "correct": 0.0})
