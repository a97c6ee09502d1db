"""The mixture-of-experts ops (seqjax.ops.moe) against float64 NumPy written from the papers' definitions, and their
gradients against an independently written dense mixture (every expert on every token, masked by the choices).

* routing: softmax of float32 logits, the top-k by probability, gates = the probability (top-1, Switch) or the top-k
  probabilities renormalised to sum 1;
* the Switch load-balancing loss J * sum_j f_j P_j (1 for uniform routing, J for full collapse, exactly) and the
  router z-loss mean(logsumexp(logits)^2);
* dropless dispatch = sum_a gate_a * expert_{e_a}(x) for every token;
* capacity dispatch: per row, (token, choice) assignments in token order take the next slot of their expert while it
  has one of Q = min(T, max(1, ceil(cf * T * A / J))); the others contribute nothing.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax.ops import moe

B, T, D, J, F = 2, 12, 8, 4, 6
HI = jax.lax.Precision.HIGHEST


_RNG = [np.random.default_rng(0)]


def _normal(*shape, scale=1.0):
  return (scale * _RNG[0].standard_normal(shape)).astype(np.float32)


class _Seeded(parameterized.TestCase):
  """Every test draws from its own generator seeded 0 (the same draws in every order and pytest-xdist worker)."""

  def setUp(self):
    super().setUp()
    _RNG[0] = np.random.default_rng(0)


def _act(name, x):
  if name == "gelu":
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
  return x / (1.0 + np.exp(-x))  # silu


def _np_route(x, w, k):
  logits = x.astype(np.float64) @ w.astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
  gates = np.take_along_axis(probs, experts, -1)
  if k > 1:
    gates = gates / gates.sum(-1, keepdims=True)
  return logits, probs, experts, gates


def _np_expert(x, j, params, kind, activation):
  wi, wo, wg = (None if p is None else p.astype(np.float64) for p in params)
  h = x @ wi[j]
  h = _act(activation, h) if kind == "mlp" else _act(activation, x @ wg[j]) * h
  return h @ wo[j]


def _np_keep(experts, slots, valid):
  """keep[b, t, a]: whether assignment (t, a) of row b got one of its expert's `slots` slots, in token order."""
  keep = np.zeros(experts.shape, bool)
  for b in range(experts.shape[0]):
    used = np.zeros(J, int)
    for t in range(experts.shape[1]):
      for a in range(experts.shape[2]):
        if valid[b, t] and used[experts[b, t, a]] < slots:
          keep[b, t, a] = True
          used[experts[b, t, a]] += 1
  return keep


def _np_mixture(x, experts, gates, keep, params, kind, activation):
  y = np.zeros(x.shape, np.float64)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for a in range(experts.shape[2]):
        if keep[b, t, a]:
          y[b, t] += gates[b, t, a] * _np_expert(x[b, t].astype(np.float64), experts[b, t, a], params, kind,
                                                 activation)
  return y


def _params(kind):
  return (_normal(J, D, F, scale=D ** -0.5), _normal(J, F, D, scale=F ** -0.5),
          _normal(J, D, F, scale=D ** -0.5) if kind == "gated" else None)


def _dense_reference(x, w_router, params, top_k, kind, activation, keep):
  """Every expert on every token, combined with weights sum_a onehot(e_a) * gate_a * keep_a: the mixture written
  without sorting, scattering or buffers (and a routing of its own), for gradients."""
  logits = jnp.einsum("btd,dj->btj", x, w_router, precision=HI)
  probs = jax.nn.softmax(logits, -1)
  order = jnp.argsort(-probs, axis=-1)[..., :top_k]
  gates = jnp.take_along_axis(probs, order, -1)
  gates = gates / jnp.sum(gates, -1, keepdims=True) if top_k > 1 else gates
  combine = jnp.sum(jax.nn.one_hot(order, J) * (gates * keep)[..., None], axis=2)  # [B, T, J]
  act = {"gelu": lambda v: jax.nn.gelu(v, approximate=True), "silu": jax.nn.silu}[activation]
  wi, wo, wg = params
  h = jnp.einsum("btd,jdf->btjf", x, wi, precision=HI)
  h = act(h) if wg is None else act(jnp.einsum("btd,jdf->btjf", x, wg, precision=HI)) * h
  out = jnp.einsum("btjf,jfd->btjd", h, wo, precision=HI)
  return jnp.einsum("btj,btjd->btd", combine, out, precision=HI)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _run(dispatch, x, w_router, params, top_k, activation, cf, valid=None):
  r = moe.route(x, w_router, top_k, valid)
  weights = moe.ExpertWeights(*params)
  if dispatch == "dropless":
    return moe.dropless_moe(x, r, weights, activation=activation)
  return moe.capacity_moe(x, r, weights, activation=activation, capacity_factor=cf, valid_BT=valid)[0]


