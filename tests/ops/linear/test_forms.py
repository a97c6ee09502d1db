"""The three forms of the linear-attention ops agree with each other (forward and gradients) over chunk sizes,
decoding steps equal the recurrent form, bfloat16 stays finite and close, memory stays flat, bad input is refused.

The float64 oracles are in test_numpy_oracle.py; these tests widen the coverage around them: chunk lengths that do
not divide T (and a chunk longer than T), gradients of every form against the parallel form, prefill (the end state)
followed by steps, the variants' own steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax.ops import linear

B, T, N, P, H = 2, 11, 2, 4, 3
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], [4] * 11], np.int32)
RNG = np.random.default_rng(1)


def _inputs(decay, b=B, t=T, seed=0):
  rng = np.random.default_rng(seed)
  q, k = (rng.standard_normal((b, t, N, P)).astype(np.float32) for _ in range(2))
  v = rng.standard_normal((b, t, N, H)).astype(np.float32)
  g = {"none": None, "head": -np.abs(rng.standard_normal(N)).astype(np.float32),
       "feature": -np.abs(rng.standard_normal((b, t, N, P))).astype(np.float32)}[decay]
  return q, k, v, g


class FormsAgreeTest(parameterized.TestCase):

  @parameterized.product(decay=("none", "feature"), chunk=(1, 3, 16))
  def test_chunked_equals_parallel_forward_and_gradients(self, decay, chunk):
    """Catches: a chunk boundary mishandled for some chunk length (1: every token its own chunk; 16 > T)."""
    q, k, v, g = _inputs(decay)
    s0 = RNG.standard_normal((B, N, P, H)).astype(np.float32)
    w = RNG.standard_normal((B, T, N, H)).astype(np.float32)

    def loss(mode, chunk_size=None):
      def f(q, k, v, g, s0):
        o, s = linear.decayed_linear_attention(q, k, v, g, mode=mode, chunk_size=chunk_size, initial_state=s0,
                                               segment_ids=SEGMENTS, return_final_state=True)
        return jnp.sum(o * w) + jnp.sum(s ** 2)
      return f

    argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
    expected = jax.jit(jax.value_and_grad(loss("parallel"), argnums))(q, k, v, g, s0)
    actual = jax.jit(jax.value_and_grad(loss("chunked", chunk), argnums))(q, k, v, g, s0)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-4 * max(1.0, float(np.max(np.abs(e)))))

  @parameterized.named_parameters(("recurrent", "recurrent"), ("chunked", "chunked"))
  def test_gradients_equal_the_parallel_form(self, mode):
    q, k, v, g = _inputs("feature", seed=2)

    def loss(mode):
      return lambda *a: jnp.sum(jnp.sin(linear.decayed_linear_attention(*a, mode=mode, chunk_size=4,
                                                                          segment_ids=SEGMENTS)))
    expected = jax.jit(jax.grad(loss("parallel"), (0, 1, 2, 3)))(q, k, v, g)
    actual = jax.jit(jax.grad(loss(mode), (0, 1, 2, 3)))(q, k, v, g)
    for a, e in zip(actual, expected):
      np.testing.assert_allclose(a, e, rtol=2e-4, atol=2e-4)

  @parameterized.named_parameters(("none", "none"), ("feature", "feature"))
  def test_prefill_then_steps_equal_the_whole_sequence(self, decay):
    """Catches: a step that decays after writing, or a prefill end state that is not the state the steps need."""
    q, k, v, g = _inputs(decay)
    split = 6
    o_all = linear.decayed_linear_attention(q, k, v, g, mode="parallel")
    g_at = lambda sl: None if g is None else (g if g.ndim == 1 else g[:, sl])  # noqa: E731
    o_pre, state = linear.decayed_linear_attention(q[:, :split], k[:, :split], v[:, :split], g_at(slice(0, split)),
                                                   chunk_size=4, return_final_state=True)
    np.testing.assert_allclose(o_pre, o_all[:, :split], rtol=1e-5, atol=1e-5)
    step = jax.jit(linear.decayed_step)
    for t in range(split, T):
      o_t, state = step(q[:, t], k[:, t], v[:, t], g_at(t), state)
      np.testing.assert_allclose(o_t, o_all[:, t], rtol=1e-5, atol=1e-5, err_msg=f"step {t}")

  def test_variant_steps_equal_their_sequence_forms(self):
    q, k, v, _ = _inputs("none")
    gate = RNG.standard_normal((B, T, N, P)).astype(np.float32)
    log_gamma = linear.retnet_log_decay(N)
    full = {"linear": linear.linear_attention(q, k, v, mode="recurrent"),
            "retention": linear.retention(q, k, v, log_gamma, mode="parallel"),
            "gla": linear.gated_linear_attention(q, k, v, linear.gla_log_decay(gate), mode="parallel")}
    states = {"linear": jnp.zeros((B, N, P, H + 1)), "retention": jnp.zeros((B, N, P, H)),
              "gla": jnp.zeros((B, N, P, H))}
    for t in range(T):
      steps = {"linear": linear.linear_attention_step(q[:, t], k[:, t], v[:, t], states["linear"]),
               "retention": linear.decayed_attention_step(q[:, t], k[:, t], v[:, t], log_gamma, states["retention"]),
               "gla": linear.decayed_attention_step(q[:, t], k[:, t], v[:, t], linear.gla_log_decay(gate[:, t]),
                                                    states["gla"])}
      for name, (o_t, states[name]) in steps.items():
        np.testing.assert_allclose(o_t, full[name][:, t], rtol=1e-5, atol=1e-5, err_msg=f"{name} step {t}")


class Bfloat16Test(parameterized.TestCase):

  @parameterized.product(mode=("parallel", "recurrent", "chunked"), variant=("linear", "retention", "gla"))
  def test_bfloat16_is_finite_and_close_to_float32(self, mode, variant):
    """bf16 inputs: float32 state and accumulation, output in bf16 within 3% of the output scale of the float32 run
    on the same (rounded) inputs over 96 tokens."""
    q, k, v, _ = _inputs("none", t=96, seed=3)
    gate = np.random.default_rng(4).standard_normal((B, 96, N, P)).astype(np.float32)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    run = {"linear": lambda q, k, v: linear.linear_attention(q, k, v, mode=mode, chunk_size=32),
           "retention": lambda q, k, v: linear.retention(q, k, v, linear.retnet_log_decay(N), mode=mode,
                                                         chunk_size=32),
           "gla": lambda q, k, v: linear.gated_linear_attention(q, k, v, linear.gla_log_decay(gate), mode=mode,
                                                                chunk_size=32)}[variant]
    run = jax.jit(run)
    out = run(bf(q), bf(k), bf(v))
    ref = run(*(bf(a).astype(jnp.float32) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out)))
    scale = float(jnp.max(jnp.abs(ref)))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.03 * scale


def test_chunked_fwd_bwd_never_holds_per_step_states():
  """fwd+bwd temp memory of the chunked form stays under a fifth of one [T, N, P, H] stack of per-step states
  (what the recurrent form's autodiff keeps; the chunked form holds O(T (P + H)) plus one state per chunk): catches a chunk step that is not rematerialised or a form that
  materialises the states."""
  t, n, p, h = 2048, 2, 64, 64
  rng = np.random.default_rng(5)
  args = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, t, n, p), (1, t, n, p), (1, t, n, h)))
  g = -jnp.abs(jnp.asarray(rng.standard_normal((1, t, n, p)), jnp.float32))

  def loss(q, k, v, g):
    return jnp.sum(linear.decayed_linear_attention(q, k, v, g, mode="chunked", chunk_size=32))

  temp = jax.jit(jax.grad(loss, (0, 1, 2, 3))).lower(*args, g).compile().memory_analysis().temp_size_in_bytes
  per_step_states = t * n * p * h * 4
  assert temp < per_step_states / 5, (temp, per_step_states)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="quadratic"), "mode='quadratic' is not one of"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(log_decay=np.zeros((B, T))), r"log-decay must be \[N\]"),
    (dict(initial_state=np.zeros((B, N, H, P))), r"initial_state must be \[B, N, P, H\]"),
    (dict(segment_ids=np.zeros((B, T + 1), np.int32)), r"segment_ids must be \[B, T\]"),
], ids=["mode", "chunk", "decay_shape", "state_shape", "segments_shape"])
def test_bad_input_is_a_clear_error(kwargs, message):
  q, k, v, _ = _inputs("none")
  with pytest.raises(ValueError, match=message):
    linear.decayed_linear_attention(q, k, v, **kwargs)
  with pytest.raises(ValueError, match="feature_map='softmax' is not one of"):
    linear.linear_attention(q, k, v, feature_map_name="softmax")
  with pytest.raises(ValueError, match=r"delta_rule: beta must be \[B, T, N\]"):
    linear.delta_rule(q, k, v, np.zeros((B, T)))
  if "log_decay" not in kwargs:  # the checks the delta rule shares
    with pytest.raises(ValueError, match="delta_rule: " + message):
      linear.delta_rule(q, k, v, np.ones((B, T, N)), **kwargs)
