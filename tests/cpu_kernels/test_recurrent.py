"""The recurrence CPU kernel (`seqjax.cpu_kernels.recurrent`): against the scan, dispatch, remat, dtypes,
determinism, vmap, sharding, errors.

Its numerics per cell and option are the "native" cases of tests/ops/recurrent/test_recurrent.py; here is what is
particular to the C++ kernel. "on" / "off" below are the CPU-kernel modes (`seqjax.ops.backend`) the ops are traced
under: the C++ kernel (or an error) / the `lax.scan` kernel.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import cpu_kernels
from seqjax.cpu_kernels import recurrent as recurrent_kernel
from seqjax.cpu_kernels.recurrent import recurrence
from seqjax.ops import recurrent
from tests.ops.recurrent.test_recurrent import B, I, LENGTHS, SEGMENTS, _call, _params

needs_native = pytest.mark.skipif(not cpu_kernels.available("recurrent"),
                                  reason="the recurrent CPU kernel is unavailable")


def _loss_and_grads(kind, args, **kw):  # kw: _call's, e.g. mode="on"
  proj = jnp.asarray(np.random.default_rng(1).normal(size=args[0].shape[:2] + (args[3].shape[1],)), jnp.float32)

  def loss(x, states, *w):
    ys, st = _call(kind, x, states, *w, **kw)
    return jnp.sum(ys * proj) + sum(jnp.sum(jnp.sin(s)) for s in st), ys

  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(*args)


@needs_native
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_native_equals_scan_with_uneven_parts(kind):
  """H = 272 = 17 blocks of 16 units: the last part of a step is narrower than the others (on any thread count
  below 3 each part is 32 units); lengths and segment resets together, forward and all gradients."""
  args = _params(kind, seed=9, H=272)
  args = (args[0], args[1], *(a * 0.25 for a in args[2:4]), *args[4:])
  kw = dict(lengths=jnp.asarray(LENGTHS), segment_ids=jnp.asarray(SEGMENTS))
  (_, ys_n), g_n = _loss_and_grads(kind, args, mode="on", **kw)
  (_, ys_s), g_s = _loss_and_grads(kind, args, mode="off", **kw)
  np.testing.assert_allclose(ys_n, ys_s, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_n), jax.tree.leaves(g_s)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@needs_native
def test_native_is_dispatched_on_cpu_only_where_covered():
  args = _params("lstm", H=16)
  text = lambda **kw: jax.jit(jax.grad(lambda x: jnp.sum(_call("lstm", x, *args[1:], **kw)[0]))).lower(
      args[0]).as_text()
  default = text()
  assert "seqjax_rnn_fwd" in default and "seqjax_rnn_bwd" in default
  assert "seqjax_rnn" not in text(mode="off")
  assert "seqjax_rnn_bwd" in text(remat=True)
  narrow = _params("lstm")  # H = 4
  assert "seqjax_rnn" not in jax.jit(lambda x: _call("lstm", x, *narrow[1:])[0]).lower(narrow[0]).as_text()


@needs_native
def test_native_remat_saves_less_and_gives_the_same_gradients():
  """remat=True keeps only the states for the backward (XLA's buffers shrink) and recomputes the activations to
  the same bits as the forward, so the gradients equal the non-remat native ones exactly."""
  args = _params("lstm", seed=6, H=32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 64, I)), jnp.float32)
  (_, ys_a), g_a = _loss_and_grads("lstm", (x,) + args[1:], mode="on")
  (_, ys_b), g_b = _loss_and_grads("lstm", (x,) + args[1:], mode="on", remat=True)
  np.testing.assert_array_equal(ys_a, ys_b)
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_array_equal(a, b)

  def temp_bytes(remat):
    f = jax.grad(lambda x: jnp.sum(_call("lstm", x, *args[1:], remat=remat)[0]))
    return jax.jit(f).lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp_bytes(True) < 0.8 * temp_bytes(False)


@needs_native
def test_native_bfloat16_inputs_float32_weights():
  """bfloat16 activations with float32 weights run natively (in float32) and return bfloat16 ys and dx, equal to
  the float32 run on the same (bfloat16-rounded) inputs to bfloat16 rounding (the float32 kernel is checked against
  the float64 oracle below)."""
  args = _params("lstm", seed=12, H=32)
  xb = jnp.asarray(args[0], jnp.bfloat16)
  ys, _ = _call("lstm", xb, args[1], *args[2:], mode="on")
  ys_ref, _ = _call("lstm", jnp.asarray(xb, jnp.float32), args[1], *args[2:], mode="on")
  assert ys.dtype == jnp.bfloat16
  _assert_bf16_close(ys, ys_ref)
  proj = jnp.asarray(np.random.default_rng(2).normal(size=ys.shape), jnp.bfloat16)  # exact in either dtype
  loss = lambda x, mode: jnp.sum(_call("lstm", x, args[1], *args[2:], mode=mode)[0].astype(jnp.float32) * proj)
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  dx = grad(xb, "on")
  assert dx.dtype == jnp.bfloat16
  _assert_bf16_close(dx, grad(jnp.asarray(xb, jnp.float32), "on"))


def _assert_bf16_close(got, want):
  """A bfloat16 result against the float32 reference computed from the same (bfloat16-rounded) inputs, in units
  of the reference's own scale: relative RMS error below 1%, and every element within 2% of its magnitude plus 2%
  of the reference's RMS (so a result off by a constant factor of 0.9 fails)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  rms = np.sqrt(np.mean(want ** 2))
  err = got - want
  assert np.sqrt(np.mean(err ** 2)) < 1e-2 * rms, f"relative RMS error {np.sqrt(np.mean(err ** 2)) / rms:.3g}"
  bad = np.abs(err) > 2e-2 * (np.abs(want) + rms)
  assert not bad.any(), f"{bad.sum()} elements off by > 2%, worst error {np.abs(err).max():.3g} (RMS {rms:.3g})"


@needs_native
def test_native_is_bitwise_deterministic_and_vmaps():
  args = _params("gru", seed=3, H=64)
  first = _loss_and_grads("gru", args)
  again = _loss_and_grads("gru", args)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  x, (h0,), *w = args
  ys_v = jax.vmap(lambda x, h: recurrent.gru(x[None], h[None], *w)[0][0])(x, h0)
  np.testing.assert_allclose(ys_v, _call("gru", x, (h0,), *w, mode="off")[0], atol=1e-5, rtol=1e-5)


@needs_native
def test_native_sharded_batch_equals_unsharded():
  """On 8 devices with a batch-sharded input: the unsharded result, forward and gradients."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(8, 6, 16)), jnp.float32)
  w = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in [(64, 16), (64, 16), (64,), (64,)]]
  z = jnp.zeros((8, 16))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # noqa: E731
  f = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(recurrent.lstm(x, z, z, *w)[0] ** 2), argnums=(0, 1)))
  got, want = f(put(x), w), f(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_uncovered_input_raises():
  x, states, *w = _params("gru")  # H = 4
  x_TBI = jnp.swapaxes(jnp.asarray(x), 0, 1)
  w_ih, w_hh, b_ih, b_hh = map(jnp.asarray, w)
  with pytest.raises(ValueError, match="H a multiple of 16"):
    recurrence("gru", x_TBI, tuple(map(jnp.asarray, states)), w_ih, b_ih, w_hh, b_hh, None, None)
  x, states, *w = _params("gru", H=16)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in w]
  with pytest.raises(ValueError, match="float32 weights"):
    recurrence("gru", jnp.swapaxes(jnp.asarray(x), 0, 1), tuple(map(jnp.asarray, states)), bf[0], bf[2], bf[1], bf[3],
               None, None)


# ------------------------------------------------------------------------------------------------------------------
# Every native cell against an independent float64 NumPy oracle (forward recurrence and hand-written BPTT), called
# through the binding itself so no dispatch can route it to the scan.
# ------------------------------------------------------------------------------------------------------------------
def _sig(a):
  return 1.0 / (1.0 + np.exp(-a))


def _oracle(cell, x, states, w_ih, b_ih, w_hh, b_hh, dys, dstates):
  """float64 forward and backward of the plain recurrence, time-major x [T, B, I], PyTorch gate order (LSTM i, f, g,
  o; GRU r, z, n with b_hn inside the reset product). Returns (ys, final states, gradients of
  sum(ys * dys) + sum_s sum(state_T[s] * dstates[s]) with respect to x, states, w_ih, b_ih, w_hh, b_hh)."""
  h_n = w_hh.shape[1]
  states, tape, ys = list(states), [], []
  for x_t in x:  # forward
    gx, hz = x_t @ w_ih.T + b_ih, states[0] @ w_hh.T + b_hh
    if cell == "lstm":
      a = gx + hz
      i, f, o = (_sig(a[:, k * h_n:(k + 1) * h_n]) for k in (0, 1, 3))
      g = np.tanh(a[:, 2 * h_n:3 * h_n])
      c = f * states[1] + i * g
      new = [o * np.tanh(c), c]
      tape.append((x_t, states, (i, f, g, o, c)))
    elif cell == "gru":
      r = _sig(gx[:, :h_n] + hz[:, :h_n])
      z = _sig(gx[:, h_n:2 * h_n] + hz[:, h_n:2 * h_n])
      hn = hz[:, 2 * h_n:]
      n = np.tanh(gx[:, 2 * h_n:] + r * hn)
      new = [(1 - z) * n + z * states[0]]
      tape.append((x_t, states, (r, z, n, hn)))
    else:
      a = gx + hz
      new = [np.tanh(a) if cell == "rnn_tanh" else np.maximum(a, 0.0)]
      tape.append((x_t, states, (a, new[0])))
    states = new
    ys.append(new[0])
  grads = dict(x=np.zeros_like(x), w_ih=np.zeros_like(w_ih), b_ih=np.zeros_like(b_ih), w_hh=np.zeros_like(w_hh),
               b_hh=np.zeros_like(b_hh))
  d_st = [np.array(d, np.float64) for d in dstates]
  dx = []
  for t in range(len(tape) - 1, -1, -1):  # backward through time
    x_t, prev, act = tape[t]
    dh = d_st[0] + dys[t]
    if cell == "lstm":
      i, f, g, o, c = act
      tc = np.tanh(c)
      dc = d_st[1] + dh * o * (1 - tc ** 2)
      da = np.concatenate([dc * g * i * (1 - i), dc * prev[1] * f * (1 - f), dc * i * (1 - g ** 2),
                           dh * tc * o * (1 - o)], axis=1)
      dgx = dhz = da
      d_prev_extra = [dc * f]
    elif cell == "gru":
      r, z, n, hn = act
      dan = dh * (1 - z) * (1 - n ** 2)
      dar = dan * hn * r * (1 - r)
      daz = dh * (prev[0] - n) * z * (1 - z)
      dgx = np.concatenate([dar, daz, dan], axis=1)
      dhz = np.concatenate([dar, daz, dan * r], axis=1)
      d_prev_extra = []
      dh_direct = dh * z
    else:
      a, h = act
      dgx = dhz = dh * ((1 - h ** 2) if cell == "rnn_tanh" else (a > 0).astype(np.float64))
      d_prev_extra = []
    grads["w_ih"] += dgx.T @ x_t
    grads["b_ih"] += dgx.sum(0)
    grads["w_hh"] += dhz.T @ prev[0]
    grads["b_hh"] += dhz.sum(0)
    dx.append(dgx @ w_ih)
    dh_prev = dhz @ w_hh + (dh_direct if cell == "gru" else 0.0)
    d_st = [dh_prev] + d_prev_extra
  grads["x"] = np.stack(dx[::-1])
  return (np.stack(ys), states, (grads["x"], d_st, grads["w_ih"], grads["b_ih"], grads["w_hh"], grads["b_hh"]))


@needs_native
@pytest.mark.parametrize("cell", sorted(recurrent_kernel.CELLS))
def test_native_cell_forward_and_gradients_equal_float64_oracle(cell):
  """Each cell of the C++ kernel (through the binding, asserted covered), forward and every gradient, against a
  float64 NumPy forward and hand-written backward. T=6, B=3, I=5 (padded to 16 inside), H=32 (two 16-unit blocks);
  weights ~0.2 so the gates stay off saturation (the ReLU RNN keeps both signs)."""
  g = {"lstm": 4, "gru": 3}.get(cell, 1)
  t_n, b_n, i_n, h_n = 6, 3, 5, 32
  rng = np.random.default_rng(21)
  x = rng.normal(size=(t_n, b_n, i_n))
  states = [rng.normal(size=(b_n, h_n)) for _ in range(2 if cell == "lstm" else 1)]
  w_ih, w_hh = rng.normal(size=(g * h_n, i_n)) * 0.3, rng.normal(size=(g * h_n, h_n)) * 0.2
  b_ih, b_hh = rng.normal(size=(g * h_n,)) * 0.3, rng.normal(size=(g * h_n,)) * 0.3
  dys = rng.normal(size=(t_n, b_n, h_n))
  dstates = [rng.normal(size=(b_n, h_n)) for _ in states]
  args = [jnp.asarray(a, jnp.float32) for a in (x, w_ih, b_ih, w_hh, b_hh)]
  assert recurrent_kernel.supports(cell, args[0], args[1], args[3])
  f32 = lambda a: np.asarray(np.asarray(a, np.float32), np.float64)  # noqa: E731  oracle sees the same inputs
  want_ys, want_st, want_g = _oracle(cell, f32(x), [f32(s) for s in states], *map(f32, (w_ih, b_ih, w_hh, b_hh)),
                                     f32(dys), [f32(d) for d in dstates])
  if cell == "rnn_relu":  # both branches of the ReLU are taken
    assert 0.2 < np.mean(want_ys > 0) < 0.8

  def run(x, states, w_ih, b_ih, w_hh, b_hh):
    return recurrence(cell, x, tuple(states), w_ih, b_ih, w_hh, b_hh, None, None)

  st32 = [jnp.asarray(s, jnp.float32) for s in states]
  (ys, st), pullback = jax.vjp(run, args[0], st32, *args[1:])
  got_g = pullback((jnp.asarray(dys, jnp.float32), tuple(jnp.asarray(d, jnp.float32) for d in dstates)))

  def close(got, want, name):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()), err_msg=name)

  close(ys, want_ys, "ys")
  for s, w in zip(st, want_st):
    close(s, w, "final state")
  names = ("dx", "dstates", "dw_ih", "db_ih", "dw_hh", "db_hh")
  for name, got, want in zip(names, got_g, want_g):
    if name == "dstates":
      for a, b in zip(got, want):
        close(a, b, name)
    else:
      close(got, want, name)
