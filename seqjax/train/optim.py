"""The optax recipe: AdamW with linear warmup and cosine decay, global-norm clipping, decoupled weight decay
on matrices only (not on norms' scales or biases)."""

from __future__ import annotations

import jax
import optax

from seqjax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
