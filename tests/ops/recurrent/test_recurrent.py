"""seqjax.ops.recurrent vs a plain step-by-step reference (NumPy forward, autodiff gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import native, recurrent

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
B, T, I, H = 3, 7, 5, 4
LENGTHS = np.array([7, 3, 5])
SEGMENTS = np.array([[0] * 7, [0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2, 2]])


def _sigmoid(xp, a):
  return 1.0 / (1.0 + xp.exp(-a))


def reference(xp, kind, x, states, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False,
              segment_ids=None, nonlinearity="tanh"):
  """Plain per-step loop, written for any array module `xp` (numpy or jax.numpy)."""
  states0 = tuple(states)
  states = tuple(states)
  batch, steps = x.shape[:2]
  order = range(steps - 1, -1, -1) if reverse else range(steps)
  ys = [None] * steps
  prev = None
  for t in order:
    if segment_ids is not None and prev is not None:
      r = (segment_ids[:, t] != segment_ids[:, prev])[:, None]
      states = tuple(xp.where(r, s0, s) for s, s0 in zip(states, states0))
    prev = t
    gx = x[:, t] @ w_ih.T + b_ih
    hz = states[0] @ w_hh.T + b_hh
    if kind == "lstm":
      i, f, g, o = xp.split(gx + hz, 4, axis=-1)
      c = _sigmoid(xp, f) * states[1] + _sigmoid(xp, i) * xp.tanh(g)
      h = _sigmoid(xp, o) * xp.tanh(c)
      new = (h, c)
    elif kind == "gru":
      xr, xz, xn = xp.split(gx, 3, axis=-1)
      hr, hz_, hn = xp.split(hz, 3, axis=-1)
      r = _sigmoid(xp, xr + hr)
      z = _sigmoid(xp, xz + hz_)
      n = xp.tanh(xn + r * hn)
      h = (1 - z) * n + z * states[0]
      new = (h,)
    else:
      a = gx + hz
      h = xp.tanh(a) if nonlinearity == "tanh" else xp.maximum(a, 0)
      new = (h,)
    valid = (np.ones(batch, bool) if lengths is None else t < lengths)[:, None]
    states = tuple(xp.where(valid, n, s) for n, s in zip(new, states))
    ys[t] = xp.where(valid, new[0], 0.0)
  return xp.stack(ys, axis=1), states


def _params(kind, seed=0, dtype=np.float32, H=H):
  g = GATES[kind]
  rng = np.random.default_rng(seed)
  n_states = 2 if kind == "lstm" else 1
  x = rng.normal(size=(B, T, I))
  states = tuple(rng.normal(size=(B, H)) for _ in range(n_states))
  w_ih = rng.normal(size=(g * H, I)) * 0.5
  w_hh = rng.normal(size=(g * H, H)) * 0.5
  b_ih = rng.normal(size=(g * H,)) * 0.5
  b_hh = rng.normal(size=(g * H,)) * 0.5
  cast = lambda a: a.astype(dtype)
  return cast(x), tuple(map(cast, states)), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh)


def _call(kind, x, states, w_ih, w_hh, b_ih, b_hh, **kw):
  """Uniform (ys, states tuple) interface over the three public ops."""
  if kind == "lstm":
    ys, (h, c) = recurrent.lstm(x, *states, w_ih, w_hh, b_ih, b_hh, **kw)
    return ys, (h, c)
  fn = recurrent.gru if kind == "gru" else recurrent.rnn
  ys, h = fn(x, *states, w_ih, w_hh, b_ih, b_hh, **kw)
  return ys, (h,)


_L, _S = dict(lengths=LENGTHS), dict(segment_ids=SEGMENTS)
CASES = [  # (cell, options, also check remat): every option is covered for every cell type
    ("lstm", dict(), False),
    ("lstm", dict(_L, reverse=True), True),
    ("lstm", dict(_L, **_S, reverse=True), True),
    ("gru", dict(_L), False),
    ("gru", dict(_S, reverse=True), True),
    ("rnn", dict(reverse=True), False),
    ("rnn", dict(_L, **_S), True),
]


# "scan": the lax.scan kernel (H=4, which the native kernel does not cover); "native": the C++ kernel (H=16).
IMPLS = [pytest.param("scan", 4, id="scan"), pytest.param("native", 16, id="native", marks=pytest.mark.skipif(
    not native.available(), reason="native kernels unavailable"))]


@pytest.mark.parametrize("impl, hidden", IMPLS)
@pytest.mark.parametrize("kind, kw, check_remat", CASES)
def test_forward_and_grad_match_reference(kind, kw, check_remat, impl, hidden):
  args = _params(kind, seed=len(kw), H=hidden)
  ref_kw = {k: (np.asarray(v) if k != "reverse" else v) for k, v in kw.items()}
  # Forward against the float64 NumPy loop.
  ys_ref, st_ref = reference(np, kind, *[a.astype(np.float64) if not isinstance(a, tuple) else
                                         tuple(s.astype(np.float64) for s in a) for a in args],
                             **ref_kw)
  # chunk=3 does not divide T=7: exercises the padded last chunk; the plain case uses defaults.
  op_kw = dict(kw, chunk=3, unroll=2) if kw else {}
  op_kw["native"] = impl == "native"
  if "lengths" in op_kw:
    op_kw["lengths"] = jnp.asarray(op_kw["lengths"])
  if "segment_ids" in op_kw:
    op_kw["segment_ids"] = jnp.asarray(op_kw["segment_ids"])
  ys, st = jax.jit(lambda *a: _call(kind, *a, **op_kw))(*args)
  np.testing.assert_allclose(ys, ys_ref, atol=2e-5, rtol=2e-5)
  for s, s_ref in zip(st, st_ref):
    np.testing.assert_allclose(s, s_ref, atol=2e-5, rtol=2e-5)

  # Gradients of a non-trivial scalar of outputs and final state, against the reference's autodiff.
  proj = np.random.default_rng(1).normal(size=(B, T, hidden)).astype(np.float32)

  def loss(fn):
    def f(x, states, *w):
      ys, st = fn(x, states, *w)
      return jnp.sum(ys * proj) + sum(jnp.sum(jnp.sin(s)) for s in st)
    return f

  argnums = tuple(range(6))
  g_ref = jax.jit(jax.grad(loss(lambda *a: reference(jnp, kind, *a, **ref_kw)), argnums))(*args)
  for remat in ((False, True) if check_remat else (False,)):
    g = jax.jit(jax.grad(loss(lambda *a: _call(kind, *a, remat=remat, **op_kw)), argnums))(*args)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def test_grad_matches_finite_differences():
  """Independent of any autodiff: central differences along a random direction."""
  x, states, *w = _params("lstm", seed=7)
  x, states = jnp.asarray(x, jnp.float32), tuple(jnp.asarray(s) for s in states)
  lengths = jnp.asarray(LENGTHS)

  def f(x, w_hh):
    ys, (h, c) = recurrent.lstm(x, *states, w[0], w_hh, w[2], w[3], lengths=lengths, reverse=True,
                                chunk=2)
    return jnp.sum(ys ** 2) + jnp.sum(c)

  f64 = lambda x, w_hh: float(f(x, w_hh))
  gx, gw = jax.grad(f, (0, 1))(x, jnp.asarray(w[1]))
  rng = np.random.default_rng(0)
  dx, dw = rng.normal(size=x.shape), rng.normal(size=w[1].shape)
  eps = 1e-2
  fd = (f64(x + eps * dx, w[1] + eps * dw) - f64(x - eps * dx, w[1] - eps * dw)) / (2 * eps)
  analytic = float(jnp.sum(gx * dx) + jnp.sum(gw * dw))
  np.testing.assert_allclose(analytic, fd, rtol=2e-3)


def test_relu_rnn_matches_reference():
  args = _params("rnn", seed=3)
  ys, _ = recurrent.rnn(args[0], *args[1], *args[2:], nonlinearity="relu")
  ys_ref, _ = reference(np, "rnn", args[0], args[1], *args[2:], nonlinearity="relu")
  np.testing.assert_allclose(ys, ys_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_bfloat16_inputs(kind):
  args = _params(kind, seed=11)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  ys, st = _call(kind, bf(args[0]), args[1], *map(bf, args[2:]))
  assert ys.dtype == jnp.bfloat16 and all(s.dtype == jnp.float32 for s in st)
  ys_ref, _ = reference(np, kind, *[np.asarray(bf(a), np.float32) for a in (args[0],)], args[1],
                        *[np.asarray(bf(a), np.float32) for a in args[2:]])
  np.testing.assert_allclose(np.asarray(ys, np.float32), ys_ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_step_equals_one_scan_step(kind):
  x, states, w_ih, w_hh, b_ih, b_hh = _params(kind, seed=5)
  ys, st = _call(kind, x[:, :1], states, w_ih, w_hh, b_ih, b_hh)
  if kind == "lstm":
    h, c = recurrent.lstm_step(x[:, 0], *states, w_ih, w_hh, b_ih, b_hh)
    np.testing.assert_allclose(c, st[1], atol=1e-6)
  elif kind == "gru":
    h = recurrent.gru_step(x[:, 0], *states, w_ih, w_hh, b_ih, b_hh)
  else:
    h = recurrent.rnn_step(x[:, 0], *states, w_ih, w_hh, b_ih, b_hh)
  np.testing.assert_allclose(h, ys[:, 0], atol=1e-6)
  np.testing.assert_allclose(h, st[0], atol=1e-6)


def test_segment_resets_equal_separate_runs():
  """A packed row gives the same outputs as running each segment on its own."""
  x, states, *w = _params("lstm", seed=2)
  seg = SEGMENTS[1]  # [0, 0, 1, 1, 1, 2, 2]
  for reverse in (False, True):
    ys, _ = recurrent.lstm(x[1:2], states[0][1:2], states[1][1:2], *w,
                           segment_ids=jnp.asarray(seg[None]), reverse=reverse)
    for s in np.unique(seg):
      idx = np.nonzero(seg == s)[0]
      ys_s, _ = recurrent.lstm(x[1:2, idx], states[0][1:2], states[1][1:2], *w, reverse=reverse)
      np.testing.assert_allclose(ys[:, idx], ys_s, atol=1e-6)


def test_reverse_is_per_sequence_flip():
  """reverse=True with lengths == forward run over each sequence's valid steps flipped."""
  x, states, *w = _params("gru", seed=4)
  ys, _ = recurrent.gru(x, *states, *w, lengths=jnp.asarray(LENGTHS), reverse=True)
  for b, n in enumerate(LENGTHS):
    ys_b, _ = recurrent.gru(x[b:b + 1, :n][:, ::-1], states[0][b:b + 1], *w)
    np.testing.assert_allclose(ys[b:b + 1, :n], ys_b[:, ::-1], atol=1e-6)
    np.testing.assert_array_equal(ys[b, n:], 0.0)


