"""RWKV-6's wkv (seqjax.ops.linear.rwkv) against a float64 NumPy loop of the paper's recurrence, in every form:

    y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),     S_t = diag(w_t) S_{t-1} + k_t v_t^T,     w_t = exp(g_t)

(the read before the write, the bonus u for the current token), with segment resets (the state zeroed at a
document start), an initial state, the end state, gradients as directional derivatives against float64 central
differences, decoding steps, and the token shift. The loop shares no code with the op (which runs the shared
decayed recurrence on keys shifted one token later).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax.ops.linear import rwkv
from tests.ops.linear.test_numpy_oracle import assert_directional_derivatives

MODES = ("parallel", "recurrent", "chunked")
B, T, N, P, H = 2, 13, 3, 4, 5
CHUNK = 4
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4], [5] * 13], np.int32)
RNG = np.random.default_rng(7)


def _normal(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def _inputs():
  return (_normal(B, T, N, P), _normal(B, T, N, P), _normal(B, T, N, H), -np.abs(_normal(B, T, N, P)),
          _normal(N, P), _normal(B, N, P, H))


def wkv_oracle(r, k, v, g, u, s0, seg):
  r, k, v, g, u, s0 = (np.asarray(a, np.float64) for a in (r, k, v, g, u, s0))
  y = np.zeros(v.shape)
  s_final = np.zeros(s0.shape)
  for b in range(r.shape[0]):
    for n in range(r.shape[2]):
      s = s0[b, n].copy()
      for t in range(r.shape[1]):
        if t > 0 and seg[b, t] != seg[b, t - 1]:
          s = np.zeros_like(s)
        kv = np.outer(k[b, t, n], v[b, t, n])
        y[b, t, n] = r[b, t, n] @ (s + u[n][:, None] * kv)
        s = np.exp(g[b, t, n])[:, None] * s + kv
      s_final[b, n] = s
  return y, s_final


def _assert_close(actual, expected, what=""):
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=2e-5, atol=2e-5 * scale, err_msg=what)


class WkvTest(parameterized.TestCase):

  @parameterized.product(mode=MODES)
  def test_forward_and_final_state_match_the_loop(self, mode):
    """Catches: the read after the write (decay w_t applied to the past at t), the bonus missing or on the wrong
    side, a key of the previous document written after a reset, an end state one token short."""
    r, k, v, g, u, s0 = _inputs()
    y, s = rwkv.rwkv6_wkv(r, k, v, g, u, mode=mode, chunk_size=CHUNK, initial_state=s0, segment_ids=SEGMENTS,
                          return_final_state=True)
    y_ref, s_ref = wkv_oracle(r, k, v, g, u, s0, SEGMENTS)
    _assert_close(y, y_ref, "output")
    _assert_close(s, s_ref, "final state")

  @parameterized.product(mode=MODES)
  def test_gradients_match_finite_differences_of_the_loop(self, mode):
    """Catches: a wrong backward through the shifted recurrence or the bonus (r, k, v, g, u, the initial state)."""
    args = list(_inputs())
    w_y, w_s = _normal(B, T, N, H), _normal(B, N, P, H)

    def loss(r, k, v, g, u, s0):
      y, s = rwkv.rwkv6_wkv(r, k, v, g, u, mode=mode, chunk_size=CHUNK, initial_state=s0, segment_ids=SEGMENTS,
                            return_final_state=True)
      return jnp.sum(y * w_y) + jnp.sum(s * w_s)

    def oracle_loss(*a):
      y, s = wkv_oracle(*a, SEGMENTS)
      return np.sum(y * w_y) + np.sum(s * w_s)

    assert_directional_derivatives(loss, oracle_loss, args, small=(3,), rng=RNG)

  def test_prefill_then_steps_equal_the_whole_sequence(self):
    """Catches: a prefill end state that is not the one decoding continues from, a step that decays first."""
    r, k, v, g, u, _ = _inputs()
    y_all = rwkv.rwkv6_wkv(r, k, v, g, u, mode="parallel")
    split = 6
    _, state = rwkv.rwkv6_wkv(r[:, :split], k[:, :split], v[:, :split], g[:, :split], u, chunk_size=CHUNK,
                              return_final_state=True)
    step = jax.jit(rwkv.rwkv6_wkv_step)
    for t in range(split, T):
      y_t, state = step(r[:, t], k[:, t], v[:, t], g[:, t], u, state)
      _assert_close(y_t, np.asarray(y_all[:, t], np.float64), f"step {t}")

  def test_token_shift(self):
    """x_{t-1}, the given previous token at position 0, zeros at a document start."""
    x, prev = _normal(B, T, 3), _normal(B, 3)
    out = np.asarray(rwkv.token_shift(x, SEGMENTS, prev))
    expected = np.concatenate([prev[:, None], x[:, :-1]], axis=1)
    expected[0, [4, 7, 10]] = 0.0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.asarray(rwkv.token_shift(x))[:, 0], 0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(log_decay=np.zeros((B, T, N))), r"log_decay must be \[B, T, N, P\]"),
    (dict(u=np.zeros((N,))), r"the bonus u must be \[N, P\]"),
    (dict(mode="fast"), "mode='fast' is not one of"),
], ids=["decay", "bonus", "mode"])
def test_bad_input_is_a_clear_error(kwargs, message):
  r, k, v, g, u, _ = _inputs()
  args = {"log_decay": g, "u": u, **kwargs}
  with pytest.raises(ValueError, match="rwkv6_wkv: " + message):
    rwkv.rwkv6_wkv(r, k, v, args.pop("log_decay"), args.pop("u"), **args)
