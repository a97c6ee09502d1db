"""Autoregressive sampling from a decoder LM: greedy, temperature and top-k, jitted as one program.

The prompt is prefilled once (`DecoderLM.prefill`, the parallel forward that also returns every layer's state),
then each new token is one cached `DecoderLM.step` inside a `lax.fori_loop`: the cost per token is one token's
work against the cache, not a forward over the whole buffer. Any mixer works (seqjax.nn.contract).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def filter_logits(logits_BV: jax.Array, *, temperature: float, top_k: int) -> jax.Array:
  """Scales by 1/temperature and keeps only the top_k largest logits (top_k=0 keeps all)."""
  logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  return logits_BV


def sample_tokens(model: nn.Module, params: Any, prompt_BP: jax.Array, *, num_tokens: int, max_len: int,
                  rng: jax.Array, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """Continues each prompt by `num_tokens` tokens. Returns [B, P + num_tokens].

  temperature=0 is greedy decoding. Raises ValueError if prompt plus continuation exceed `max_len`.
  """
  b, p = prompt_BP.shape
  if p == 0:
    raise ValueError("the prompt is empty; give at least one token (e.g. the BOS token)")
  if p + num_tokens > max_len:
    raise ValueError(f"prompt of {p} tokens plus {num_tokens} new tokens exceeds the model's context of "
                     f"{max_len}; shorten the prompt or ask for fewer tokens")
  return _sample(model, params, prompt_BP, rng, num_tokens=num_tokens, max_len=max_len,
                 temperature=float(temperature), top_k=int(top_k))


def _sample_impl(model, params, prompt_BP, rng, *, num_tokens, max_len, temperature, top_k):
  del max_len  # checked by sample_tokens; the cache holds the model's context
  variables = {"params": params}

  def pick(logits_BV, rng):
    if temperature == 0:
      return jnp.argmax(logits_BV, -1).astype(jnp.int32), rng
    rng, sub = jax.random.split(rng)
    logits_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k)
    return jax.random.categorical(sub, logits_BV).astype(jnp.int32), rng

  logits_BPV, cache = model.apply(variables, prompt_BP, method="prefill")
  first_B, rng = pick(logits_BPV[:, -1], rng)
  new_BN = jnp.zeros((prompt_BP.shape[0], num_tokens), jnp.int32).at[:, 0].set(first_B)

  def body(i, carry):
    new_BN, cache, rng = carry
    logits_BV, cache = model.apply(variables, new_BN[:, i - 1], cache, method="step")
    nxt_B, rng = pick(logits_BV, rng)
    return new_BN.at[:, i].set(nxt_B), cache, rng

  new_BN, _, _ = jax.lax.fori_loop(1, num_tokens, body, (new_BN, cache, rng))
  return jnp.concatenate([prompt_BP.astype(jnp.int32), new_BN], axis=1)


_sample = jax.jit(_sample_impl, static_argnames=("model", "num_tokens", "max_len", "temperature", "top_k"))
