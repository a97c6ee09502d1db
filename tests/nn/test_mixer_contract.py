"""The mixer contract (seqjax.nn.contract), checked for every registered mixer and for DecoderLM's cached decoding.

For every name in `available_mixers()` (a newly registered mixer is covered without editing this file), plus a
sliding-window attention, a hybrid pattern and a scanned stack, at tiny sizes in float32:
  (a) prefill of T tokens then k steps = the parallel forward over T + k (mixer level and model level);
  (b) the state after a right-padded row equals the unpadded row's state, the one that stepping its tokens one by
      one from `init_state` / `init_cache` gives (padding independence; recurrent form = prefill);
  (c) rows of different lengths in one batch (ragged prompts) each give their own row's results;
  (d) the jitted prefill and step compile once across all calls (`chex.assert_max_traces`), steps from the empty
      state and from prefilled states alike (so both have one structure);
  (e) registering a mixer that breaks the contract fails with a message naming the mixer and what is missing.
(a)-(d) run for one mixer per family and every composite case in `make test` (`tests.decode.helpers.tiered`), for
every mixer in `make test-slow`; the conformance harness checks (a) for every mixer in `make test`.
The reference for each row is the parallel forward over that row's own tokens (right-padded in the batch, so by
causality padding cannot reach them).
"""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import AttentionConfig, LinearAttentionConfig, ModelConfig, MoeConfig, SsmConfig
from seqjax.models.lm import DecoderLM
from seqjax.nn import contract
from seqjax.nn.mixers import available_mixers, is_bidirectional, make_mixer, register_mixer
from tests.decode.helpers import tiered

B, T, K_STEPS, D, VOCAB = 2, 10, 4, 16, 11
LENGTHS = (T, T - 3)  # row 0 fills the prompt, row 1 is right-padded


def _config(mixer: str, *, window: int = 0, num_heads: int = 2, num_kv_heads: int = 0, **model) -> ModelConfig:
  attention = AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, window=window,
                              implementation="reference")
  base = dict(mixer=mixer, d_model=D, num_layers=2, mlp_dim=32, vocab_size=VOCAB, max_len=16, attention=attention,
              ssm=SsmConfig(state=4, head_dim=8, chunk=4),  # chunk 4 does not divide T: a partial last chunk
              linear=LinearAttentionConfig(chunk=4))
  return ModelConfig(**{**base, **model})


CAUSAL_MIXERS = [name for name in available_mixers() if not is_bidirectional(name)]  # bidirectional: no decoding
MIXER_CASES = {name: _config(name, positions="rope") for name in CAUSAL_MIXERS}
MIXER_CASES["attention_window_alibi_mqa"] = _config("attention", window=4, positions="alibi", num_kv_heads=1)

MODEL_CASES = {name: _config(name) for name in CAUSAL_MIXERS}
MODEL_CASES.update({
    "hybrid_mamba_attention_lstm": _config("mamba,attention,lstm", num_layers=3, positions="sinusoidal"),
    "attention_window_alibi_mqa": _config("attention", window=4, positions="alibi", num_kv_heads=1),
    "attention_scanned_rope_gqa": _config("attention", scan_layers=True, positions="rope", num_heads=4,
                                          num_kv_heads=2, norm_position="post", norm="rmsnorm"),
})
# Mixture-of-experts MLPs (seqjax.nn.moe): dropless in every other block, and scanned with capacity for every
# assignment (capacity_factor * top_k / J = 1: nothing dropped, so prefill + steps must equal the parallel forward).
MODEL_CASES.update({
    "attention_moe_dropless_every2": _config("attention", moe=MoeConfig(num_experts=4, top_k=2, capacity_factor=0.0,
                                                                         every=2)),
    "attention_moe_scanned_capacity_gated": _config("attention", scan_layers=True, positions="rope", moe=MoeConfig(
        num_experts=4, top_k=2, capacity_factor=2.0, kind="gated")),
})


def _assert_close(actual, expected, what):
  scale = max([1.0] + [float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(expected) if np.size(leaf)])
  chex.assert_trees_all_close(actual, expected, rtol=1e-4, atol=1e-4 * scale, custom_message=what)


def _init(module, *example_args):
  """The module's variables. `lazy_init` runs only the initialisers (no forward); with the "rbg" generator they
  compile about twice as fast as with threefry. Any initial values do for these checks."""
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in example_args]
  return module.lazy_init(jax.random.key(1, impl="rbg"), *shapes)


def _rows_at(x_BT, offsets_B):
  """x[b, offsets[b]] for every row b."""
  return x_BT[jnp.arange(x_BT.shape[0]), offsets_B]