class RoutingTest(_Seeded):

  @parameterized.named_parameters(("top1", 1), ("top2", 2), ("top3", 3))
  def test_route_matches_numpy(self, top_k):
    """Catches: gates not renormalised for k > 1 (or renormalised for k = 1), the wrong experts, logits not float32."""
    x, w = _normal(B, T, D), _normal(D, J)
    r = moe.route(jnp.asarray(x, jnp.bfloat16), w, top_k)
    self.assertEqual(r.logits_BTJ.dtype, jnp.float32)
    r = moe.route(x, w, top_k)
    logits, probs, experts, gates = _np_route(x, w, top_k)
    np.testing.assert_allclose(r.logits_BTJ, logits, atol=1e-5)
    np.testing.assert_allclose(r.probs_BTJ, probs, atol=1e-6)
    np.testing.assert_array_equal(r.experts_BTA, experts)
    np.testing.assert_allclose(r.gates_BTA, gates, atol=1e-6)

  def test_uniform_routing_gives_load_balance_loss_one(self):
    """f_j = P_j = 1/J gives exactly 1 (catches a missing factor J or a mean where a sum belongs)."""
    probs = jnp.full((B, T, J), 1.0 / J)
    experts = jnp.broadcast_to((jnp.arange(T * 2) % J).reshape(1, T, 2), (B, T, 2)).astype(jnp.int32)
    self.assertEqual(float(moe.load_balance_loss(probs, experts)), 1.0)
    self.assertEqual(float(moe.load_balance_loss(probs, experts[..., :1])), 1.0)

  def test_full_collapse_gives_load_balance_loss_num_experts(self):
    probs = jnp.zeros((B, T, J)).at[..., 0].set(1.0)
    self.assertEqual(float(moe.load_balance_loss(probs, jnp.zeros((B, T, 1), jnp.int32))), float(J))

  def test_load_balance_and_z_loss_match_numpy_with_padding(self):
    """Catches: padding counted in f, P or the z-loss mean; the wrong normaliser of f for top-k."""
    x, w = _normal(B, T, D), _normal(D, J)
    valid = np.ones((B, T), bool)
    valid[0, 7:] = False
    logits, probs, experts, _ = _np_route(x, w, 2)
    r = moe.route(x, w, 2, valid)
    v = valid.reshape(-1)
    f = np.bincount(experts.reshape(-1, 2)[v].reshape(-1), minlength=J) / (v.sum() * 2)
    p = probs.reshape(-1, J)[v].mean(0)
    np.testing.assert_allclose(moe.load_balance_loss(r.probs_BTJ, r.experts_BTA, valid), J * np.sum(f * p),
                               rtol=1e-5)
    lse = np.log(np.sum(np.exp(logits), -1)).reshape(-1)[v]
    np.testing.assert_allclose(moe.router_z_loss(r.logits_BTJ, valid), np.mean(lse ** 2), rtol=1e-5)
    self.assertTrue(np.all(np.asarray(r.gates_BTA)[~valid] == 0))

  def test_load_balance_gradient_flows_through_probabilities(self):
    """d loss / d P_j(token) = J f_j / N: the count f carries no gradient, P does."""
    probs = jax.nn.softmax(jnp.asarray(_normal(B, T, J)), -1)
    experts = jax.lax.top_k(probs, 1)[1]
    grad = jax.grad(moe.load_balance_loss)(probs, experts)
    f = np.bincount(np.asarray(experts).reshape(-1), minlength=J) / (B * T)
    np.testing.assert_allclose(grad, np.broadcast_to(J * f / (B * T), (B, T, J)), rtol=1e-6)

  def test_bad_top_k_is_refused(self):
    with self.assertRaisesRegex(ValueError, "top_k=5 must be between 1 and the number of experts"):
      moe.route(_normal(B, T, D), _normal(D, J), 5)


