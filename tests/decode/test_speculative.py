"""Speculative decoding (`generate(..., draft=(draft_model, draft_params), num_draft_tokens=k)`).

- Greedy speculative decoding = greedy decoding of the target, token for token, for target / draft pairs of
  different families (an SSM draft for attention, attention for a Mamba target, an LSTM draft for a sliding-window
  target whose window is shorter than an extension, hybrids, a scanned stack), ragged prompts and stop tokens.
  Bugs caught: a cache not restored to the accepted prefix (the next round starts from a state that has seen a
  rejected token), a wrong accepted count, an extension reading the wrong positions.
- The draft's cache after a rejection: a target / draft pair whose greedy tokens depend on the position alone
  (zero token embeddings) and disagree at every third position; the per-row proposed / accepted counts must equal
  a replay in which the draft reads only the accepted text. Bug caught: the draft's cache committed with every
  proposed token (the output stays the target's; only the proposals, hence the counts, change).
- The exact output distribution on a 4-token vocabulary: every draft proposal and acceptance event of the
  algorithm is enumerated in float64 NumPy over the models' own next-token distributions, with the rule evaluated
  in closed form by the implementation's `acceptance_probability` / `residual_distribution`; the probability of
  every output sequence must equal the target's (total variation <= 1e-6). Bugs caught: accepting with p / q
  without the min, a residual not renormalised, a bonus token drawn from the draft.
- A sampled check that the implementation draws from that distribution: 6000 rows, a chi-square test against the
  target's exact sequence probabilities. Bugs caught: all the above, in the jitted program itself.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.decode import generate
from seqjax.decode.speculative import acceptance_probability, residual_distribution
from tests.decode.helpers import full_log_probs, make_lm, model_config

PROMPTS = np.asarray([[1, 5, 7, 2, 9], [1, 3, 0, 0, 0], [1, 11, 4, 6, 0]], np.int32)
LENGTHS = np.asarray([5, 2, 4], np.int32)
NEW = 9


def _cfg(mixer, **kw):
  return model_config(mixer, tie_embeddings=False, **kw)  # untied: a tied random LM mostly copies its input


PAIRS = {
    "attention_target_mamba_draft": (_cfg("attention", num_layers=2, positions="rope"), _cfg("mamba")),
    "mamba_target_attention_draft": (_cfg("mamba", num_layers=2), _cfg("attention", positions="learned")),
    "window_target_lstm_draft": (_cfg("attention", window=3, positions="alibi"), _cfg("lstm")),
    "hybrid_target_gru_draft": (_cfg("mamba2,attention", num_layers=2, positions="rope"), _cfg("gru")),
    "scanned_target_linear_draft": (_cfg("attention", num_layers=2, scan_layers=True, positions="rope"),
                                    _cfg("gla")),
    "target_drafts_for_itself": (_cfg("attention", num_layers=2, positions="rope"), None),
    # The target with noisy weights as its draft: it agrees often but not always, so rounds accept 1..k-1 tokens
    # and a draft state not restored to the accepted prefix changes the counts.
    "mamba_target_noisy_copy_draft": (_cfg("mamba", num_layers=2), "noisy"),
}
# One pair in the fast suite (each pair compiles three programs and replays the rounds with the uncached forward);
# the others, the Mamba target with an attention draft included, run with -m slow.
FAST = ("attention_target_mamba_draft",)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in PAIRS])
def test_greedy_speculative_equals_greedy_target(name):
  """Ragged prompts; row 0 stops at its fourth new token (a per-row stop table), the others run to the end."""
  target_cfg, draft_cfg = PAIRS[name]
  model, params = make_lm(target_cfg, seed=0, embed_scale=2.0)
  if draft_cfg is None:
    draft = (model, params)
  elif draft_cfg == "noisy":
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = [x + 0.15 * jnp.std(x) * jax.random.normal(key, x.shape, x.dtype) if x.ndim >= 2 else x
             for x, key in zip(leaves, keys)]
    draft = (model, jax.tree.unflatten(treedef, noisy))
  else:
    draft = make_lm(draft_cfg, seed=1, embed_scale=2.0)
  kw = dict(prompt_lengths=LENGTHS, max_new_tokens=NEW)
  free = np.asarray(generate(model, params, PROMPTS, stop_tokens=np.full((3, 1), -1), **kw).tokens)
  stop = int(free[0, LENGTHS[0] + 3])
  table = np.asarray([[stop], [-1], [-1]], np.int32)
  plain = generate(model, params, PROMPTS, stop_tokens=table, **kw)
  out = generate(model, params, PROMPTS, stop_tokens=table, draft=draft, num_draft_tokens=3, **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(plain.lengths))
  np.testing.assert_allclose(np.asarray(out.scores), np.asarray(plain.scores), rtol=1e-4, atol=1e-4)
  proposed, accepted = _greedy_counts(model, params, *draft, table[:, 0], k=3)
  np.testing.assert_array_equal(np.asarray(out.draft_proposed), proposed)
  np.testing.assert_array_equal(np.asarray(out.draft_accepted), accepted)
  if draft_cfg is None:
    assert out.acceptance_rate == 1.0
  elif draft_cfg == "noisy":
    assert 0.2 < out.acceptance_rate < 1.0, out.acceptance_rate
  else:  # another model: some draft tokens are rejected, so restoring the caches was exercised
    assert 0.0 <= out.acceptance_rate < 1.0, out.acceptance_rate


def _greedy_counts(model, params, draft_model, draft_params, stop_B, *, k):
  """The draft tokens each row proposes and gets accepted in greedy speculative decoding, replayed in plain
  Python with the uncached forward of both models over the whole text so far (a wrong accepted count, a round
  cut at the wrong place)."""
  width = PROMPTS.shape[1] + NEW + k + 1

  def argmax_after(m, p, text):  # the greedy next token after every prefix of text
    buffer = np.zeros((1, width), np.int32)
    buffer[0, :len(text)] = text
    return np.argmax(full_log_probs(m, p, buffer)[0, :len(text)], axis=-1)

  proposed, accepted = np.zeros(3, np.int32), np.zeros(3, np.int32)
  for b, length in enumerate(LENGTHS):
    text = list(PROMPTS[b, :length])
    text.append(int(argmax_after(model, params, text)[-1]))
    count = 1
    while count < NEW and text[-1] != stop_B[b]:
      draft_tokens = []
      for _ in range(k):
        draft_tokens.append(int(argmax_after(draft_model, draft_params, text + draft_tokens)[-1]))
      target_next = argmax_after(model, params, text + draft_tokens)[len(text) - 1:]
      a = 0
      while a < k and draft_tokens[a] == target_next[a]:
        a += 1
      proposed[b] += k
      accepted[b] += a
      for token in draft_tokens[:a] + [int(target_next[a])]:
        if count < NEW and text[-1] != stop_B[b]:
          text.append(token)
          count += 1
  return proposed, accepted


def _position_driven_pair():
  """A target and a draft whose greedy next token is a function of the position alone, so what the draft proposes
  is decided by the position its cache says it is at.

  Token embeddings are zero (the input is the learned position table only, untied read-out), so each model's
  argmax at position t is a fixed function of t whatever the text. The draft is the target with the position rows
  t = 2 mod 3 replaced by other random rows: it agrees with the target at the other positions and (mostly)
  disagrees at those, so rounds stop at different places and accept 0 .. k-1 tokens. A draft cache that keeps a
  rejected token is at a later position in the next round and proposes the tokens of other positions.
  """
  model, params = make_lm(_cfg("attention", num_layers=1, positions="learned"), seed=3, embed_scale=1.0)
  params = jax.tree.map(lambda x: x, params)  # a copy to edit
  params["embed"]["embedding"] = jnp.zeros_like(params["embed"]["embedding"])
  table = 4.0 * params["pos_embed"]["table"]
  params["pos_embed"]["table"] = table
  other = jax.random.normal(jax.random.key(11), table.shape, table.dtype) * jnp.std(table)
  swapped = (jnp.arange(table.shape[0]) % 3 == 2)[:, None]
  draft_params = jax.tree.map(lambda x: x, params)
  draft_params["pos_embed"]["table"] = jnp.where(swapped, other, table)
  return model, params, draft_params


def test_draft_cache_keeps_only_the_accepted_tokens():
  """The replayed per-row proposed / accepted counts equal the jitted program's. The replay's draft reads only the
  accepted text; had the draft's cache committed every proposed token after a rejection, its next proposals would
  come from later positions and the counts would differ (planted: `draft_model.commit(..., k + 1)` fails here)."""
  model, params, draft_params = _position_driven_pair()
  k = 3
  no_stop = np.full((3,), -1)
  proposed, accepted = _greedy_counts(model, params, model, draft_params, no_stop, k=k)
  # The case has teeth: several rounds per row, and rounds that end in a rejection after some acceptances.
  assert np.all(proposed > k) and np.all(accepted > 0) and np.all(accepted < proposed)
  kw = dict(prompt_lengths=LENGTHS, max_new_tokens=NEW)
  plain = generate(model, params, PROMPTS, **kw)
  out = generate(model, params, PROMPTS, draft=(model, draft_params), num_draft_tokens=k, **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(out.draft_proposed), proposed)
  np.testing.assert_array_equal(np.asarray(out.draft_accepted), accepted)


# ---------------------------------------------------------------------------------------------------------------
# The exact output distribution on a tiny vocabulary.
# ---------------------------------------------------------------------------------------------------------------

VOCAB, K, TINY_NEW, TOP_K = 4, 2, 4, 3
TINY_PROMPT = np.asarray([[1, 2]], np.int32)


def _tiny_pair():
  target = make_lm(model_config("attention", vocab=VOCAB, num_layers=2, positions="rope"), seed=3, embed_scale=1.5)
  draft = make_lm(model_config("mamba", vocab=VOCAB), seed=4, embed_scale=1.5)
  return target, draft


def _filtered(logp_V):
  """float64 temperature-1 top-k distribution (NumPy, plain sorting)."""
  keep = np.argsort(-logp_V)[:TOP_K]
  probs = np.zeros_like(logp_V)
  probs[keep] = np.exp(logp_V[keep])
  return probs / probs.sum()


def _all_distributions(model, params):
  """{prefix: float64 filtered next-token distribution} for every continuation prefix of up to TINY_NEW + K - 1
  tokens of the tiny prompt: one forward over every sequence of that length (the model is causal, so the
  distribution after a prefix is read at the prefix's last position of any sequence that starts with it)."""
  longest = TINY_NEW + K - 1
  seqs = np.asarray(list(itertools.product(range(VOCAB), repeat=longest)), np.int32)
  tokens = np.concatenate([np.repeat(TINY_PROMPT, len(seqs), axis=0), seqs], axis=1)
  logp = full_log_probs(model, params, tokens)
  start = TINY_PROMPT.shape[1] - 1
  out = {}
  for row, seq in enumerate(seqs.tolist()):
    for length in range(longest + 1):
      prefix = tuple(seq[:length])
      if prefix not in out:
        out[prefix] = _filtered(logp[row, start + length])
  return out


def _rules(p, q):
  """The implementation's acceptance probability [token] and residual [V] for every prefix, evaluated in closed
  form (one batched call each) on the same float64 distributions."""
  prefixes = sorted(p)
  p_PV = jnp.asarray(np.stack([p[s] for s in prefixes]), jnp.float32)
  q_PV = jnp.asarray(np.stack([q[s] for s in prefixes]), jnp.float32)
  tokens_PV = jnp.broadcast_to(jnp.arange(VOCAB), p_PV.shape)
  accept_PV = np.asarray(acceptance_probability(jnp.repeat(p_PV[:, None], VOCAB, 1),
                                                jnp.repeat(q_PV[:, None], VOCAB, 1), tokens_PV), np.float64)
  residual_PV = np.asarray(residual_distribution(p_PV, q_PV), np.float64)
  return {s: (accept_PV[i], residual_PV[i]) for i, s in enumerate(prefixes)}


def _speculative_distribution(p, q):
  """{output sequence: probability} of the algorithm (first token from the target, then rounds of K proposals),
  by enumerating every proposal and acceptance event of a round (memoised per prefix)."""
  rules = _rules(p, q)

  def round_tokens(seq):
    """{tokens one round emits after `seq`: probability}."""
    chunks = {}
    for proposal in itertools.product(range(VOCAB), repeat=K):
      reach = np.prod([q[seq + proposal[:i]][proposal[i]] for i in range(K)])
      if reach == 0:
        continue
      for i in range(K + 1):
        prefix = seq + proposal[:i]
        if i == K:  # every proposal accepted: the bonus token from p
          extra = p[prefix]
        else:  # rejected at i: a token from the residual
          accept, residual = rules[prefix]
          extra = (1 - accept[proposal[i]]) * residual
        for token in range(VOCAB):
          if extra[token] > 0:
            chunk = proposal[:i] + (token,)
            chunks[chunk] = chunks.get(chunk, 0.0) + reach * extra[token]
        if i < K:
          reach *= rules[prefix][0][proposal[i]]
    return chunks

  memo = {}

  def finish(seq):
    """{final TINY_NEW tokens: probability} from `seq` on."""
    if len(seq) >= TINY_NEW:
      return {seq[:TINY_NEW]: 1.0}
    if seq not in memo:
      out = {}
      for chunk, prob in round_tokens(seq).items():
        for final, rest in finish(seq + chunk).items():
          out[final] = out.get(final, 0.0) + prob * rest
      memo[seq] = out
    return memo[seq]

  out = {}
  for token in range(VOCAB):
    if p[()][token] > 0:
      for final, rest in finish((token,)).items():
        out[final] = out.get(final, 0.0) + p[()][token] * rest
  return out


def _sequence_probability(dist, seq):
  return np.prod([dist[tuple(seq[:i])][seq[i]] for i in range(TINY_NEW)])


def _target_distribution(p):
  return {seq: _sequence_probability(p, seq) for seq in itertools.product(range(VOCAB), repeat=TINY_NEW)}


def test_exact_output_distribution_equals_the_targets():
  (model, params), (draft_model, draft_params) = _tiny_pair()
  p, q = _all_distributions(model, params), _all_distributions(draft_model, draft_params)
  target = _target_distribution(p)
  speculative = _speculative_distribution(p, q)
  total_variation = 0.5 * sum(abs(speculative.get(s, 0.0) - target[s]) for s in target)
  assert total_variation <= 1e-6, total_variation
  # The draft differs from the target, so the rule was exercised (this is not a trivial equality).
  tv_draft = 0.5 * sum(abs(_sequence_probability(q, s) - target[s]) for s in target)
  assert tv_draft > 0.05, tv_draft


def test_sampled_outputs_follow_the_targets_distribution():
  """6000 independent rows of one program: chi-square against the target's exact sequence probabilities."""
  (model, params), (draft_model, draft_params) = _tiny_pair()
  target = _target_distribution(_all_distributions(model, params))
  rows = 6000
  out = generate(model, params, np.repeat(TINY_PROMPT, rows, axis=0), max_new_tokens=TINY_NEW, temperature=1.0,
                 top_k=TOP_K, rng=jax.random.key(11), draft=(draft_model, draft_params), num_draft_tokens=K)
  seqs = [tuple(r) for r in np.asarray(out.tokens)[:, TINY_PROMPT.shape[1]:].tolist()]
  counts = {}
  for s in seqs:
    counts[s] = counts.get(s, 0) + 1
  assert all(target[s] > 0 for s in counts), "a token outside the top-k was emitted"
  support = [s for s in target if target[s] > 0]
  expected = np.asarray([rows * target[s] for s in support])
  observed = np.asarray([counts.get(s, 0) for s in support])
  # Pool the rare outcomes (expected count < 5) into one cell, as the chi-square approximation needs.
  rare = expected < 5
  expected = np.append(expected[~rare], expected[rare].sum())
  observed = np.append(observed[~rare], observed[rare].sum())
  chi2 = float(np.sum((observed - expected) ** 2 / np.maximum(expected, 1e-12)))
  dof = len(expected) - 1
  # The 1 - 1e-4 quantile of chi-square(dof) is below dof + 6 sqrt(2 dof) + 20 for these dof (Wilson-Hilferty).
  assert chi2 < dof + 6 * np.sqrt(2 * dof) + 20, (chi2, dof)
  assert 0.0 < out.acceptance_rate < 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(draft="model"), "draft must be a pair"),
    (dict(num_draft_tokens=0), "num_draft_tokens must be an int >= 1"),
    (dict(num_beams=2), "does not combine with beam search"),
    (dict(vocab=14), "vocabulary"),
    (dict(max_len=8), "exceeds the model's context"),
])
def test_bad_speculative_arguments_are_clear_errors(kwargs, message):
  model, params = make_lm(model_config("attention"))
  draft_cfg = {k: kwargs.pop(k) for k in ("vocab", "max_len") if k in kwargs}
  draft = make_lm(model_config("gru", **draft_cfg))
  kwargs = {"max_new_tokens": 4, "draft": draft, "num_draft_tokens": 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    generate(model, params, PROMPTS, **kwargs)