def _steps_from_empty(step, inputs_BT, state, reference_BT, what, row_of):
  """Steps every row through its first T inputs from the empty `state`, checking each output against the parallel
  reference; returns, per row b, that row's state after its first LENGTHS[b] inputs (the unpadded row's state)."""
  states_at = {}
  for t in range(T):
    out, state = step(inputs_BT[:, t], state)
    _assert_close(out, reference_BT[:, t], f"{what}: step {t} from the empty state")
    states_at[t + 1] = state
  return [row_of(states_at[length], b) for b, length in enumerate(LENGTHS)]


def _check_prefill(outputs_BT, state, reference_BT, stepped_rows, what, row_of):
  """(a) prefill outputs = the parallel form on each row's real tokens; (b) each row's state = the stepped one."""
  for b, length in enumerate(LENGTHS):
    _assert_close(outputs_BT[b, :length], reference_BT[b, :length], f"{what}: prefill output, row {b}")
    _assert_close(row_of(state, b), stepped_rows[b], f"{what}: prefill state of row {b} (length {length})")


@pytest.mark.parametrize("case", tiered(sorted(MIXER_CASES)))
def test_mixer_prefill_then_steps_equal_parallel(case):
  chex.clear_trace_counter()
  cfg = MIXER_CASES[case]
  mixer = make_mixer(cfg.mixer, cfg)
  assert isinstance(mixer, contract.Mixer)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  segment_ids = (jnp.arange(T)[None] < lengths[:, None]).astype(jnp.int32)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T + K_STEPS, D))
  variables = _init(mixer, x)
  row_of = lambda state, b: jax.tree.map(lambda leaf: leaf[b], state)  # noqa: E731

  @jax.jit
  def reference(variables, x):
    y = mixer.apply(variables, x)
    y_prefill, state = mixer.apply(variables, x[:, :T], segment_ids=segment_ids, return_state=True)
    return y, y_prefill, state

  y, y_prefill, state = reference(variables, x)
  step = jax.jit(chex.assert_max_traces(lambda v, x, s: mixer.apply(v, x, s, method="step"), n=1))
  stepped_rows = _steps_from_empty(functools.partial(step, variables), x, mixer.init_state(B, cfg.max_len), y,
                                   case, row_of)
  _check_prefill(y_prefill, state, y, stepped_rows, case, row_of)
  for i in range(K_STEPS):  # (c) each row continues from its own length
    y_i, state = step(variables, _rows_at(x, lengths + i), state)
    _assert_close(y_i, _rows_at(y, lengths + i), f"{case}: step {i} after prefill")


@pytest.mark.parametrize("case", tiered(sorted(MODEL_CASES)))
def test_lm_prefill_then_steps_equal_parallel(case):
  chex.clear_trace_counter()
  cfg = MODEL_CASES[case]
  model = DecoderLM(cfg)
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (B, T + K_STEPS), 0, VOCAB)
  variables = _init(model, tokens)
  batch_axis = 1 if cfg.scan_layers else 0  # of the layer states; "position" has the batch on axis 0

  def row_of(cache, b):
    return {"position": cache["position"][b],
            "layers": jax.tree.map(lambda leaf: jnp.take(leaf, b, axis=batch_axis), cache["layers"])}

  logits = jax.jit(model.apply)(variables, tokens)
  prefill = jax.jit(chex.assert_max_traces(
      lambda v, t, lengths: model.apply(v, t, lengths=lengths, method="prefill"), n=1))
  step = jax.jit(chex.assert_max_traces(lambda v, t, c: model.apply(v, t, c, method="step"), n=1))

  stepped_rows = _steps_from_empty(functools.partial(step, variables), tokens, model.init_cache(B), logits, case,
                                   row_of)
  logits_prefill, cache = prefill(variables, tokens[:, :T], lengths)
  _check_prefill(logits_prefill, cache, logits, stepped_rows, case, row_of)
  layer_states = jax.tree.leaves(cache["layers"])
  if cfg.scan_layers:
    assert all(leaf.shape[:2] == (cfg.num_layers, B) for leaf in layer_states)
  else:
    assert len(cache["layers"]) == cfg.num_layers and all(leaf.shape[0] == B for leaf in layer_states)
  # The rows swapped (so other lengths at each row): each row's cache is its own, whatever its neighbour.
  _, swapped = prefill(variables, tokens[::-1, :T], lengths[::-1])
  for b in range(B):
    _assert_close(row_of(swapped, B - 1 - b), row_of(cache, b), f"{case}: prefill with the rows swapped, row {b}")
  for i in range(K_STEPS):  # (c) each row continues from its own length
    logits_i, cache = step(variables, _rows_at(tokens, lengths + i), cache)
    _assert_close(logits_i, _rows_at(logits, lengths + i), f"{case}: step {i} after prefill")
  np.testing.assert_array_equal(cache["position"], lengths + K_STEPS)


