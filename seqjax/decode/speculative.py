"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) for any pair of `DecoderLM`s, as one jitted program.

Called through `seqjax.decode.generate(model, params, prompts, draft=(draft_model, draft_params),
num_draft_tokens=k, ...)`. The output has exactly the distribution plain sampling from the target gives (with the
same temperature / top-k / top-p / min-p), and greedy speculative decoding gives the target's greedy tokens.

The program: both models prefill the prompts; the target picks the first new token. Then a `lax.while_loop` of
rounds; in a round, for every row, with x0 its last token (one that neither model has consumed yet):

1. **draft**: k cached steps of the draft from x0 propose d_1..d_k, each drawn from q_i, the draft's filtered
   next-token distribution;
2. **verify**: the target scores x0, d_1..d_k in one `DecoderLM.extend` pass over its cache (attention layers
   attend the k + 1 tokens over the KV cache in parallel; recurrent / SSM layers step; `seqjax.nn.extend`),
   giving its filtered distributions p_1..p_{k+1};
3. **accept** (`acceptance_probability`, `residual_distribution`): d_i is accepted with probability
   min(1, p_i(d_i) / q_i(d_i)), in order, until the first rejection; a = the number accepted. The row then emits
   d_1..d_a and one more token: drawn from norm(max(0, p_{a+1} - q_{a+1})) after a rejection, or from p_{k+1}
   (the bonus token) when all k were accepted. Every round emits 1 to k + 1 tokens per row; rows accept different
   numbers;
4. **restore**: both caches become the caches after x0, d_1..d_a (`DecoderLM.commit`: the accepted prefix of the
   target's pending extension is written, and every recurrent / SSM state is the one after d_a, never after a
   rejected token). The draft re-reads x0, d_1..d_k with one `extend` from its cache before the round and
   commits the same prefix, so no per-step copy of its cache is kept.

