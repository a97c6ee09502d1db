"""Next-token samplers: greedy, temperature, top-k, top-p (nucleus) and min-p, composable, seeded and batched.

A `Sampler` turns a batch of next-token logits [B, V] into tokens [B]. Its filters compose in one fixed order,
each applied to what the previous one left (the order of Hugging Face `transformers`' logits warpers):

    logits / temperature  ->  top-k  ->  top-p  ->  min-p  ->  draw from the softmax of what survives

- temperature 0 is greedy: the argmax of the raw logits (the filters cannot change the argmax, so they are not
  applied). Otherwise logits are divided by the temperature (in float32).
- top_k (0: off) keeps the k largest logits; tokens tied with the k-th are kept too.
- top_p (1: off) keeps the smallest set of most probable tokens whose probability (renormalised over what top-k
  kept) sums to at least top_p: a token is kept when the mass of the tokens more probable than it is < top_p, and
  tokens tied with the last kept one are kept too. The most probable token always survives.
- min_p (0: off) keeps the tokens whose probability is at least min_p times the most probable token's
  (Nguyen et al. 2024). Renormalising does not change that ratio, so it is the same before or after top-k.
Removed tokens get a logit of -inf; the draw is `jax.random.categorical` from the filtered logits, one
independent draw per row.

`Sampler` is a frozen (hashable) dataclass, a static argument of the jitted decoder: a new setting compiles a new
program. `check` validates the settings against a vocabulary size and raises ValueError naming the argument.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Sampling settings (see the module docstring for the order and the exact sets the filters keep)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def check(self, vocab_size: int) -> None:
    """Raises ValueError for a setting outside its range (before anything is compiled)."""
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {self.top_k!r}")
    if self.top_k > vocab_size:
      raise ValueError(f"top_k={self.top_k} is larger than the vocabulary ({vocab_size} tokens); use at most "
                       f"{vocab_size}, or 0 to turn top-k off")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
    if not 0.0 <= self.min_p < 1.0:
      raise ValueError(f"min_p must be in [0, 1) (0 turns it off), got {self.min_p}")

  def filter(self, logits_BV: jax.Array) -> jax.Array:
    """float32 logits / temperature with the tokens the filters remove set to -inf (not for greedy)."""
    if self.greedy:
      raise ValueError("Sampler.filter: temperature 0 is greedy (argmax); there is no distribution to filter")
    logits_BV = logits_BV.astype(jnp.float32) / self.temperature
    if self.top_k:
      kth_B1 = jax.lax.top_k(logits_BV, self.top_k)[0][:, -1:]
      logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
    if self.top_p < 1.0:
      logits_BV = _top_p(logits_BV, self.top_p)
    if self.min_p > 0.0:
      probs_BV = jax.nn.softmax(logits_BV, axis=-1)
      floor_B1 = self.min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
      logits_BV = jnp.where(probs_BV >= floor_B1, logits_BV, -jnp.inf)
    return logits_BV

  def __call__(self, logits_BV: jax.Array, rng: jax.Array | None) -> jax.Array:
    """int32 tokens [B]: the argmax (greedy) or one draw per row from the filtered distribution."""
    if self.greedy:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, self.filter(logits_BV), axis=-1).astype(jnp.int32)


def _top_p(logits_BV: jax.Array, top_p: float) -> jax.Array:
  """Keeps the nucleus of mass top_p (ties with its least probable member included)."""
  probs_BV = jax.nn.softmax(logits_BV, axis=-1)
  sorted_BV = -jnp.sort(-probs_BV, axis=-1)  # descending
  # The mass of the tokens more probable than each (an exclusive cumulative sum).
  before_BV = jnp.concatenate([jnp.zeros_like(sorted_BV[:, :1]), jnp.cumsum(sorted_BV[:, :-1], axis=-1)], -1)
  keep_BV = before_BV < top_p
  keep_BV = keep_BV.at[:, 0].set(True)
  count_B1 = jnp.sum(keep_BV, axis=-1, keepdims=True)
  threshold_B1 = jnp.take_along_axis(sorted_BV, count_B1 - 1, axis=-1)
  return jnp.where(probs_BV >= threshold_B1, logits_BV, -jnp.inf)
