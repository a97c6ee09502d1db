"""The linear-attention kernels against float64 NumPy written from the papers' equations (no code shared with
seqjax.ops.linear), in every form ("parallel", "recurrent", "chunked").

* the decayed recurrence (GLA's form, the most general: a decay per head, token and key feature), a loop over time:
      S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,          o_t = S_t^T q_t
  with every shape of g the op accepts (none, [N], [B, T, N], [B, T, N, P]) broadcast by hand;
* linear attention (Katharopoulos et al. 2020, eq. 9 causal), as the explicit double sum
      o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps),  phi = elu + 1;
* retention (RetNet), as the explicit double sum o_t = sum_{s<=t} gamma_n^(t-s) (q_t.k_s) v_s, gamma_n = 1 - 2^(-5-n);
* FAVOR+ (Performer): causal softmax attention in float64, estimated by the normalised linear attention of
  positive orthogonal random features;
* the delta rule (DeltaNet), a loop over time in the Householder-like form
      S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = S_t^T q_t.

A segment reset zeroes the state before the first position of a new id (position 0 continues from the initial
state); in the double sums, s ranges over the current document only. Gradients are checked as directional
derivatives against float64 central differences of the oracle, so autodiff through each form (the chunked form's
rematerialised scan included) is checked against something other than itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax.ops import linear
from seqjax.ops.linear import delta

MODES = ("parallel", "recurrent", "chunked")
B, T, N, P, H = 2, 13, 3, 4, 5
CHUNK = 4  # does not divide T; the resets below fall on a chunk start (4), mid-chunk (7, 10)
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4],
                     [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]], np.int32)
RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
  return (scale * RNG.standard_normal(shape)).astype(np.float32)


def _log_decay(kind):
  return {"none": None, "head": -np.abs(_normal(N)), "head_token": -np.abs(_normal(B, T, N)),
          "feature": -np.abs(_normal(B, T, N, P))}[kind]


def _resets(seg):
  out = np.zeros(seg.shape, bool)
  out[:, 1:] = seg[:, 1:] != seg[:, :-1]
  return out


def recurrence_oracle(q, k, v, g, s0, seg):
  """The per-step loop in float64: o [B, T, N, H], final state [B, N, P, H]."""
  q, k, v, s0 = (np.asarray(a, np.float64) for a in (q, k, v, s0))
  nb, nt, nn, npp = q.shape
  if g is None:
    g_full = np.zeros((nb, nt, nn, npp))
  else:
    g = np.asarray(g, np.float64)
    g_full = {1: lambda: np.tile(g[None, None, :, None], (nb, nt, 1, npp)),
              3: lambda: np.repeat(g[..., None], npp, axis=-1),
              4: lambda: g}[g.ndim]()
  reset = _resets(seg)
  o = np.zeros(v.shape)
  s_final = np.zeros(s0.shape)
  for b in range(nb):
    for n in range(nn):
      s = s0[b, n].copy()  # [P, H]
      for t in range(nt):
        if reset[b, t]:
          s = np.zeros_like(s)
        s = np.exp(g_full[b, t, n])[:, None] * s + np.outer(k[b, t, n], v[b, t, n])
        o[b, t, n] = q[b, t, n] @ s
      s_final[b, n] = s
  return o, s_final


def delta_rule_oracle(q, k, v, beta, s0, seg, g=None):
  """The delta rule in float64, one head at a time: o [B, T, N, H], final state [B, N, P, H]. With a log-decay g
  [B, T, N], the gated delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T."""
  q, k, v, beta, s0 = (np.asarray(a, np.float64) for a in (q, k, v, beta, s0))
  a = np.ones(beta.shape) if g is None else np.exp(np.asarray(g, np.float64))
  reset = _resets(seg)
  o = np.zeros(v.shape)
  s_final = np.zeros(s0.shape)
  eye = np.eye(q.shape[3])
  for b in range(q.shape[0]):
    for n in range(q.shape[2]):
      s = s0[b, n].copy()
      for t in range(q.shape[1]):
        if reset[b, t]:
          s = np.zeros_like(s)
        kt = k[b, t, n]
        s = a[b, t, n] * (eye - beta[b, t, n] * np.outer(kt, kt)) @ s + beta[b, t, n] * np.outer(kt, v[b, t, n])
        o[b, t, n] = q[b, t, n] @ s
      s_final[b, n] = s
  return o, s_final


def _documents(seg, b, t):
  """The positions s <= t of the document t belongs to, and whether it is the row's first document."""
  start = t
  while start > 0 and seg[b, start - 1] == seg[b, t]:
    start -= 1
  return range(start, t + 1), start == 0