Filters apply to p and q alike (both are the sampler's distributions: `probabilities`); greedy (temperature 0) is
the same rule with one-hot p and q — d_i is accepted exactly when it is the target's argmax, and the extra token
is the target's argmax. Stop tokens and `max_new_tokens` cut a round's tokens short; a done row keeps running
with its output dropped until every row is done. The result counts, per row, the draft tokens proposed and
accepted in the rounds it was live (`GenerateResult.acceptance_rate`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from seqjax.decode import common
from seqjax.decode.common import GenerateResult
from seqjax.decode.samplers import Sampler


def probabilities(sampler: Sampler, logits_V: jax.Array) -> jax.Array:
  """float32 [..., V]: the distribution the sampler draws from (one-hot at the argmax when greedy)."""
  if sampler.greedy:
    return jax.nn.one_hot(jnp.argmax(logits_V, axis=-1), logits_V.shape[-1], dtype=jnp.float32)
  filtered = sampler.filter(logits_V.reshape(-1, logits_V.shape[-1]))
  return jax.nn.softmax(filtered, axis=-1).reshape(logits_V.shape)


def acceptance_probability(p_V: jax.Array, q_V: jax.Array, token: jax.Array) -> jax.Array:
  """min(1, p(token) / q(token)) for distributions p, q [..., V] and tokens [...] (token drawn from q)."""
  p = jnp.take_along_axis(p_V, token[..., None], axis=-1)[..., 0]
  q = jnp.take_along_axis(q_V, token[..., None], axis=-1)[..., 0]
  return jnp.minimum(1.0, p / jnp.maximum(q, jnp.finfo(jnp.float32).tiny))


def residual_distribution(p_V: jax.Array, q_V: jax.Array) -> jax.Array:
  """norm(max(0, p - q)) [..., V]: what a rejected position is drawn from. Where p = q (a rejection then has
  probability 0) it is p."""
  excess_V = jnp.maximum(p_V - q_V, 0.0)
  total = jnp.sum(excess_V, axis=-1, keepdims=True)
  return jnp.where(total > 0, excess_V / jnp.where(total > 0, total, 1.0), p_V)


def _draw(key: jax.Array, probs_BV: jax.Array) -> jax.Array:
  return jax.random.categorical(key, jnp.log(probs_BV), axis=-1).astype(jnp.int32)


def speculative(model: Any, params: Any, draft_model: Any, draft_params: Any, prompts_BP: jax.Array,
                lengths_B: jax.Array, stop_BS: jax.Array, rng: jax.Array, *, sampler: Sampler,
                num_draft_tokens: int, max_new_tokens: int, pad_id: int) -> GenerateResult:
  """Speculative decoding over checked inputs (`seqjax.decode.generate` checks them; see the module docstring)."""
  return _speculative(model, draft_model, sampler, int(max_new_tokens), int(num_draft_tokens), params,
                      draft_params, prompts_BP, lengths_B, stop_BS, rng, jnp.int32(pad_id))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _speculative(model, draft_model, sampler: Sampler, max_new_tokens: int, k: int, params, draft_params,
                 prompts_BP, lengths_B, stop_BS, rng, pad_id):
  batch = prompts_BP.shape[0]
  tokens_BL = common.output_buffer(prompts_BP, lengths_B, max_new_tokens, pad_id)
  logits_BV, cache = common.prefill(model, params, prompts_BP, lengths_B)
  _, draft_cache = common.prefill(draft_model, draft_params, prompts_BP, lengths_B)

  first_B = _draw(jax.random.fold_in(rng, 0), probabilities(sampler, logits_BV))
  tokens_BL = common.write_at(tokens_BL, lengths_B, first_B)
  scores_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), first_B[:, None], axis=-1)[:, 0]
  count_B = jnp.ones((batch,), jnp.int32)
  done_B = common.is_stop(first_B, stop_BS) | (max_new_tokens <= 1)
  zeros_B = jnp.zeros((batch,), jnp.int32)

  def draft_step(carry, key_i):
    """One cached draft step: d ~ q from the draft's next-token distribution q [B, V]."""
    token_B, c = carry
    logits_BV, c = common.step(draft_model, draft_params, token_B, c)
    q_BV = probabilities(sampler, logits_BV)
    d_B = _draw(key_i, q_BV)
    return (d_B, c), (d_B, q_BV)

  def body(carry):
    r, last_B, cache, draft_cache, tokens_BL, done_B, scores_B, count_B, proposed_B, accepted_B = carry
    key_draft, key_accept, key_final = jax.random.split(jax.random.fold_in(rng, r), 3)
    _, (d_KB, q_KBV) = jax.lax.scan(draft_step, (last_B, draft_cache), jax.random.split(key_draft, k))
    d_BK, q_BKV = d_KB.T, jnp.moveaxis(q_KBV, 0, 1)
    x_BT = jnp.concatenate([last_B[:, None], d_BK], axis=1)  # x0, d_1 .. d_k
    logits_BTV, pending = common.extend(model, params, x_BT, cache)
    p_BTV = probabilities(sampler, logits_BTV)

    accept_BK = jax.random.uniform(key_accept, (batch, k)) < acceptance_probability(p_BTV[:, :k], q_BKV, d_BK)
    a_B = jnp.sum(jnp.cumprod(accept_BK.astype(jnp.int32), axis=1), axis=1)
    p_a_BV = jnp.take_along_axis(p_BTV, a_B[:, None, None], axis=1)[:, 0]
    q_a_BV = jnp.take_along_axis(q_BKV, jnp.minimum(a_B, k - 1)[:, None, None], axis=1)[:, 0]
    final_BV = jnp.where((a_B == k)[:, None], p_a_BV, residual_distribution(p_a_BV, q_a_BV))
    next_B = _draw(key_final, final_BV)

    # The round's tokens: d_1 .. d_a, then next; cut at a stop token and at max_new_tokens.
    t_1T = jnp.arange(k + 1)[None]
    emitted_BT = jnp.where(t_1T < a_B[:, None], jnp.pad(d_BK, ((0, 0), (0, 1))), next_B[:, None])
    stops_BT = common.is_stop(emitted_BT, stop_BS) & (t_1T <= a_B[:, None])
    first_stop_B = jnp.where(jnp.any(stops_BT, axis=1), jnp.argmax(stops_BT, axis=1) + 1, k + 1)
    n_B = jnp.minimum(jnp.minimum(a_B + 1, first_stop_B), max_new_tokens - count_B)
    n_B = jnp.where(done_B, 0, n_B)
    logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), emitted_BT[..., None], axis=-1)[..., 0]
    for t in range(k + 1):
      tokens_BL = jnp.where((t < n_B)[:, None], common.write_at(tokens_BL, lengths_B + count_B + t,
                                                                 emitted_BT[:, t]), tokens_BL)
    scores_B = scores_B + jnp.sum(jnp.where(t_1T < n_B[:, None], logp_BT, 0.0), axis=1)
    proposed_B = proposed_B + jnp.where(done_B, 0, k)
    accepted_B = accepted_B + jnp.where(done_B, 0, a_B)
    count_B = count_B + n_B
    stopped_B = jnp.any(stops_BT & (t_1T < n_B[:, None]), axis=1)
    done_B = done_B | stopped_B | (count_B >= max_new_tokens)

    # Restore: both caches after x0, d_1 .. d_a.
    cache = model.commit(cache, pending, a_B + 1)
    _, draft_pending = common.extend(draft_model, draft_params, x_BT, draft_cache)
    draft_cache = draft_model.commit(draft_cache, draft_pending, a_B + 1)
    return (r + 1, next_B, cache, draft_cache, tokens_BL, done_B, scores_B, count_B, proposed_B, accepted_B)

  carry = (jnp.int32(1), first_B, cache, draft_cache, tokens_BL, done_B, scores_B, count_B, zeros_B, zeros_B)
  out = jax.lax.while_loop(lambda c: ~jnp.all(c[5]), body, carry)
  _, _, _, _, tokens_BL, _, scores_B, count_B, proposed_B, accepted_B = out
  return GenerateResult(tokens=tokens_BL, lengths=lengths_B + count_B, scores=scores_B,
                        draft_proposed=proposed_B, draft_accepted=accepted_B)
