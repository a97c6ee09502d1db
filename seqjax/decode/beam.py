"""Beam search for any `DecoderLM` (every mixer family and hybrids), batched and jitted as one program.

Called through `seqjax.decode.generate(..., num_beams=K)`, and for the encoder-decoders through
`seqjax.decode.seq2seq.decode(..., num_beams=K)`: both run `search` below over their own step and state. Each prompt is prefilled once; its cache is copied to K
beams (rows b * K ... b * K + K - 1 of a B * K batch). Every iteration:

1. scores every one-token extension of each alive beam: log p(beam) + log_softmax(logits) [B, K, V];
2. keeps the best (1 + S) * K of them (S = stop tokens per row): at most S * K of those end in a stop token, so at
   least K do not;
3. extensions ending in a stop token — and, at the last step (max_new_tokens tokens), every extension — become
   finished candidates with the score log p / lp(n); they are merged with the K finished hypotheses so far,
   keeping the K best (finished-hypothesis bookkeeping);
4. the K best extensions that do not stop become the alive beams; the cache is reordered to them (every leaf
   gathered along its batch axis: KV rows, (h, c), SSM states, conv windows; `common.select_rows`), and each
   takes one cached `step` with its new token.

Length penalty (Wu et al. 2016, GNMT): lp(n) = ((5 + n) / 6) ** alpha, n the number of new tokens including the
stop token, alpha = `length_penalty` (0: raw log-probability; larger favours longer hypotheses).

Early stopping is exact: a row is done once its K-th best finished score is at least what its best alive beam could
still reach, log p(best alive) / max(lp(n + 1), lp(max_new_tokens)) (log p only falls as a beam grows, so no
extension can do better); the loop ends when every row is done, or after max_new_tokens tokens. The result is
therefore the one running all max_new_tokens steps would give.

Beams start as K copies of the prompt with only the first alive (the others at log p = -inf), so no hypothesis
appears twice. The result's `tokens` / `scores` / `lengths` are each row's best hypothesis; `beam_*` hold all K,
best first (score -inf where fewer than K hypotheses exist, e.g. a tiny vocabulary).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from seqjax.decode import common
from seqjax.decode.common import GenerateResult


def length_penalty_factor(num_tokens: jax.Array, alpha: float) -> jax.Array:
  """lp(n) = ((5 + n) / 6) ** alpha (GNMT); a hypothesis of n new tokens scores log p / lp(n)."""
  return ((5.0 + jnp.asarray(num_tokens, jnp.float32)) / 6.0) ** alpha


def beam_search(model: Any, params: Any, prompts_BP: jax.Array, lengths_B: jax.Array, stop_BS: jax.Array, *,
                num_beams: int, max_new_tokens: int, length_penalty: float, pad_id: int) -> GenerateResult:
  """Beam search over checked inputs (`seqjax.decode.generate` checks them; see the module docstring)."""
  return _beam_search(model, num_beams, max_new_tokens, float(length_penalty), params, prompts_BP, lengths_B,
                      stop_BS, jnp.int32(pad_id))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _beam_search(model, num_beams: int, max_new_tokens: int, alpha: float, params, prompts_BP, lengths_B, stop_BS,
                 pad_id):
  batch, k = prompts_BP.shape[0], num_beams
  prompt_BL = common.output_buffer(prompts_BP, lengths_B, max_new_tokens, pad_id)
  logits_BV, cache = common.prefill(model, params, prompts_BP, lengths_B)
  cache = common.select_rows(model, cache, jnp.repeat(jnp.arange(batch), k))
  step = lambda tokens, state: common.step(model, params, tokens, state)  # noqa: E731
  reorder = lambda state, rows: common.select_rows(model, state, rows)  # noqa: E731
  return search(step, reorder, logits_BV, cache, prompt_BL, lengths_B, stop_BS, num_beams=k,
                max_new_tokens=max_new_tokens, alpha=alpha, pad_id=pad_id)


def search(step: Callable[[jax.Array, Any], tuple[jax.Array, Any]], reorder: Callable[[Any, jax.Array], Any],
           logits_BV: jax.Array, state: Any, prompt_BL: jax.Array, lengths_B: jax.Array, stop_BS: jax.Array, *,
           num_beams: int, max_new_tokens: int, alpha: float, pad_id: jax.Array) -> GenerateResult:
  """The beam search loop (module docstring) over any decoder state; traced inside the caller's jit.

  Args:
    step: (tokens [B * K], state) -> (float32 logits [B * K, V] of the next token, the new state).
    reorder: (state, rows int [B * K]) -> the state of those rows, in that order (rows of one batch row only).
    logits_BV: each row's next-token logits after its prompt [B, V].
    state: the state after each row's prompt, already K copies per row (rows b * K ... b * K + K - 1).
    prompt_BL: the output buffer [B, P + max_new_tokens] (`common.output_buffer`); row b's new tokens are written
      from position lengths[b].
    lengths_B, stop_BS: the prompt lengths and each row's stop tokens (`common.stop_table`).
    num_beams, max_new_tokens, alpha (the length penalty), pad_id: as `seqjax.decode.generate`'s.
  """
  batch, k = prompt_BL.shape[0], num_beams
  vocab = logits_BV.shape[-1]
  num_candidates = min((1 + stop_BS.shape[1]) * k, k * vocab)
  lp_last = length_penalty_factor(max_new_tokens, alpha)
  logits_BKV = jnp.repeat(logits_BV[:, None], k, axis=1)
  alive_BKL = jnp.repeat(prompt_BL[:, None], k, axis=1)
  alive_logp_BK = jnp.where(jnp.arange(k)[None] == 0, 0.0, -jnp.inf) * jnp.ones((batch, 1))
  finished = (jnp.full_like(alive_BKL, pad_id), jnp.full((batch, k), -jnp.inf), jnp.zeros((batch, k), jnp.int32))

  def expand(t, logits_BKV, alive_BKL, alive_logp_BK, finished):
    """Token t (0-based) of every beam: (alive tokens [B, K], parents [B, K], alive, log p, finished, done [B])."""
    cand_BKV = alive_logp_BK[..., None] + jax.nn.log_softmax(logits_BKV.astype(jnp.float32), axis=-1)
    logp_BC, index_BC = jax.lax.top_k(cand_BKV.reshape(batch, k * vocab), num_candidates)
    parent_BC, token_BC = index_BC // vocab, index_BC % vocab
    seq_BCL = jnp.take_along_axis(alive_BKL, parent_BC[..., None], axis=1)
    seq_BCL = common.write_at(seq_BCL, lengths_B + t, token_BC)
    stop_BC = common.is_stop(token_BC, stop_BS)
    n = t + 1
    # Finished-hypothesis bookkeeping: merge the new finished candidates, keep the K best.
    ends_BC = stop_BC | (n >= max_new_tokens)
    cand_score_BC = jnp.where(ends_BC, logp_BC / length_penalty_factor(n, alpha), -jnp.inf)
    fin_BKL, fin_score_BK, fin_len_BK = finished
    score_BM = jnp.concatenate([fin_score_BK, cand_score_BC], axis=1)
    seq_BML = jnp.concatenate([fin_BKL, seq_BCL], axis=1)
    len_BM = jnp.concatenate([fin_len_BK, jnp.full(cand_score_BC.shape, n, jnp.int32)], axis=1)
    fin_score_BK, keep_BK = jax.lax.top_k(score_BM, k)
    finished = (jnp.take_along_axis(seq_BML, keep_BK[..., None], axis=1), fin_score_BK,
                jnp.take_along_axis(len_BM, keep_BK, axis=1))
    # The alive beams: the K best extensions that do not stop.
    alive_logp_BK, pick_BK = jax.lax.top_k(jnp.where(stop_BC, -jnp.inf, logp_BC), k)
    alive_BKL = jnp.take_along_axis(seq_BCL, pick_BK[..., None], axis=1)
    token_BK = jnp.take_along_axis(token_BC, pick_BK, axis=1)
    parent_BK = jnp.take_along_axis(parent_BC, pick_BK, axis=1)
    # Exact early stopping: no alive beam can still beat the K-th finished hypothesis.
    reach_B = alive_logp_BK[:, 0] / jnp.maximum(length_penalty_factor(n + 1, alpha), lp_last)
    done_B = (fin_score_BK[:, k - 1] >= reach_B) | (n >= max_new_tokens)
    return token_BK, parent_BK, alive_BKL, alive_logp_BK, finished, done_B

  def advance(cache, token_BK, parent_BK):
    rows = (jnp.arange(batch)[:, None] * k + parent_BK).reshape(-1)
    logits, cache = step(token_BK.reshape(-1), reorder(cache, rows))
    return logits.reshape(batch, k, vocab), cache

  first = expand(0, logits_BKV, alive_BKL, alive_logp_BK, finished)

  def cond(carry):
    return ~jnp.all(carry[6])

  def body(carry):
    t, cache, token_BK, parent_BK, alive_BKL, alive_logp_BK, _, finished = carry
    logits_BKV, cache = advance(cache, token_BK, parent_BK)
    token_BK, parent_BK, alive_BKL, alive_logp_BK, finished, done_B = expand(
        t, logits_BKV, alive_BKL, alive_logp_BK, finished)
    return t + 1, cache, token_BK, parent_BK, alive_BKL, alive_logp_BK, done_B, finished

  token_BK, parent_BK, alive_BKL, alive_logp_BK, finished, done_B = first
  carry = (jnp.int32(1), state, token_BK, parent_BK, alive_BKL, alive_logp_BK, done_B, finished)
  fin_BKL, fin_score_BK, fin_len_BK = jax.lax.while_loop(cond, body, carry)[-1]
  beam_lengths_BK = lengths_B[:, None] + fin_len_BK
  return GenerateResult(tokens=fin_BKL[:, 0], lengths=beam_lengths_BK[:, 0], scores=fin_score_BK[:, 0],
                        beam_tokens=fin_BKL, beam_scores=fin_score_BK, beam_lengths=beam_lengths_BK)