def linear_attention_oracle(q, k, v, eps):
  """Katharopoulos et al. causal linear attention with phi = elu + 1 (no initial state), as explicit sums."""
  phi = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))  # noqa: E731  elu(x) + 1
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  fq, fk = phi(q), phi(k)
  o = np.zeros(v.shape)
  for b in range(q.shape[0]):
    for t in range(q.shape[1]):
      docs, _ = _documents(SEGMENTS, b, t)
      for n in range(q.shape[2]):
        w = np.array([fq[b, t, n] @ fk[b, s, n] for s in docs])
        o[b, t, n] = (w[:, None] * v[b, list(docs), n]).sum(0) / (w.sum() + eps)
  return o


def retention_oracle(q, k, v, s0):
  """RetNet's retention as explicit sums (the initial state enters the first document, decayed by gamma^(t+1))."""
  q, k, v, s0 = (np.asarray(a, np.float64) for a in (q, k, v, s0))
  gamma = 1.0 - 2.0 ** (-5.0 - np.arange(q.shape[2]))
  o = np.zeros(v.shape)
  for b in range(q.shape[0]):
    for t in range(q.shape[1]):
      docs, first = _documents(SEGMENTS, b, t)
      for n in range(q.shape[2]):
        o[b, t, n] = sum(gamma[n] ** (t - s) * (q[b, t, n] @ k[b, s, n]) * v[b, s, n] for s in docs)
        if first:
          o[b, t, n] += gamma[n] ** (t + 1) * q[b, t, n] @ s0[b, n]
  return o


def _assert_close(actual, expected, rtol=2e-5, what=""):
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * scale, err_msg=what)


class DecayedRecurrenceTest(parameterized.TestCase):

  @parameterized.product(mode=MODES, decay=("none", "head", "head_token", "feature"))
  def test_forward_and_final_state_match_the_loop(self, mode, decay):
    """Catches: a decay applied before/after the write in one form, a reset off by one or ignored, the incoming
    state read undecayed, a partial last chunk dropped, the end state of the wrong document."""
    q, k, v, s0 = _normal(B, T, N, P), _normal(B, T, N, P), _normal(B, T, N, H), _normal(B, N, P, H)
    g = _log_decay(decay)
    o, s = linear.decayed_linear_attention(q, k, v, g, mode=mode, chunk_size=CHUNK, initial_state=s0,
                                           segment_ids=SEGMENTS, return_final_state=True)
    o_ref, s_ref = recurrence_oracle(q, k, v, g, s0, SEGMENTS)
    assert o.dtype == s.dtype == jnp.float32
    _assert_close(o, o_ref, what="output")
    _assert_close(s, s_ref, what="final state")

  @parameterized.product(mode=MODES, decay=("none", "feature"))
  def test_gradients_match_finite_differences_of_the_loop(self, mode, decay):
    """Catches: a wrong backward of any form (e.g. the rematerialised chunk scan, or a gradient leaking through a
    masked exp(+large) entry) — directional derivatives w.r.t. q, k, v, g and the initial state."""
    args = [_normal(B, T, N, P), _normal(B, T, N, P), _normal(B, T, N, H), _log_decay(decay),
            _normal(B, N, P, H)]
    names = ("q", "k", "v", "g", "s0")
    w_o, w_s = _normal(B, T, N, H), _normal(B, N, P, H)

    def loss(q, k, v, g, s0):
      o, s = linear.decayed_linear_attention(q, k, v, g, mode=mode, chunk_size=CHUNK, initial_state=s0,
                                             segment_ids=SEGMENTS, return_final_state=True)
      return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    def oracle_loss(q, k, v, g, s0):
      o, s = recurrence_oracle(q, k, v, g, s0, SEGMENTS)
      return np.sum(o * w_o) + np.sum(s * w_s)

    present = [i for i, a in enumerate(args) if a is not None]
    grads = jax.grad(loss, argnums=tuple(present))(*args)
    for i, grad in zip(present, grads):
      direction = RNG.standard_normal(args[i].shape)
      if names[i] == "g":
        direction = direction * 0.1
      eps = 1e-5
      plus = [a if j != i else np.asarray(a, np.float64) + eps * direction for j, a in enumerate(args)]
      minus = [a if j != i else np.asarray(a, np.float64) - eps * direction for j, a in enumerate(args)]
      expected = (oracle_loss(*plus) - oracle_loss(*minus)) / (2 * eps)
      actual = float(np.sum(np.asarray(grad, np.float64) * direction))
      np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3, err_msg=f"d loss / d {names[i]}")


