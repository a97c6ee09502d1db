"""A sequence classifier over any mixer stack: the decoder LM's embedding and blocks, a pooled read-out, a linear head.

    tokens[B, T] -> DecoderLM.features (embed, positions, num_layers x Block, final norm) -> h[B, T, D]
                 -> pool over the example's tokens -> Dense(num_classes) -> logits[B, num_classes] (float32)

Pooling (`config.classify.pooling`), over the tokens whose segment id is nonzero (padding excluded):
  "mean"   the average of h over the example's tokens (LRA's and S4's read-out for ListOps);
  "last"   h at the example's last token — the one state of a causal or recurrent stack that has seen everything;
  "first"  h at position 0 — in a causal stack it has seen only the first token, so it suits bidirectional mixers.

The backbone is `seqjax.models.lm.DecoderLM` itself (parameters under "backbone"), so every registered mixer, hybrid
pattern, positional scheme and the scan / remat options work unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.config import ModelConfig
from seqjax.models.lm import DecoderLM
from seqjax.nn import layers

POOLINGS = ("mean", "last", "first")


def pool(h_BTD: jax.Array, segment_ids_BT: jax.Array, how: str) -> jax.Array:
  """[B, T, D] hidden states -> [B, D] (float32) over the positions with a nonzero segment id (see the module
  docstring). A row without tokens pools to zeros."""
  real_BT = (segment_ids_BT > 0).astype(jnp.float32)
  h_BTD = h_BTD.astype(jnp.float32)
  if how == "mean":
    return jnp.einsum("btd,bt->bd", h_BTD, real_BT) / jnp.maximum(real_BT.sum(axis=1), 1.0)[:, None]
  if how == "last":
    last_B = jnp.maximum(real_BT.sum(axis=1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0] * (real_BT.sum(axis=1) > 0)[:, None]
  if how == "first":
    return h_BTD[:, 0]
  raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")


class SequenceClassifier(nn.Module):
  """`logits_BC = model.apply(v, tokens_BT, segment_ids=...)` (float32); segment_ids 1 on tokens, 0 on padding
  (None: every position is a token). See the module docstring."""

  cfg: ModelConfig
  num_classes: int
  pooling: str = "mean"

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    if segment_ids is None:
      segment_ids = jnp.ones(tokens_BT.shape, jnp.int32)
    h_BTD = DecoderLM(self.cfg, name="backbone").features(tokens_BT, segment_ids=segment_ids, positions=positions,
                                                          deterministic=deterministic)
    pooled_BD = pool(h_BTD, segment_ids, self.pooling)
    head = nn.Dense(self.num_classes, dtype=jnp.float32, name="head",
                    kernel_init=nn.with_logical_partitioning(layers.dense_init(), ("embed", None)))
    return head(pooled_BD)