@pytest.mark.parametrize("bad, match", [
    (dict(x=np.zeros((B, T))), "batch-major"),
    (dict(w_hh=np.zeros((4 * H, H + 1))), "w_hh"),
    (dict(w_ih=np.zeros((4 * H, I + 1))), "w_ih"),
    (dict(b_ih=np.zeros((3 * H,))), "b_ih"),
    (dict(h0=np.zeros((B + 1, H))), "initial state"),
    (dict(lengths=np.zeros((B + 1,), int)), "lengths"),
    (dict(segment_ids=np.zeros((B, T + 1), int)), "segment_ids"),
    (dict(chunk=0), "chunk"),
])
def test_bad_input_raises(bad, match):
  x, (h0, c0), w_ih, w_hh, b_ih, b_hh = _params("lstm")
  kw = dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    recurrent.lstm(**kw)


def test_bad_nonlinearity_raises():
  x, (h0,), *w = _params("rnn")
  with pytest.raises(ValueError, match="nonlinearity"):
    recurrent.rnn(x, h0, *w, nonlinearity="gelu")


# ---- the native CPU kernel (seqjax.ops.recurrent_native); its numerics per cell and option are the "native"
# cases of test_forward_and_grad_match_reference above ----------------------------------------------------------
needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def _loss_and_grads(kind, args, **kw):
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
  (_, ys_n), g_n = _loss_and_grads(kind, args, native=True, **kw)
  (_, ys_s), g_s = _loss_and_grads(kind, args, native=False, **kw)
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
  assert "seqjax_rnn" not in text(native=False)
  assert "seqjax_rnn_bwd" in text(remat=True)
  narrow = _params("lstm")  # H = 4
  assert "seqjax_rnn" not in jax.jit(lambda x: _call("lstm", x, *narrow[1:])[0]).lower(narrow[0]).as_text()