class VariantsTest(parameterized.TestCase):

  @parameterized.product(mode=MODES)
  def test_linear_attention_is_katharopoulos(self, mode):
    """Catches: a missing or misplaced normaliser (e.g. the key sum not including the current token), a feature
    map other than elu + 1, the normaliser state not reset with the document."""
    q, k, v = _normal(B, T, N, P), _normal(B, T, N, P), _normal(B, T, N, H)
    o, s = linear.linear_attention(q, k, v, mode=mode, chunk_size=CHUNK, segment_ids=SEGMENTS,
                                   return_final_state=True)
    _assert_close(o, linear_attention_oracle(q, k, v, linear.variants.DEFAULT_EPS))
    assert s.shape == (B, N, P, H + 1)

  @parameterized.product(mode=MODES)
  def test_retention_is_retnet(self, mode):
    """Catches: a wrong decay per head (gamma_n = 1 - 2^(-5-n)), a decay exponent off by one."""
    q, k, v, s0 = _normal(B, T, N, P), _normal(B, T, N, P), _normal(B, T, N, H), _normal(B, N, P, H)
    o = linear.retention(q, k, v, linear.retnet_log_decay(N), mode=mode, chunk_size=CHUNK, initial_state=s0,
                         segment_ids=SEGMENTS)
    _assert_close(o, retention_oracle(q, k, v, s0))

  def test_favor_features_estimate_causal_softmax_attention(self):
    """FAVOR+ (Performer) with 16384 orthogonal random features reproduces causal softmax attention computed in
    float64 to an RMS error of 0.03. Catches: non-Haar orthogonal blocks (QR without the sign fix gives a biased
    estimate, RMS ~0.045 however many features), a wrong |x|^2 / 2 term, a key stabiliser that does not cancel."""
    q, k, v = _normal(B, T, N, P, scale=0.7), _normal(B, T, N, P, scale=0.7), _normal(B, T, N, H)
    w = linear.orthogonal_random_features(jax.random.key(3), 16384, P)
    block = np.asarray(w[:P], np.float64)
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)  # orthogonal rows in a block
    scale = P ** -0.25
    o = linear.linear_attention(linear.favor_features(q * scale, w, is_query=True),
                                linear.favor_features(k * scale, w, is_query=False), v, feature_map_name="identity",
                                mode="chunked", chunk_size=CHUNK)
    scores = np.einsum("btnp,bsnp->bnts", q.astype(np.float64), k) / np.sqrt(P)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bnts,bsnh->btnh", attn / attn.sum(-1, keepdims=True), v)
    assert np.sqrt(np.mean((np.asarray(o, np.float64) - ref) ** 2)) < 0.03

  def test_gla_log_decay_is_the_tau_root_of_a_sigmoid(self):
    x = _normal(3, 4, scale=3.0)
    np.testing.assert_allclose(np.exp(np.asarray(linear.gla_log_decay(x, 16.0), np.float64)),
                               (1.0 / (1.0 + np.exp(-x.astype(np.float64)))) ** (1.0 / 16.0), rtol=1e-6)



def _delta_inputs():
  k = _normal(B, T, N, P)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = (1.0 / (1.0 + np.exp(-_normal(B, T, N)))).astype(np.float32)
  return _normal(B, T, N, P), k, _normal(B, T, N, H), beta, _normal(B, N, P, H)


class DeltaRuleTest(parameterized.TestCase):

  @parameterized.product(mode=MODES)
  def test_forward_and_final_state_match_the_loop(self, mode):
    """Catches: a wrong UT system (e.g. the inclusive instead of the strict lower triangle, beta on the wrong
    side), the incoming state not subtracted from the values, a reset mid-chunk ignored."""
    q, k, v, beta, s0 = _delta_inputs()
    o, s = delta.delta_rule(q, k, v, beta, mode=mode, chunk_size=CHUNK, initial_state=s0, segment_ids=SEGMENTS,
                            return_final_state=True)
    o_ref, s_ref = delta_rule_oracle(q, k, v, beta, s0, SEGMENTS)
    _assert_close(o, o_ref, what="output")
    _assert_close(s, s_ref, what="final state")

  @parameterized.product(mode=("recurrent", "chunked"))
  def test_gradients_match_finite_differences_of_the_loop(self, mode):
    """Catches: a wrong backward through the triangular solve or the rematerialised chunk scan."""
    args = list(_delta_inputs())
    w_o = _normal(B, T, N, H)

    def loss(*a):
      return jnp.sum(delta.delta_rule(*a[:4], mode=mode, chunk_size=CHUNK, initial_state=a[4],
                                      segment_ids=SEGMENTS) * w_o)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)
    for i, grad in enumerate(grads):
      direction = RNG.standard_normal(args[i].shape) * (0.1 if i == 3 else 1.0)
      eps = 1e-5
      shifted = lambda sign: [np.asarray(a, np.float64) + sign * eps * direction if j == i else a  # noqa: E731
                              for j, a in enumerate(args)]
      expected = (np.sum(delta_rule_oracle(*shifted(1), SEGMENTS)[0] * w_o)
                  - np.sum(delta_rule_oracle(*shifted(-1), SEGMENTS)[0] * w_o)) / (2 * eps)
      np.testing.assert_allclose(float(np.sum(np.asarray(grad, np.float64) * direction)), expected, rtol=1e-3,
                                 atol=1e-3, err_msg=f"argument {i}")


