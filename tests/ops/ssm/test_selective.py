"""Selective scan (Mamba S6): sequential = parallel = chunked, forward and gradients; resets; causality; memory."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import ssm

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_inputs(length, *, batch=2, width=6, state=4, dtype=jnp.float32, seed=0, reset_rate=0.15):
  """Random inputs from numpy (no per-test compile of JAX's PRNG)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  cast = lambda a: jnp.asarray(a).astype(dtype)
  args = dict(x=cast(normal(batch, length, width)), delta=cast(np.log1p(np.exp(normal(batch, length, width) - 1))),
              A=jnp.asarray(-np.exp(normal(width, state))), B=cast(normal(batch, length, state)),
              C=cast(normal(batch, length, state)), D=jnp.asarray(normal(width)))
  h0 = jnp.asarray(normal(batch, width, state))
  segment_ids = jnp.asarray(np.cumsum(rng.random((batch, length)) < reset_rate, axis=1), jnp.int32)
  return args, h0, segment_ids


def assert_close(actual, expected, dtype, what=""):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what)


def _forward_and_grads(mode, args, h0, seg, w):
  """(y, final state, grads of a loss of both w.r.t. the inputs and the initial state), for one mode."""
  def loss(args, h0):
    y, h = ssm.selective_scan(**args, mode=mode, chunk_size=8, initial_state=h0, return_final_state=True,
                              segment_ids=seg)
    return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(jnp.sin(h)), (y, h)
  (_, (y, h)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(args, h0)
  return y, h, grads


def _check_modes_agree(dtype, length, with_resets, transform=jax.jit, modes=ssm.MODES):
  """Lengths not multiples of the chunk (8); an initial state; the final state; every input's gradient."""
  args, h0, seg = make_inputs(length, dtype=dtype)
  seg = seg if with_resets else None
  w = jnp.asarray(np.random.default_rng(5).standard_normal((2, length, 6)), jnp.float32)
  results = {mode: transform(functools.partial(_forward_and_grads, mode))(args, h0, seg, w) for mode in modes}
  for mode, (y, h, (g, _)) in results.items():
    assert y.dtype == dtype and h.dtype == jnp.float32, mode
    assert all(g[name].dtype == args[name].dtype for name in args), mode
  for first, second in itertools.combinations(modes, 2):  # every pair, not only against the oracle
    (y_a, h_a, (g_a, gh_a)), (y_b, h_b, (g_b, gh_b)) = results[first], results[second]
    pair = f"{first} vs {second}"
    assert_close(y_a, y_b, dtype, f"y {pair}")
    assert_close(h_a, h_b, dtype, f"final state {pair}")
    for name in ("x", "delta", "A", "B", "C", "D"):
      assert_close(g_a[name], g_b[name], dtype, f"d{name} {pair}")
    assert_close(gh_a, gh_b, dtype, f"d initial_state {pair}")


@pytest.mark.parametrize("dtype, length, with_resets", [
    (jnp.float32, 13, False), (jnp.float32, 37, True), (jnp.bfloat16, 29, True)])
def test_modes_agree_forward_and_gradients(dtype, length, with_resets):
  _check_modes_agree(dtype, length, with_resets)


class ModesVariantsTest(chex.TestCase):
  """chunked (its hand-written VJP) = sequential, jitted and eagerly; "parallel" is plain jnp and costs seconds
  op by op, so it is compared under jit only (above)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_chunked_equals_sequential(self):
    _check_modes_agree(jnp.float32, 13, False, transform=self.variant, modes=("sequential", "chunked"))


@pytest.mark.parametrize("length", [1, 150])
def test_default_chunk_against_sequential(length):
  """The default chunk size (64): one step; several chunks plus a remainder."""
  args, h0, _ = make_inputs(length, batch=1, seed=3)
  y_ref = jax.jit(functools.partial(ssm.selective_scan, mode="sequential"))(**args, initial_state=h0)
  assert_close(jax.jit(ssm.selective_scan)(**args, initial_state=h0), y_ref, jnp.float32)


@pytest.mark.parametrize("mode", ssm.MODES)
def test_segment_resets_equal_separate_runs(mode):
  args, _, _ = make_inputs(14, batch=1)
  cut = [0, 5, 6, 14]  # segments of lengths 5, 1, 8
  seg = jnp.asarray(np.repeat(np.arange(3) + 3, np.diff(cut)))[None]
  y_packed = jax.jit(functools.partial(ssm.selective_scan, mode=mode, chunk_size=4))(**args, segment_ids=seg)
  for lo, hi in zip(cut[:-1], cut[1:]):
    piece = {k: (v[:, lo:hi] if v.ndim == 3 else v) for k, v in args.items()}
    y_alone = jax.jit(functools.partial(ssm.selective_scan, mode="sequential"))(**piece)
    assert_close(y_packed[:, lo:hi], y_alone, jnp.float32, f"segment {lo}:{hi}")


@pytest.mark.parametrize("mode", ssm.MODES)
def test_causal_by_gradients(mode):
  args, _, _ = make_inputs(12, batch=1)
  t = 6
  def out_t(x, delta, B):
    y = ssm.selective_scan(x, delta, args["A"], B, args["C"], args["D"], mode=mode, chunk_size=4)
    return jnp.sum(y[:, t])
  grads = jax.jit(jax.grad(out_t, argnums=(0, 1, 2)))(args["x"], args["delta"], args["B"])
  for g in grads:
    assert np.all(np.asarray(g[:, t + 1:]) == 0.0)
    assert np.any(np.asarray(g[:, :t + 1]) != 0.0)


def test_step_by_step_equals_scan():
  args, h0, _ = make_inputs(9)
  y_full, h_full = jax.jit(functools.partial(ssm.selective_scan, return_final_state=True))(**args, initial_state=h0)
  h = h0
  step = jax.jit(ssm.selective_step)
  for t in range(9):
    y_t, h = step(args["x"][:, t], args["delta"][:, t], args["A"], args["B"][:, t],
                                args["C"][:, t], args["D"], h)
    assert_close(y_t, y_full[:, t], jnp.float32, f"step {t}")
  assert_close(h, h_full, jnp.float32, "final state")


def _temp_bytes(mode, length, width, state):
  args, _, _ = make_inputs(length, batch=1, width=width, state=state)
  loss = lambda a: jnp.sum(ssm.selective_scan(**a, mode=mode))
  compiled = jax.jit(jax.grad(loss)).lower(args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_never_materialises_blep():
  length, width, state = 1024, 32, 16
  blep_bytes = length * width * state * 4
  assert _temp_bytes("chunked", length, width, state) < blep_bytes / 2
  assert _temp_bytes("sequential", length, width, state) > blep_bytes  # autodiff of lax.scan keeps [L, B, E, P]


@pytest.mark.parametrize("bad, message", [
    (dict(mode="fast"), "mode"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(A=jnp.zeros((5, 4))), "A must be"),
    (dict(B=jnp.zeros((2, 6, 4))), "B must be"),
    (dict(delta=jnp.zeros((2, 8, 6))), "delta must"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), "segment_ids"),
    (dict(initial_state=jnp.zeros((2, 6, 5))), "initial_state"),
    (dict(x=jnp.zeros((2, 7))), "x must be"),
    (dict(C=jnp.zeros((2, 7, 3))), "C must be"),
    (dict(D=jnp.zeros((5,))), "D must be"),
])
def test_bad_input_raises(bad, message):
  args, _, _ = make_inputs(7)
  kw = {**args, **{k: v for k, v in bad.items() if k in args}}
  opts = {k: v for k, v in bad.items() if k not in args}
  with pytest.raises(ValueError, match=message):
    ssm.selective_scan(**kw, **opts)