@pytest.mark.parametrize("impl", [pytest.param(False, id="scan"), pytest.param(None, id="default")])
def test_empty_sequence_returns_initial_state(impl):
  x, states, *w = _params("lstm", H=16)
  ys, (h, c) = recurrent.lstm(x[:, :0], *states, *w, native=impl)
  assert ys.shape == (B, 0, 16)
  np.testing.assert_array_equal(h, states[0])
  np.testing.assert_array_equal(c, states[1])


def test_native_true_on_uncovered_input_raises():
  x, states, *w = _params("gru")  # H = 4
  with pytest.raises(ValueError, match="native=True needs .* H a multiple of 16"):
    recurrent.gru(x, *states, *w, native=True)
  x, states, *w = _params("gru", H=16)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in w]
  with pytest.raises(ValueError, match="float32 weights"):
    recurrent.gru(x, *states, *bf, native=True)


@needs_native
def test_native_remat_saves_less_and_gives_the_same_gradients():
  """remat=True keeps only the states for the backward (XLA's buffers shrink) and recomputes the activations to
  the same bits as the forward, so the gradients equal the non-remat native ones exactly."""
  args = _params("lstm", seed=6, H=32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 64, I)), jnp.float32)
  (_, ys_a), g_a = _loss_and_grads("lstm", (x,) + args[1:], native=True)
  (_, ys_b), g_b = _loss_and_grads("lstm", (x,) + args[1:], native=True, remat=True)
  np.testing.assert_array_equal(ys_a, ys_b)
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_array_equal(a, b)

  def temp_bytes(remat):
    f = jax.grad(lambda x: jnp.sum(_call("lstm", x, *args[1:], remat=remat)[0]))
    return jax.jit(f).lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp_bytes(True) < 0.8 * temp_bytes(False)


