"""Mamba-2 SSD: chunked = sequential (forward, final state, gradients), resets, causality, decode steps."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import ssm

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_inputs(length, *, batch=2, heads=3, head_dim=4, state=5, dtype=jnp.float32, seed=0):
  """Random inputs from numpy (no per-test compile of JAX's PRNG)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  cast = lambda a: jnp.asarray(a).astype(dtype)
  args = dict(x=cast(normal(batch, length, heads, head_dim)),
              dt=cast(np.log1p(np.exp(normal(batch, length, heads) - 1))),
              A=jnp.asarray(-np.exp(normal(heads))), B=cast(normal(batch, length, state)),
              C=cast(normal(batch, length, state)), D=jnp.asarray(normal(heads)))
  h0 = jnp.asarray(normal(batch, heads, head_dim, state))
  seg = jnp.asarray(np.cumsum(rng.random((batch, length)) < 0.15, axis=1), jnp.int32)
  return args, h0, seg


def assert_close(actual, expected, dtype, what=""):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL[dtype] * scale, err_msg=what)


def _forward_and_grads(mode, args, h0, seg, w):
  def loss(args, h0):
    y, h = ssm.ssd(**args, mode=mode, chunk_size=8, initial_state=h0, return_final_state=True, segment_ids=seg)
    return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(jnp.sin(h)), (y, h)
  (_, (y, h)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(args, h0)
  return y, h, grads


def _check_chunked_equals_sequential(dtype, length, with_resets, transform=jax.jit):
  args, h0, seg = make_inputs(length, dtype=dtype)
  seg = seg if with_resets else None
  w = jnp.asarray(np.random.default_rng(3).standard_normal((2, length, 3, 4)), jnp.float32)
  y_ref, h_ref, (g_ref, gh_ref) = transform(functools.partial(_forward_and_grads, "sequential"))(args, h0, seg, w)
  y, h, (g, gh) = transform(functools.partial(_forward_and_grads, "chunked"))(args, h0, seg, w)
  assert y.dtype == dtype and h.dtype == jnp.float32
  assert_close(y, y_ref, dtype, "y")
  assert_close(h, h_ref, dtype, "final state")
  for name in args:
    assert g[name].dtype == args[name].dtype
    assert np.all(np.isfinite(np.asarray(g[name], np.float32))), name
    assert_close(g[name], g_ref[name], dtype, f"d{name}")
  assert_close(gh, gh_ref, dtype, "d initial_state")


@pytest.mark.parametrize("dtype, length, with_resets", [(jnp.float32, 37, True), (jnp.bfloat16, 29, True)])
def test_chunked_equals_sequential(dtype, length, with_resets):
  _check_chunked_equals_sequential(dtype, length, with_resets)


class ChunkedVariantsTest(chex.TestCase):
  """The cheap float32 case of chunked = sequential, jitted and eagerly (the custom VJP outside jit)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_chunked_equals_sequential(self):
    _check_chunked_equals_sequential(jnp.float32, 21, False, transform=self.variant)


def test_strong_decay_stays_finite():
  """Large dt * A inside a chunk (exp of the full cumulative sum would underflow/overflow)."""
  args, _, _ = make_inputs(40, seed=2)
  args["dt"] = args["dt"] * 30.0
  y_ref = jax.jit(functools.partial(ssm.ssd, mode="sequential"))(**args)
  y = jax.jit(functools.partial(ssm.ssd, chunk_size=16))(**args)
  grads = jax.jit(jax.grad(lambda a: jnp.sum(ssm.ssd(**a, chunk_size=16))))(args)
  assert_close(y, y_ref, jnp.float32)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("length", [1, 150])
def test_default_chunk_against_sequential(length):
  """The default chunk size: one step (L < C); several chunks plus a remainder; output and final state."""
  args, h0, _ = make_inputs(length, batch=1, seed=4)
  run = lambda mode: jax.jit(functools.partial(ssm.ssd, mode=mode, return_final_state=True))(**args, initial_state=h0)
  (y, h), (y_ref, h_ref) = run("chunked"), run("sequential")
  assert_close(y, y_ref, jnp.float32, "y")
  assert_close(h, h_ref, jnp.float32, "final state")


@pytest.mark.parametrize("mode", ssm.SSD_MODES)
def test_segment_resets_equal_separate_runs(mode):
  args, _, _ = make_inputs(19, batch=1)
  cut = [0, 7, 8, 19]
  seg = jnp.asarray(np.repeat([4, 9, 2], np.diff(cut)))[None]
  y_packed = jax.jit(functools.partial(ssm.ssd, mode=mode, chunk_size=4))(**args, segment_ids=seg)
  for lo, hi in zip(cut[:-1], cut[1:]):
    piece = {k: (v[:, lo:hi] if v.ndim >= 3 else v) for k, v in args.items()}
    y_alone = jax.jit(functools.partial(ssm.ssd, mode="sequential"))(**piece)
    assert_close(y_packed[:, lo:hi], y_alone, jnp.float32, f"{lo}:{hi}")


@pytest.mark.parametrize("mode", ssm.SSD_MODES)
def test_causal_by_gradients(mode):
  args, _, _ = make_inputs(12, batch=1)
  t = 5
  grads = jax.jit(jax.grad(lambda a: jnp.sum(ssm.ssd(**a, mode=mode, chunk_size=4)[:, t])))(args)
  for name in ("x", "dt", "B", "C"):
    assert np.all(np.asarray(grads[name][:, t + 1:]) == 0.0), name
    assert np.any(np.asarray(grads[name][:, :t + 1]) != 0.0), name


def test_step_by_step_equals_chunked():
  args, h0, _ = make_inputs(10)
  run = jax.jit(functools.partial(ssm.ssd, chunk_size=4, return_final_state=True))
  y_full, h_full = run(**args, initial_state=h0)
  y_one, h_one = run(**{k: (v[:, :1] if v.ndim >= 3 else v) for k, v in args.items()}, initial_state=h0)  # L < C
  h = h0
  step = jax.jit(ssm.ssd_step)
  for t in range(10):
    if t == 1:
      assert_close(h, h_one, jnp.float32, "one-step chunked state")
      assert_close(y_one[:, 0], y_full[:, 0], jnp.float32, "one-step chunked output")
    y_t, h = step(args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t],
                          args["D"], h)
    assert_close(y_t, y_full[:, t], jnp.float32, f"step {t}")
  assert_close(h, h_full, jnp.float32)


@pytest.mark.parametrize("bad, message", [
    (dict(mode="parallel"), "mode"), (dict(A=jnp.zeros((2,))), "A must be"),
    (dict(dt=jnp.zeros((2, 5, 3))), "dt must be"), (dict(C=jnp.zeros((2, 6, 4))), "C must have"),
    (dict(chunk_size=-1), "chunk_size"), (dict(x=jnp.zeros((2, 6, 12))), "x must be"),
    (dict(B=jnp.zeros((2, 5, 5))), "B must be"), (dict(D=jnp.zeros((2,))), "D must be"),
    (dict(initial_state=jnp.zeros((2, 3, 4, 4))), "initial_state"),
    (dict(segment_ids=jnp.zeros((2, 5), jnp.int32)), "segment_ids")])
def test_bad_input_raises(bad, message):
  args, _, _ = make_inputs(6)
  with pytest.raises(ValueError, match=message):
    ssm.ssd(**{**args, **{k: v for k, v in bad.items() if k in args}},
            **{k: v for k, v in bad.items() if k not in args})


def test_chunked_backward_keeps_no_per_chunk_decay_matrices():
  """fwd+bwd memory: the chunk step is rematerialised, so no [L/C, B, N, C, C] stack of decays or scores is kept.

  With 8 heads of width 4 and state 4, one such stack (2 MiB at L = 2048, C = 32) outweighs everything the
  backward needs to keep (the inputs, their gradients and one [B, N, H, P] state per chunk: < 1 MiB).
  """
  length, heads, chunk = 2048, 8, 32
  args, _, _ = make_inputs(length, batch=1, heads=heads, head_dim=4, state=4)
  loss = lambda a: jnp.sum(ssm.ssd(**a, chunk_size=chunk))
  temp = jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis().temp_size_in_bytes
  one_stack = (length // chunk) * heads * chunk * chunk * 4
  assert temp < one_stack / 2, (temp, one_stack)