def assert_directional_derivatives(loss, oracle_loss, args, small=(), rng=RNG):
  """jax.grad of `loss` along a random direction per argument = float64 central differences of `oracle_loss` (the
  arguments at indices `small` get 10x shorter directions: log-decays, gates)."""
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
  for i, grad in enumerate(grads):
    direction = rng.standard_normal(np.shape(args[i])) * (0.1 if i in small else 1.0)
    eps = 1e-5
    shifted = lambda sign: [np.asarray(a, np.float64) + sign * eps * direction if j == i else a  # noqa: E731
                            for j, a in enumerate(args)]
    expected = (oracle_loss(*shifted(1)) - oracle_loss(*shifted(-1))) / (2 * eps)
    np.testing.assert_allclose(float(np.sum(np.asarray(grad, np.float64) * direction)), expected, rtol=1e-3,
                               atol=1e-3, err_msg=f"argument {i}")


class GatedDeltaRuleTest(parameterized.TestCase):
  """Gated DeltaNet (Yang et al. 2024): the delta rule with a decay a_t = exp(g_t) per head and token."""

  @parameterized.product(mode=MODES)
  def test_forward_and_final_state_match_the_loop(self, mode):
    """Catches: the gate applied after the correction instead of before it, the decay missing from the UT system
    or from the incoming state's read, the chunk's end state decayed from the wrong position, a reset ignored."""
    q, k, v, beta, s0 = _delta_inputs()
    g = -np.abs(_normal(B, T, N))
    o, s = delta.delta_rule(q, k, v, beta, log_decay=g, mode=mode, chunk_size=CHUNK, initial_state=s0,
                            segment_ids=SEGMENTS, return_final_state=True)
    o_ref, s_ref = delta_rule_oracle(q, k, v, beta, s0, SEGMENTS, g)
    _assert_close(o, o_ref, what="output")
    _assert_close(s, s_ref, what="final state")

  @parameterized.product(mode=MODES)
  def test_gradients_match_finite_differences_of_the_loop(self, mode):
    """Catches: a wrong backward through the decays (e.g. a gradient through a masked exp), the triangular solve or
    the chunk scan — directional derivatives w.r.t. q, k, v, beta, g and the initial state (output and end state)."""
    args = list(_delta_inputs()) + [-np.abs(_normal(B, T, N))]
    w_o, w_s = _normal(B, T, N, H), _normal(B, N, P, H)

    def loss(q, k, v, beta, s0, g):
      o, s = delta.delta_rule(q, k, v, beta, log_decay=g, mode=mode, chunk_size=CHUNK, initial_state=s0,
                              segment_ids=SEGMENTS, return_final_state=True)
      return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    def oracle_loss(q, k, v, beta, s0, g):
      o, s = delta_rule_oracle(q, k, v, beta, s0, SEGMENTS, g)
      return np.sum(o * w_o) + np.sum(s * w_s)

    assert_directional_derivatives(loss, oracle_loss, args, small=(3, 5))

  def test_steps_equal_the_sequence(self):
    """Catches: a decoding step that decays after the correction (or not at all)."""
    q, k, v, beta, s0 = _delta_inputs()
    g = -np.abs(_normal(B, T, N))
    o_all = delta.delta_rule(q, k, v, beta, log_decay=g, mode="chunked", chunk_size=CHUNK, initial_state=s0)
    state = s0
    for t in range(T):
      o_t, state = jax.jit(delta.delta_rule_step)(q[:, t], k[:, t], v[:, t], beta[:, t], state, g[:, t])
      _assert_close(o_t, np.asarray(o_all[:, t], np.float64), what=f"step {t}")


if __name__ == "__main__":
  pytest.main([__file__])
