"""Language-model metrics from summed statistics: loss (nats/token), perplexity, bits per byte, accuracy."""

from __future__ import annotations

import math
from typing import Mapping


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
  """Turns sums over tokens (`loss_sum`, `weight`, `bytes`, `correct`) into per-token and per-byte metrics.

  Bits per byte divides the total loss in bits by the number of UTF-8 bytes the targets stand for, so it compares
  models with different tokenizers; for the byte tokenizer it differs from bits/token only by the end-of-document
  tokens.
  """
  weight = float(sums["weight"])
  if weight <= 0:
    raise ValueError("no evaluated tokens: the evaluation split produced no targets")
  loss = float(sums["loss_sum"]) / weight
  out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": float(sums["correct"]) / weight,
         "tokens": weight}
  if float(sums.get("bytes", 0.0)) > 0:
    out["bits_per_byte"] = float(sums["loss_sum"]) / math.log(2) / float(sums["bytes"])
  return out
