"""`generate`: cached, batched decoding of any `DecoderLM` — greedy, sampled (seqjax.decode.samplers) or beam search
(seqjax.decode.beam) — as one jitted program.

    result = generate(model, params, prompts_BP, prompt_lengths=lengths_B, max_new_tokens=64,
                      temperature=0.8, top_p=0.95, stop_tokens=(tokenizer.eos_id,), rng=jax.random.key(0))
    result.tokens   # [B, P + 64]: each row's prompt, its continuation, then pad (seqjax.decode.common)
    result.lengths  # [B]: prompt + new tokens of each row

The program: the parallel forward over the (right-padded) prompts (`DecoderLM.prefill`, which returns each row's
cache after its own last prompt token), then a `lax.while_loop` of cached `DecoderLM.step` calls, one token per
row, that ends when every row is done (it produced a stop token, or max_new_tokens tokens). A row that is done
keeps stepping with pad until the others finish; what it emits is dropped. Each new token costs one token's work
against the cache (no forward over the whole sequence), for every mixer: attention's KV cache (a ring of
`attention.window` slots for sliding-window attention), recurrent and SSM states, hybrids.

Rows are independent: a row of a ragged batch gives exactly what it gives alone (greedy; sampling draws from one
key per step shared by the batch, so a row's draws depend on its place in the batch). Sampling is seeded: the
same `rng` gives the same tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.decode import common
from seqjax.decode.common import GenerateResult
from seqjax.decode.samplers import Sampler


def generate(model: Any, params: Any, prompts: Any, *, prompt_lengths: Any = None, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             stop_tokens: Any = (), rng: jax.Array | None = None, num_beams: int = 1,
             length_penalty: float = 1.0, draft: Any = None, num_draft_tokens: int = 4,
             pad_id: int = 0) -> GenerateResult:
  """Continues each prompt by up to `max_new_tokens` tokens with a `DecoderLM`.

  Args:
    model: a `seqjax.models.lm.DecoderLM` (any mixer or hybrid pattern).
    params: its parameters (unboxed).
    prompts: int [B, P]; row b's prompt is `prompts[b, :prompt_lengths[b]]` (the rest is ignored).
    prompt_lengths: int [B] in [1, P], or None (every row is P tokens).
    max_new_tokens: the most tokens added to a row; prompt + max_new_tokens must fit in `model.cfg.max_len`.
    temperature, top_k, top_p, min_p: the sampler (`seqjax.decode.samplers.Sampler`: the order the filters apply
      in and the sets they keep). temperature 0 (the default) is greedy and ignores the filters.
    stop_tokens: ids that end a row (the stop token is kept, pad follows): a sequence for every row, or an int
      array [B, S] per row with -1 filling.
    rng: a JAX key; required when temperature > 0.
    num_beams: > 1 runs beam search (`seqjax.decode.beam`, greedy only); 1 is greedy / sampling.
    length_penalty: beam search's alpha: hypotheses are ranked by log p / ((5 + n) / 6) ** alpha, n = new tokens.
    draft: None, or a pair (draft_model, draft_params) — any `DecoderLM` on the same vocabulary — for
      speculative decoding (`seqjax.decode.speculative`): the output distribution (greedy: the tokens) is the
      target's; `GenerateResult.acceptance_rate` reports how many draft tokens the target accepted.
    num_draft_tokens: the tokens the draft proposes per round (speculative decoding only).
    pad_id: the id written after each row's last token.

  Returns:
    A `GenerateResult` (seqjax.decode.common): tokens [B, P + max_new_tokens], lengths [B], scores [B] and, for
    beam search, every beam's tokens, scores and lengths.

  Raises:
    ValueError, before anything is compiled, for an argument out of range (named in the message).
  """
  common.check_model(model)
  cfg = model.cfg
  sampler = Sampler(float(temperature), top_k, float(top_p), float(min_p))
  sampler.check(cfg.vocab_size)
  prompts_BP, lengths_B = common.check_prompts(prompts, prompt_lengths, max_new_tokens=max_new_tokens,
                                               max_len=cfg.max_len, vocab_size=cfg.vocab_size)
  stop_BS = common.stop_table(stop_tokens, prompts_BP.shape[0], cfg.vocab_size)
  if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
    raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
  if draft is not None:
    draft_model, draft_params = _check_draft(draft, cfg, num_draft_tokens, num_beams, prompts_BP, lengths_B,
                                             max_new_tokens)
  if not math.isfinite(length_penalty):
    raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")
  if num_beams > 1:
    if not sampler.greedy:
      raise ValueError(f"beam search (num_beams={num_beams}) is deterministic: use temperature=0 (got "
                       f"temperature={temperature}), or num_beams=1 to sample")
    from seqjax.decode import beam  # pylint: disable=import-outside-toplevel
    return beam.beam_search(model, params, prompts_BP, lengths_B, stop_BS, num_beams=num_beams,
                            max_new_tokens=int(max_new_tokens), length_penalty=float(length_penalty),
                            pad_id=int(pad_id))
  if not sampler.greedy and rng is None:
    raise ValueError(f"sampling (temperature={temperature} > 0) needs a seed: pass rng=jax.random.key(SEED), or "
                     f"temperature=0 for greedy decoding")
  rng = jax.random.key(0) if rng is None else rng
  if draft is not None:
    from seqjax.decode import speculative  # pylint: disable=import-outside-toplevel
    return speculative.speculative(model, params, draft_model, draft_params, prompts_BP, lengths_B, stop_BS, rng,
                                   sampler=sampler, num_draft_tokens=num_draft_tokens,
                                   max_new_tokens=int(max_new_tokens), pad_id=int(pad_id))
  return _sample(model, sampler, int(max_new_tokens), params, prompts_BP, lengths_B, stop_BS, rng,
                 jnp.int32(pad_id))


def _check_draft(draft: Any, cfg: Any, num_draft_tokens: Any, num_beams: int, prompts_BP: jax.Array,
                 lengths_B: jax.Array, max_new_tokens: int) -> tuple[Any, Any]:
  """(draft model, draft params) of speculative decoding, checked against the target; ValueError otherwise."""
  if not (isinstance(draft, (tuple, list)) and len(draft) == 2):
    raise ValueError(f"draft must be a pair (draft_model, draft_params) for speculative decoding, got "
                     f"{type(draft).__name__}")
  draft_model, draft_params = draft
  common.check_model(draft_model)
  if draft_model.cfg.vocab_size != cfg.vocab_size:
    raise ValueError(f"the draft model's vocabulary ({draft_model.cfg.vocab_size} tokens) differs from the "
                     f"target's ({cfg.vocab_size}); speculative decoding needs both on the same tokenizer")
  if (isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, (int, np.integer))
      or num_draft_tokens < 1):
    raise ValueError(f"num_draft_tokens must be an int >= 1 (the tokens the draft proposes per round), got "
                     f"{num_draft_tokens!r}")
  if num_beams > 1:
    raise ValueError(f"speculative decoding (draft=) samples or decodes greedily; it does not combine with beam "
                     f"search (num_beams={num_beams}): pass num_beams=1 or draft=None")
  common.check_prompts(prompts_BP, lengths_B, max_new_tokens=max_new_tokens, max_len=draft_model.cfg.max_len,
                       vocab_size=cfg.vocab_size)
  return draft_model, draft_params


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sample(model, sampler: Sampler, max_new_tokens: int, params, prompts_BP, lengths_B, stop_BS, rng, pad_id):
  """Prefill, then one token per row per loop iteration until every row is done."""
  tokens_BL = common.output_buffer(prompts_BP, lengths_B, max_new_tokens, pad_id)
  logits_BV, cache = common.prefill(model, params, prompts_BP, lengths_B)
  step = lambda tokens, state: common.step(model, params, tokens, state)  # noqa: E731
  return sample_loop(step, sampler, logits_BV, cache, tokens_BL, lengths_B, stop_BS, rng, pad_id,
                     max_new_tokens=max_new_tokens)


def sample_loop(step: Callable[[jax.Array, Any], tuple[jax.Array, Any]], sampler: Sampler, logits_BV: jax.Array,
                state: Any, tokens_BL: jax.Array, lengths_B: jax.Array, stop_BS: jax.Array, rng: jax.Array,
                pad_id: jax.Array, *, max_new_tokens: int) -> GenerateResult:
  """The decoding loop over any decoder state (traced inside the caller's jit): `step(tokens [B], state) ->
  (logits [B, V], state)`, the logits and state after each row's prompt, and the output buffer
  (`common.output_buffer`) whose row b receives its new tokens from position lengths[b]."""
  batch = tokens_BL.shape[0]

  def emit(t, logits_BV, tokens_BL, done_B, scores_B, count_B):
    """Picks token t of every row from its logits and records it for the rows not yet done."""
    token_B = jnp.where(done_B, pad_id, sampler(logits_BV, jax.random.fold_in(rng, t)))
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], axis=-1)[:, 0]
    tokens_BL = common.write_at(tokens_BL, lengths_B + t, token_B)
    scores_B = scores_B + jnp.where(done_B, 0.0, logp_B)
    count_B = count_B + (~done_B).astype(jnp.int32)
    done_B = done_B | common.is_stop(token_B, stop_BS) | (t + 1 >= max_new_tokens)
    return token_B, tokens_BL, done_B, scores_B, count_B

  zeros_B = jnp.zeros((batch,), jnp.int32)
  first = emit(0, logits_BV, tokens_BL, zeros_B.astype(bool), zeros_B.astype(jnp.float32), zeros_B)

  def cond(carry):
    return ~jnp.all(carry[3])

  def body(carry):
    t, token_B, tokens_BL, done_B, scores_B, count_B, state = carry
    logits_BV, state = step(token_B, state)
    return (t + 1, *emit(t, logits_BV, tokens_BL, done_B, scores_B, count_B), state)

  _, _, tokens_BL, _, scores_B, count_B, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), *first, state))
  return GenerateResult(tokens=tokens_BL, lengths=lengths_B + count_B, scores=scores_B)