@needs_native
def test_native_bfloat16_inputs_float32_weights():
  """bfloat16 activations with float32 weights run natively (in float32) and return bfloat16 ys and dx."""
  args = _params("lstm", seed=12, H=32)
  xb = jnp.asarray(args[0], jnp.bfloat16)
  ys, _ = recurrent.lstm(xb, *args[1], *args[2:], native=True)
  ys_ref, _ = recurrent.lstm(jnp.asarray(xb, jnp.float32), *args[1], *args[2:], native=False)
  assert ys.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ys, np.float32), ys_ref, atol=1e-2, rtol=1e-2)
  dx = jax.grad(lambda x: jnp.sum(recurrent.lstm(x, *args[1], *args[2:], native=True)[0].astype(jnp.float32)))(xb)
  assert dx.dtype == jnp.bfloat16


@needs_native
def test_native_is_bitwise_deterministic_and_vmaps():
  args = _params("gru", seed=3, H=64)
  first = _loss_and_grads("gru", args)
  again = _loss_and_grads("gru", args)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  x, (h0,), *w = args
  ys_v = jax.vmap(lambda x, h: recurrent.gru(x[None], h[None], *w)[0][0])(x, h0)
  np.testing.assert_allclose(ys_v, recurrent.gru(x, h0, *w, native=False)[0], atol=1e-5, rtol=1e-5)


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
