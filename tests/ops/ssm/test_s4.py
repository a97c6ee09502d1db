"""S4D (convolution = recurrence = steps) and S5 (associative scan = sequential = steps), with resets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import ssm

ATOL = 2e-5


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def s4d_params(width=3, half_state=4, seed=0):
  return dict(
      log_dt=jnp.asarray(np.log(np.linspace(0.01, 0.3, width)), jnp.float32),
      a_re=-0.5 + 0.1 * normal(seed, width, half_state),
      a_im=jnp.asarray(np.pi * np.arange(half_state) * np.ones((width, 1)), jnp.float32),
      c_re=normal(seed + 1, width, half_state), c_im=normal(seed + 2, width, half_state),
      D=normal(seed + 3, width))


def s4d_apply(params, u, method, form, **kw):
  A = params["a_re"] + 1j * params["a_im"]
  dA, scale = ssm.discretize(A, jnp.exp(params["log_dt"])[:, None], method)
  dB = scale * jnp.ones_like(A)
  C = params["c_re"] + 1j * params["c_im"]
  if form == "conv":
    return ssm.s4d_conv(u, dA, dB, C, params["D"])
  return ssm.s4d_recurrent(u, dA, dB, C, params["D"], mode=form, **kw)


def assert_close(a, b, what="", atol=ATOL):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  np.testing.assert_allclose(a, b, rtol=0, atol=atol * max(1.0, float(np.max(np.abs(b)))), err_msg=what)


def test_causal_fft_conv_equals_direct_sum():
  u = np.asarray(normal(1, 2, 11, 3))
  k = np.asarray(normal(2, 3, 11))
  expected = np.zeros_like(u)
  for t in range(11):
    for s in range(t + 1):
      expected[:, t] += k[:, t - s] * u[:, s]
  assert_close(ssm.causal_fft_conv(jnp.asarray(u), jnp.asarray(k)), expected)


@pytest.mark.parametrize("method", ssm.DISCRETIZATIONS)
def test_s4d_convolution_equals_recurrence_forward_and_gradients(method):
  params = s4d_params()
  u = normal(7, 2, 23, 3)
  w = normal(8, 2, 23, 3)
  results = {}
  for form in ("conv", "parallel", "sequential"):
    loss = lambda p, u: jnp.sum(s4d_apply(p, u, method, form) * w)
    results[form] = (jax.jit(functools.partial(s4d_apply, method=method, form=form))(params, u),
                     jax.jit(jax.grad(loss, argnums=(0, 1)))(params, u))
  y_conv, g_conv = results["conv"]
  for form in ("parallel", "sequential"):
    y, g = results[form]
    assert_close(y, y_conv, f"y {form}")
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_conv)):
      assert_close(a, b, f"grad {form}", atol=1e-4)


def test_s4d_steps_equal_convolution_and_bfloat16():
  params = s4d_params(seed=1)
  u = normal(3, 2, 9, 3)
  conv = jax.jit(functools.partial(s4d_apply, method="zoh", form="conv"))
  y_conv = conv(params, u)
  A = params["a_re"] + 1j * params["a_im"]
  dA, scale = ssm.discretize(A, jnp.exp(params["log_dt"])[:, None])
  C = params["c_re"] + 1j * params["c_im"]
  h = jnp.zeros((2, 3, 4), jnp.complex64)
  step = jax.jit(ssm.s4d_step)
  for t in range(9):
    y_t, h = step(u[:, t], dA, scale, C, params["D"], h)
    assert_close(y_t, y_conv[:, t], f"step {t}")
  y16 = conv(params, u.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert_close(y16, y_conv, "bfloat16", atol=2e-2)


@pytest.mark.parametrize("mode", ssm.RECURRENT_MODES)
def test_s4d_resets_equal_separate_convolutions(mode):
  params = s4d_params(seed=2)
  u = normal(4, 1, 15, 3)
  cut = [0, 6, 7, 15]
  seg = jnp.asarray(np.repeat([1, 2, 3], np.diff(cut)))[None]
  y = jax.jit(functools.partial(s4d_apply, method="zoh", form=mode))(params, u, segment_ids=seg)
  conv = jax.jit(functools.partial(s4d_apply, method="zoh", form="conv"))
  for lo, hi in zip(cut[:-1], cut[1:]):
    assert_close(y[:, lo:hi], conv(params, u[:, lo:hi]), f"{lo}:{hi}")


def s5_params(width=3, state=6, seed=0):
  return dict(
      lam_re=-0.5 + 0.1 * normal(seed, state), lam_im=normal(seed + 1, state),
      b=normal(seed + 2, state, width, 2) / 3, c=normal(seed + 3, width, state, 2) / 3,
      log_dt=jnp.asarray(np.log(np.linspace(0.01, 0.2, state)), jnp.float32), D=normal(seed + 4, width))


def s5_operands(p, method):
  dlam, scale = ssm.discretize(p["lam_re"] + 1j * p["lam_im"], jnp.exp(p["log_dt"]), method)
  dB = scale[:, None] * (p["b"][..., 0] + 1j * p["b"][..., 1])
  return dlam, dB, p["c"][..., 0] + 1j * p["c"][..., 1], p["D"]


@pytest.mark.parametrize("method", ssm.DISCRETIZATIONS)
def test_s5_parallel_equals_sequential_equals_steps(method):
  params = s5_params()
  u = normal(5, 2, 17, 3)
  h0 = (normal(6, 2, 6) + 0j).astype(jnp.complex64)
  seg = jnp.asarray([[0] * 9 + [1] * 8, [0] * 17])

  def run(p, u, mode):
    return ssm.s5_scan(u, *s5_operands(p, method), mode=mode, initial_state=h0, segment_ids=seg,
                       return_final_state=True)

  def loss(p, u, mode):
    y, h = run(p, u, mode)
    return jnp.sum(y * jnp.cos(u)) + jnp.sum(jnp.abs(h) ** 2)

  (y_par, h_par), (y_seq, h_seq) = (jax.jit(run, static_argnums=2)(params, u, m) for m in ("parallel", "sequential"))
  assert_close(y_par, y_seq, "y")
  assert_close(jnp.abs(h_par - h_seq), jnp.zeros(h_par.shape), "state")
  g_par, g_seq = (jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, u, m)
                  for m in ("parallel", "sequential"))
  for a, b in zip(jax.tree.leaves(g_par), jax.tree.leaves(g_seq)):
    assert_close(a, b, "grad", atol=1e-4)
  # Steps over the second batch row (no resets) equal the scan.
  dlam, dB, C, D = jax.jit(s5_operands, static_argnums=1)(params, method)
  h = h0
  step = jax.jit(ssm.s5_step)
  for t in range(17):
    y_t, h = step(u[:, t], dlam, dB, C, D, h)
    assert_close(y_t[1], y_par[1, t], f"step {t}")


@pytest.mark.parametrize("mode", ssm.RECURRENT_MODES)
def test_s5_resets_equal_separate_runs(mode):
  params = s5_params(seed=4)
  u = normal(9, 1, 13, 3)
  cut = [0, 5, 6, 13]
  seg = jnp.asarray(np.repeat([7, 3, 5], np.diff(cut)))[None]
  operands = s5_operands(params, "zoh")
  run = jax.jit(functools.partial(ssm.s5_scan, mode=mode))
  y = run(u, *operands, segment_ids=seg)
  for lo, hi in zip(cut[:-1], cut[1:]):
    assert_close(y[:, lo:hi], run(u[:, lo:hi], *operands), f"{lo}:{hi}")


@pytest.mark.parametrize("form", ("conv",) + ssm.RECURRENT_MODES)
def test_s4d_is_causal(form):
  params = s4d_params(seed=5)
  u = normal(2, 1, 10, 3)
  t = 4
  g = np.asarray(jax.jit(jax.grad(lambda u: jnp.sum(s4d_apply(params, u, "zoh", form)[:, t])))(u))
  # The FFT convolution's gradient to the future is round-off (~1e-8 of the largest), not exactly zero.
  bound = 1e-6 * np.max(np.abs(g)) if form == "conv" else 0.0
  assert np.all(np.abs(g[:, t + 1:]) <= bound)
  assert np.all(np.any(g[:, :t + 1] != 0.0, axis=-1))


@pytest.mark.parametrize("mode", ssm.RECURRENT_MODES)
def test_s5_is_causal(mode):
  params = s5_params(seed=3)
  u = normal(1, 1, 10, 3)
  g = jax.jit(jax.grad(lambda u: jnp.sum(ssm.s5_scan(u, *s5_operands(params, "zoh"), mode=mode)[:, 4])))(u)
  assert np.all(np.asarray(g[:, 5:]) == 0.0) and np.any(np.asarray(g[:, :5]) != 0.0)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="method"):
    ssm.discretize(jnp.ones(3) * (-1 + 0j), jnp.ones(3), "euler")
  with pytest.raises(ValueError, match="s5_scan"):
    ssm.s5_scan(jnp.ones((1, 4, 3)), jnp.ones(5, jnp.complex64), jnp.ones((5, 2), jnp.complex64),
                jnp.ones((3, 5), jnp.complex64))
  with pytest.raises(ValueError, match="causal_fft_conv"):
    ssm.causal_fft_conv(jnp.ones((1, 4, 3)), jnp.ones((2, 4)))
  dA = jnp.ones((3, 4), jnp.complex64)
  with pytest.raises(ValueError, match="s4d_kernel"):
    ssm.s4d_kernel(dA, dA, jnp.ones((3, 5), jnp.complex64), 8)
  with pytest.raises(ValueError, match="s4d_recurrent: dA"):
    ssm.s4d_recurrent(jnp.ones((1, 4, 2)), dA, dA, dA)
  with pytest.raises(ValueError, match="s4d_recurrent: segment_ids"):
    ssm.s4d_recurrent(jnp.ones((1, 4, 3)), dA, dA, dA, segment_ids=jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="s5_scan: segment_ids"):
    ssm.s5_scan(jnp.ones((1, 4, 3)), jnp.ones(5, jnp.complex64), jnp.ones((5, 3), jnp.complex64),
                jnp.ones((3, 5), jnp.complex64), segment_ids=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="diagonal_recurrence"):
    ssm.diagonal_recurrence(jnp.ones((1, 4, 2)), jnp.ones((1, 4, 2)), jnp.zeros((1, 2)), jnp.ones((1, 4)),
                            mode="chunked")
