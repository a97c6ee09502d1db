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
  """bfloat16 activations with float32 weights run natively (in float32) and return bfloat16 ys and dx."""
  args = _params("lstm", seed=12, H=32)
  xb = jnp.asarray(args[0], jnp.bfloat16)
  ys, _ = _call("lstm", xb, args[1], *args[2:], mode="on")
  ys_ref, _ = _call("lstm", jnp.asarray(xb, jnp.float32), args[1], *args[2:], mode="off")
  assert ys.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(ys, np.float32), ys_ref, atol=1e-2, rtol=1e-2)
  dx = jax.grad(lambda x: jnp.sum(_call("lstm", x, args[1], *args[2:], mode="on")[0].astype(jnp.float32)))(xb)
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
