"""seqjax.ops.recurrent vs a plain step-by-step reference (NumPy forward, autodiff gradients).

Both kernels of the ops are tested: "scan" (the `lax.scan` kernel, traced with the CPU kernels off) and "native" (the
C++ kernel of `seqjax.cpu_kernels.recurrent`, traced with SEQJAX_CPU_KERNELS=on); what is particular to the C++
kernel is in tests/cpu_kernels/test_recurrent.py.
"""
import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import cpu_kernels
from seqjax.ops import backend, recurrent

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


def _call(kind, x, states, w_ih, w_hh, b_ih, b_hh, mode=None, **kw):
  """Uniform (ys, states tuple) interface over the three public ops; `mode`: the CPU-kernel mode they are traced
  under (None: the mode in effect)."""
  if mode is not None:
    with backend.cpu_kernels_mode(mode):
      return _call(kind, x, states, w_ih, w_hh, b_ih, b_hh, **kw)
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


# "scan": the lax.scan kernel (H=4, which the C++ kernel does not cover); "native": the C++ kernel (H=16).
IMPLS = [pytest.param("scan", 4, id="scan"), pytest.param("native", 16, id="native", marks=pytest.mark.skipif(
    not cpu_kernels.available("recurrent"), reason="the recurrent CPU kernel is unavailable"))]
MODES = {"scan": "off", "native": "on"}


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
  op_kw["mode"] = MODES[impl]
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
  # Against the float32 recurrence of the same bf16-rounded inputs, in units of its scale: bf16 keeps 8 bits, so the
  # outputs carry ~0.4% rounding; a 5% error anywhere (e.g. a gate scaled by 0.95) exceeds both bounds.
  err = np.asarray(ys, np.float32) - ys_ref
  rms_ref = float(np.sqrt(np.mean(ys_ref ** 2)))
  assert float(np.sqrt(np.mean(err ** 2))) < 1e-2 * rms_ref, (kind, float(np.sqrt(np.mean(err ** 2))), rms_ref)
  assert np.all(np.abs(err) <= 2e-2 * (np.abs(ys_ref) + rms_ref)), (kind, float(np.max(np.abs(err))))


def _scan_and_step(kind, x, states, w_ih, w_hh, b_ih, b_hh):
  """(one-step scan outputs, its final states, the step op's new states) for the first token of x."""
  ys, st = _call(kind, x[:, :1], states, w_ih, w_hh, b_ih, b_hh)
  step = {"lstm": recurrent.lstm_step, "gru": recurrent.gru_step, "rnn": recurrent.rnn_step}[kind]
  new = step(x[:, 0], *states, w_ih, w_hh, b_ih, b_hh)
  return ys, st, new if kind == "lstm" else (new,)


class StepTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("lstm", "gru", "rnn")
  def test_step_equals_one_scan_step(self, kind):
    x, states, w_ih, w_hh, b_ih, b_hh = _params(kind, seed=5)
    ys, st, new = self.variant(functools.partial(_scan_and_step, kind))(x, states, w_ih, w_hh, b_ih, b_hh)
    chex.assert_shape(new, (B, H))
    chex.assert_type(new, jnp.float32)
    chex.assert_trees_all_close(new, st, atol=1e-6, rtol=1e-7)  # h (and c) after one step
    chex.assert_trees_all_close(new[0], ys[:, 0], atol=1e-6, rtol=1e-7)  # the output is h


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


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_empty_sequence_returns_initial_state(mode):
  x, states, *w = _params("lstm", H=16)
  ys, (h, c) = _call("lstm", x[:, :0], states, *w, mode=mode)
  assert ys.shape == (B, 0, 16)
  np.testing.assert_array_equal(h, states[0])
  np.testing.assert_array_equal(c, states[1])