class DispatchTest(_Seeded):

  @parameterized.product(dispatch=("dropless", "capacity"), top_k=(1, 2), kind=("mlp", "gated"))
  def test_forward_matches_numpy_dense_mixture(self, dispatch, top_k, kind):
    """Dropless (and capacity with room for every assignment) = sum_a gate_a expert_{e_a}(x) in float64. Catches:
    unsorting with the sort order instead of its inverse, a token sent to the wrong expert, gates applied twice."""
    x, w = _normal(B, T, D), _normal(D, J)
    params = _params(kind)
    _, _, experts, gates = _np_route(x, w, top_k)
    want = _np_mixture(x, experts, gates, np.ones(experts.shape, bool), params, kind, "gelu")
    got = _run(dispatch, x, w, params, top_k, "gelu", cf=float(J))  # Q = T: nothing dropped.
    np.testing.assert_allclose(got, want, atol=2e-5)

  @parameterized.product(top_k=(1, 2), cf=(0.5, 1.0, 1.25))
  def test_capacity_drops_exactly_the_assignments_over_capacity_in_order(self, top_k, cf):
    """Catches: slots counted from 1, choices given priority over tokens (all first choices before second ones),
    padding tokens taking slots, the dropped fraction miscounted."""
    x, w = _normal(B, T, D), _normal(D, J, scale=3.0)  # A peaked router: experts overflow.
    valid = np.ones((B, T), bool)
    valid[1, :3] = False
    params = _params("mlp")
    _, _, experts, gates = _np_route(x, w, top_k)
    slots = min(T, max(1, math.ceil(cf * T * top_k / J)))
    self.assertEqual(moe.capacity(T, J, top_k, cf), slots)
    keep = _np_keep(experts, slots, valid)
    want = _np_mixture(x, experts, gates, keep, params, "mlp", "silu")
    r = moe.route(x, w, top_k, valid)
    got, dropped = moe.capacity_moe(x, r, moe.ExpertWeights(*params), activation="silu", capacity_factor=cf,
                                    valid_BT=valid)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assigned = valid.sum() * top_k
    np.testing.assert_allclose(float(dropped), 1 - keep.sum() / assigned, rtol=1e-5)
    self.assertGreater(float(dropped), 0.0)

  def test_collapsed_router_keeps_the_first_tokens(self):
    """Every token to expert 0 (top-1): the first Q tokens of each row get its output, the rest exactly 0."""
    x = _normal(B, T, D)
    w = np.zeros((D, J), np.float32)
    r = moe.Routing(jnp.zeros((B, T, J)), jnp.full((B, T, J), 0.25), jnp.zeros((B, T, 1), jnp.int32),
                    jnp.ones((B, T, 1)))
    del w
    params = _params("mlp")
    y, dropped = moe.capacity_moe(x, r, moe.ExpertWeights(*params), capacity_factor=1.0)
    slots = math.ceil(T / J)
    want = _np_mixture(x, np.zeros((B, T, 1), int), np.ones((B, T, 1)), np.broadcast_to(np.arange(T)[None, :, None] < slots, (B, T, 1)),
                       params, "mlp", "gelu")
    np.testing.assert_allclose(y, want, atol=2e-5)
    self.assertTrue(np.all(np.asarray(y)[:, slots:] == 0))
    self.assertAlmostEqual(float(dropped), 1 - slots / T, places=6)

  @parameterized.product(dispatch=("dropless", "capacity"), top_k=(1, 2), kind=("mlp", "gated"))
  def test_gradients_match_an_independent_dense_mixture(self, dispatch, top_k, kind):
    """Gradients w.r.t. x, the router and every expert weight (through the gates, the dispatch and the unsort)
    = those of every expert on every token masked by the choices. With capacity, cf=1 drops assignments, and the
    reference masks the same ones (the NumPy keep)."""
    x, w = _normal(B, T, D), _normal(D, J)
    params = _params(kind)
    cf = 1.0
    _, _, experts, _ = _np_route(x, w, top_k)
    keep = (np.ones(experts.shape, bool) if dispatch == "dropless" else
            _np_keep(experts, moe.capacity(T, J, top_k, cf), np.ones((B, T), bool)))
    if dispatch == "capacity":
      self.assertFalse(keep.all())
    cot = _normal(B, T, D)
    names = ("x", "router", "wi", "wo", "wg")

    def loss(fn):
      def f(x, w, wi, wo, wg):
        return jnp.sum(fn(x, w, (wi, wo, wg)) * cot)
      return f

    argnums = (0, 1, 2, 3, 4) if kind == "gated" else (0, 1, 2, 3)
    got = jax.jit(jax.grad(loss(lambda x, w, p: _run(dispatch, x, w, p, top_k, "gelu", cf)), argnums))(
        x, w, *params)
    want = jax.jit(jax.grad(loss(lambda x, w, p: _dense_reference(x, w, p, top_k, kind, "gelu", keep)), argnums))(
        x, w, *params)
    for name, g, r in zip(names, got, want):
      np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4, err_msg=name)

  def test_bfloat16_within_tolerance_of_float32(self):
    x, w = _normal(B, T, D), _normal(D, J)
    params = _params("gated")
    ref = _run("dropless", x, w, params, 2, "gelu", 0)
    for dispatch in ("dropless", "capacity"):
      low = _run(dispatch, jnp.asarray(x, jnp.bfloat16), w, tuple(jnp.asarray(p, jnp.bfloat16) for p in params), 2,
                 "gelu", float(J))
      self.assertEqual(low.dtype, jnp.bfloat16)
      np.testing.assert_allclose(np.asarray(low, np.float32), ref, atol=0.05 * float(np.abs(ref).max()))

  def test_bad_shapes_are_refused(self):
    x, w = _normal(B, T, D), _normal(D, J)
    r = moe.route(x, w, 2)
    bad = moe.ExpertWeights(_normal(J, D, F), _normal(J, D, F))
    with self.assertRaisesRegex(ValueError, r"expected wi \[J, D, F\], wo \[J, F, D\]"):
      moe.dropless_moe(x, r, bad)
    with self.assertRaisesRegex(ValueError, "capacity_factor must be positive"):
      moe.capacity(T, J, 2, 0.0)


if __name__ == "__main__":
  pytest.main([__file__])
