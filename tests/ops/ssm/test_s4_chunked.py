"""`s4d_chunked` against a float64 NumPy loop of the S4D recurrence (no code shared with seqjax.ops.ssm).

The oracle discretises by zero-order hold itself (dA = exp(dt A), dB = (dA - 1) / A, B = 1), runs
h_t = dA h_{t-1} + dB u_t, y_t = 2 Re(sum_p C h_t) + D u_t per channel, zeroes h before every position whose segment
id differs from the previous one's (position 0 continues from the initial state) and returns the state after the
last position. Gradients are checked as directional derivatives against float64 central differences of the oracle,
and leaf by leaf against autodiff of the sequential recurrence.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax.ops import ssm

E, P = 3, 4
LENGTH = 13
# Row 0: resets on a chunk start for C = 4 (4), mid-chunk (7, 10); row 1: no reset (the initial state runs through
# every chunk); row 2: resets at 1, at the last position, and on the start of the last chunk for C = 4 and 6 (12).
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4],
                     [5] * 13,
                     [1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3]], np.int32)


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return dict(log_dt=np.log(np.linspace(0.05, 0.6, E)), a_re=-0.3 - 0.2 * rng.random((E, P)),
              a_im=np.pi * np.arange(P) * np.ones((E, 1)) + 0.3 * rng.standard_normal((E, P)),
              c_re=rng.standard_normal((E, P)), c_im=rng.standard_normal((E, P)), D=rng.standard_normal(E))


def oracle(params, u, h0, seg):
  """float64: y [B, T, E] and the final state [B, E, P] (complex128), one channel and mode at a time."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  u = np.asarray(u, np.float64)
  h0 = np.asarray(h0, np.complex128)
  A = p["a_re"] + 1j * p["a_im"]
  dA = np.exp(np.exp(p["log_dt"])[:, None] * A)
  dB = (dA - 1.0) / A
  C = p["c_re"] + 1j * p["c_im"]
  nb, nl, _ = u.shape
  y = np.zeros(u.shape)
  h_end = np.zeros((nb, E, P), np.complex128)
  for b in range(nb):
    h = h0[b].copy()
    for t in range(nl):
      if t > 0 and seg[b, t] != seg[b, t - 1]:
        h = np.zeros_like(h)
      for e in range(E):
        for k in range(P):
          h[e, k] = dA[e, k] * h[e, k] + dB[e, k] * u[b, t, e]
        y[b, t, e] = 2.0 * sum(C[e, k] * h[e, k] for k in range(P)).real + p["D"][e] * u[b, t, e]
    h_end[b] = h
  return y, h_end


def operands(params):
  A = params["a_re"] + 1j * params["a_im"]
  dA, scale = ssm.discretize(A, jnp.exp(params["log_dt"])[:, None], "zoh")
  return dA, scale * jnp.ones_like(A), params["c_re"] + 1j * params["c_im"], params["D"]


def chunked(params, u, h0, seg, chunk):
  return ssm.s4d_chunked(u, *operands(params), segment_ids=seg, initial_state=h0, return_final_state=True,
                         chunk=chunk)


def inputs(seed=1):
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((3, LENGTH, E))
  h0 = rng.standard_normal((3, E, P)) + 1j * rng.standard_normal((3, E, P))
  return u, h0