class _CallOnly(nn.Module):
  """A mixer with the parallel form only: no return_state, no init_state, no step."""

  @nn.compact
  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True):
    return x_BTD


class _StepWithoutState(_CallOnly):
  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True, return_state=False):
    return x_BTD

  def init_state(self, batch_size, max_len, dtype=None):
    return ()

  def step(self, x_BD):
    return x_BD, ()


def test_register_rejects_mixers_that_break_the_contract():
  with pytest.raises(ValueError, match=r"mixer 'test_call_only' \(_CallOnly\) does not implement the mixer contract"
                                       r".*__call__ lacks the keyword argument\(s\) return_state"
                                       r".*no method init_state\(batch_size, max_len, dtype\).*no method step"):
    register_mixer("test_call_only")(lambda cfg: _CallOnly())
  with pytest.raises(ValueError, match=r"mixer 'test_step_no_state'.*step takes 1 positional argument\(s\), the "
                                       r"contract passes 2 \(x_BD, state\).*deterministic"):
    register_mixer("test_step_no_state")(lambda cfg: _StepWithoutState())
  with pytest.raises(ValueError, match=r"mixer 'test_not_a_module'.*must return a flax.linen.Module, got function"):
    register_mixer("test_not_a_module")(lambda cfg: (lambda x: x))
  with pytest.raises(ValueError, match=r"mixer 'test_bad_factory': its factory failed .*KeyError"):
    register_mixer("test_bad_factory")(lambda cfg: {}["missing"])
  with pytest.raises(ValueError, match="already registered"):
    register_mixer("attention")(lambda cfg: make_mixer("attention", cfg))
  assert not any(name.startswith("test_") for name in available_mixers())


def test_contract_helpers_on_padded_rows():
  seg = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 2, 2, 0], [0, 0, 0, 0, 0]])
  lengths = contract.last_token_lengths(seg, 3, 5)
  np.testing.assert_array_equal(lengths, [3, 4, 0])
  np.testing.assert_array_equal(contract.next_positions(jnp.asarray([[0, 1, 2, 0, 0], [0, 1, 0, 1, 0],
                                                                     [0, 0, 0, 0, 0]]), lengths), [3, 2, 0])
  x = jnp.arange(15).reshape(3, 5)
  aligned, seg_aligned, _ = contract.right_align(x, seg)
  np.testing.assert_array_equal(aligned, [[3, 4, 0, 1, 2], [9, 5, 6, 7, 8], [10, 11, 12, 13, 14]])
  np.testing.assert_array_equal(seg_aligned[:, -1], [1, 2, 0])
  np.testing.assert_array_equal(contract.restore(aligned, lengths), x)


def test_init_cache_needs_no_parameters_and_matches_the_layout():
  cfg = dataclasses.replace(MODEL_CASES["hybrid_mamba_attention_lstm"], max_len=12)
  cache = DecoderLM(cfg).init_cache(3, max_len=8)
  assert cache["position"].shape == (3,)
  mamba, attention, lstm = cache["layers"]
  assert mamba["conv"].shape == (3, 3, 32) and mamba["ssm"].shape == (3, 32, 4)
  assert attention.key.shape == (3, 2, 8, 8) and attention.key.dtype == jnp.float32
  assert [s.shape for s in lstm] == [(3, D), (3, D)]
  windowed = DecoderLM(MODEL_CASES["attention_window_alibi_mqa"]).init_cache(2)
  assert windowed["layers"][0].key.shape == (2, 1, 4, 8)  # one kv head, a ring of `window` slots


def test_prompt_longer_than_the_kv_cache_is_a_clear_error():
  cfg = MODEL_CASES["attention"]
  model = DecoderLM(cfg)
  tokens = jax.ShapeDtypeStruct((1, cfg.max_len + 1), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  with pytest.raises(ValueError, match="17 tokens does not fit the KV cache of model.max_len=16"):
    jax.eval_shape(lambda v, t: model.apply(v, t, method="prefill"), variables, tokens)
  windowed = DecoderLM(dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, window=4)))
  jax.eval_shape(lambda v, t: windowed.apply(v, t, method="prefill"), variables, tokens)  # a ring of 4 keys: fine
