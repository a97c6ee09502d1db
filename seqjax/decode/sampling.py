"""Autoregressive sampling from a decoder LM: greedy, temperature and top-k, jitted as one `lax.fori_loop`.

This sampler recomputes the forward over a fixed [B, max_len] buffer at every step (no cache): simple, exact for
every mixer, and cheap at the context lengths it is used for (CLI samples). Cached decoding lives beside it.
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
  b, p = prompt_BP.shape
  buf_BT = jnp.zeros((b, max_len), jnp.int32).at[:, :p].set(prompt_BP)

  def body(i, carry):
    buf_BT, rng = carry
    logits_BV = model.apply({"params": params}, buf_BT)[:, i - 1]
    if temperature == 0:
      nxt_B = jnp.argmax(logits_BV, -1)
    else:
      rng, sub = jax.random.split(rng)
      nxt_B = jax.random.categorical(sub, filter_logits(logits_BV, temperature=temperature, top_k=top_k))
    return buf_BT.at[:, i].set(nxt_B.astype(jnp.int32)), rng

  buf_BT, _ = jax.lax.fori_loop(p, p + num_tokens, body, (buf_BT, rng))
  return buf_BT[:, :p + num_tokens]


_sample = jax.jit(_sample_impl, static_argnames=("model", "num_tokens", "max_len", "temperature", "top_k"))