def as_jax(params, u, h0):
  return ({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, jnp.asarray(u, jnp.float32),
          jnp.asarray(h0, jnp.complex64))


def loss_weights(seed=2):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((3, LENGTH, E)), rng.standard_normal((3, E, P)) + 1j * rng.standard_normal((3, E, P))


class S4dChunkedTest(parameterized.TestCase):

  @parameterized.named_parameters(("c1", 1), ("c4", 4), ("c5", 5), ("c6", 6), ("c13", 13), ("c64", 64))
  def test_forward_and_end_state_equal_the_float64_loop(self, chunk):
    params = make_params()
    u, h0 = inputs()
    y_ref, h_ref = oracle(params, u, h0, SEGMENTS)
    y, h = jax.jit(chunked, static_argnums=4)(*as_jax(params, u, h0), jnp.asarray(SEGMENTS), chunk)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=0, atol=2e-5 * np.max(np.abs(y_ref)))
    np.testing.assert_allclose(np.asarray(h), h_ref, rtol=0, atol=2e-5 * np.max(np.abs(h_ref)))
    # No reset mask: the rows differ from the oracle (the test sees resets), and without the initial state.
    y_flat = jax.jit(chunked, static_argnums=4)(*as_jax(params, u, h0), None, chunk)[0]
    assert np.max(np.abs(np.asarray(y_flat)[0] - y_ref[0])) > 0.05 * np.max(np.abs(y_ref))

  @parameterized.named_parameters(("c4", 4), ("c5", 5))
  def test_gradients_equal_float64_differences_and_the_sequential_recurrence(self, chunk):
    params = make_params(seed=3)
    u, h0 = inputs(seed=4)
    w_y, w_h = loss_weights()
    seg = jnp.asarray(SEGMENTS)

    def loss_jax(p, u, h0, form):
      if form == "chunked":
        y, h = chunked(p, u, h0, seg, chunk)
      else:
        y, h = ssm.s4d_recurrent(u, *operands(p), mode="sequential", segment_ids=seg, initial_state=h0,
                                 return_final_state=True)
      return jnp.sum(y * w_y) + jnp.sum((h * jnp.conj(jnp.asarray(w_h, jnp.complex64))).real)

    def loss_np(p, u):
      y, h = oracle(p, u, h0, SEGMENTS)
      return np.sum(y * w_y) + np.sum((h * np.conj(w_h)).real)

    grad = jax.jit(jax.grad(loss_jax, argnums=(0, 1)), static_argnums=3)
    g_p, g_u = grad(*as_jax(params, u, h0), "chunked")
    rng = np.random.default_rng(5)
    for _ in range(3):
      v_p = {k: rng.standard_normal(np.shape(x)) for k, x in params.items()}
      v_u = rng.standard_normal(u.shape)
      eps = 1e-5
      plus = loss_np({k: params[k] + eps * v_p[k] for k in params}, u + eps * v_u)
      minus = loss_np({k: params[k] - eps * v_p[k] for k in params}, u - eps * v_u)
      fd = (plus - minus) / (2 * eps)
      ad = sum(np.sum(np.asarray(g_p[k], np.float64) * v_p[k]) for k in params) + np.sum(np.asarray(g_u) * v_u)
      np.testing.assert_allclose(ad, fd, rtol=1e-3, atol=1e-3)
    s_p, s_u = grad(*as_jax(params, u, h0), "sequential")
    for a, b in zip(jax.tree.leaves((g_p, g_u)), jax.tree.leaves((s_p, s_u))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * max(1.0, np.max(np.abs(b))))

  def test_gradient_to_the_initial_state(self):
    params = make_params(seed=6)
    u, h0 = inputs(seed=7)
    seg = jnp.asarray(SEGMENTS)
    p, u32, h0c = as_jax(params, u, h0)

    def loss(h0, form):
      if form == "chunked":
        y, h = chunked(p, u32, h0, seg, 4)
      else:
        y, h = ssm.s4d_recurrent(u32, *operands(p), mode=form, segment_ids=seg, initial_state=h0,
                                 return_final_state=True)
      return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.abs(h) ** 2)

    g, g_ref = (jax.jit(jax.grad(loss), static_argnums=1)(h0c, form) for form in ("chunked", "sequential"))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=0, atol=1e-4 * np.max(np.abs(g_ref)))

  def test_causal_and_bfloat16(self):
    params = make_params(seed=8)
    p, u, _ = as_jax(params, *inputs(seed=9))
    t = 6
    run = jax.jit(lambda u: ssm.s4d_chunked(u, *operands(p), segment_ids=SEGMENTS, chunk=4))
    g = jax.jit(jax.grad(lambda u: jnp.sum(run(u)[:, t])))(u)
    g = np.asarray(g)
    for row, start in enumerate((4, 0, 1)):  # the start of position t's segment: nothing earlier reaches t
      assert np.all(g[row, t + 1:] == 0.0) and np.all(g[row, :start] == 0.0)
      assert np.all(np.any(g[row, start:t + 1] != 0.0, axis=-1))
    y16 = run(u.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    y32 = run(u.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0,
                               atol=1e-2 * np.max(np.abs(np.asarray(y32))))

  def test_bad_input_raises(self):
    dA = jnp.ones((3, 4), jnp.complex64)
    u = jnp.ones((2, 8, 3))
    with pytest.raises(ValueError, match="s4d_chunked: u must be"):
      ssm.s4d_chunked(jnp.ones((8, 3)), dA, dA, dA)
    with pytest.raises(ValueError, match="s4d_chunked: dA, dB, C"):
      ssm.s4d_chunked(u, dA, dA, jnp.ones((3, 5), jnp.complex64))
    with pytest.raises(ValueError, match="s4d_chunked: segment_ids"):
      ssm.s4d_chunked(u, dA, dA, dA, segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="s4d_chunked: initial_state"):
      ssm.s4d_chunked(u, dA, dA, dA, initial_state=jnp.zeros((2, 3, 5), jnp.complex64))
    with pytest.raises(ValueError, match="s4d_chunked: chunk"):
      ssm.s4d_chunked(u, dA, dA, dA, chunk=0)


def test_context_parallel_shards_run_the_chunked_form():
  """`s4d_context_parallel(mode="chunked")` on (data 2, seq 4) shards = the float64 loop over the whole sequence."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from seqjax.ops.ssm import context_parallel as cp  # pylint: disable=import-outside-toplevel
  from tests.ops.ssm import test_context_parallel as cpt  # pylint: disable=import-outside-toplevel
  args = cpt._inputs("s4d")  # pylint: disable=protected-access
  want_y, want_h = cpt._oracle("s4d", args)  # pylint: disable=protected-access

  def body(*a):
    *a, seg = a
    y, h = cp.s4d_context_parallel(*cpt._complex_operands(a), segment_ids=seg,  # pylint: disable=protected-access
                                   return_final_state=True, mode="chunked")
    return y, h[None]

  seq = P("data", "seq")
  specs = (seq,) + (P(),) * (len(args) - 1) + (seq,)
  y, h_R = jax.jit(jax.shard_map(body, mesh=cpt._mesh("data2_seq4"), in_specs=specs,  # pylint: disable=protected-access
                                 out_specs=(seq, P("seq", "data"))))(*args, jnp.asarray(cpt.SEGMENTS))
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=0, atol=5e-5 * max(1.0, np.max(np.abs(want_y))))
  np.testing.assert_allclose(np.asarray(h_R[-1]), want_h, rtol=0, atol=5e-5 * max(1.0, np.max(np.abs(want_h))))


def test_fwd_and_bwd_never_hold_the_states_of_every_position():
  """XLA's memory analysis of the gradient program: below a third of one complex [B, T, E, P] tensor (what the
  associative scan materialises several times).

  Catches: the chunk step without `jax.checkpoint` (autodiff keeps every chunk's masked Toeplitz), all chunks'
  in-chunk products at once.
  """
  b, length, e, p = 2, 1024, 16, 32
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.standard_normal((b, length, e)), jnp.float32)
  seg = jnp.asarray(np.cumsum(rng.random((b, length)) < 0.02, axis=1), jnp.int32)
  dA, dB, C, D = operands({k: jnp.asarray(np.resize(v, (e, p)) if np.ndim(v) == 2 else np.resize(v, e),
                                          jnp.float32) for k, v in make_params().items()})
  loss = lambda u, dA, dB, C: jnp.sum(ssm.s4d_chunked(u, dA, dB, C, D, segment_ids=seg, chunk=16) * jnp.cos(u))
  temp = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(u, dA, dB, C).compile().memory_analysis()
  states = b * length * e * p * 8
  assert temp.temp_size_in_bytes < states / 3, (temp.temp_size_in_bytes, states)  # 1.8 MB of 8.4 (4.6 no remat)
