"""Context-parallel linear attention on 8 simulated devices = the whole sequence on one device.

`decayed_linear_attention_context_parallel` on (data 2, seq 4) and (seq 8), under check_vma=True, for every decay
shape (none: linear attention; [N]: RetNet; [B, T, N]; [B, T, N, P]: GLA) and the normalised linear attention
(its key-sum column travels in the state): output and final state against the unsharded *recurrent* form
(`lax.scan`, one token at a time: another algorithm), gradients of q, k, v and the decay against its autodiff;
packed documents starting on and inside shard boundaries; a negative control (shards run alone differ).
Catches: S_in decayed by the wrong cumulative sum (off by one token), not cut at a reset, a per-head decay's
gradient not summed over the shards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from seqjax.ops import linear
from seqjax.ops.linear.context_parallel import decayed_linear_attention_context_parallel

B, L, N, KP, H = 2, 32, 2, 3, 4  # 8 tokens per shard on seq 4, 4 on seq 8
SEGMENTS = np.array([[1] * 8 + [2] * 5 + [3] * 15 + [4] * 4, [5] * L], np.int32)
MESHES = {"data2_seq4": (2, 4), "seq8": (1, 8)}


def _inputs(decay, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  g = {"none": None, "head": -np.exp(f(N)) * 0.3, "token": -np.exp(f(B, L, N)) * 0.3,
       "feature": -np.exp(f(B, L, N, KP)) * 0.3}[decay]
  return f(B, L, N, KP), f(B, L, N, KP), f(B, L, N, H), g


def _sharded(mesh_name, fn):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(MESHES[mesh_name]), ("data", "seq"))
  spec = P("data", "seq")

  def run(q, k, v, g, seg):
    args = (q, k, v, seg) + (() if g is None else (g,))
    g_spec = () if g is None else ((P() if g.ndim == 1 else spec),)
    body = lambda q, k, v, seg, *g: tuple(fn(q, k, v, g[0] if g else None, seg))  # noqa: E731
    o, s = jax.shard_map(lambda *a: (lambda o, s: (o, s[None]))(*body(*a)), mesh=mesh,
                         in_specs=(spec,) * 4 + g_spec, out_specs=(spec, P("seq", "data")))(*args)
    return o, s[-1]
  return run


def _cases():
  for decay in ("none", "head", "token", "feature"):
    yield pytest.param(decay, "data2_seq4", "all_gather", id=f"{decay}_data2_seq4_all_gather",
                       marks=[pytest.mark.slow] if decay == "token" else [])  # between "head" and "feature"
  yield pytest.param("feature", "seq8", "ppermute", id="feature_seq8_ppermute", marks=pytest.mark.slow)


@pytest.mark.parametrize("decay, mesh, combine", list(_cases()))
def test_context_parallel_linear_attention_equals_recurrent(decay, mesh, combine):
  q, k, v, g = _inputs(decay)
  seg = jnp.asarray(SEGMENTS)
  sharded = _sharded(mesh, lambda q, k, v, g, s: decayed_linear_attention_context_parallel(
      q, k, v, g, segment_ids=s, chunk_size=4, return_final_state=True, combine=combine))
  whole = lambda q, k, v, g, s: linear.decayed_linear_attention(  # noqa: E731
      q, k, v, g, segment_ids=s, mode="recurrent", return_final_state=True)
  w = np.random.default_rng(1).standard_normal((B, L, N, H)).astype(np.float32)

  def loss(fn):
    def f(q, k, v, g):
      o, s = fn(q, k, v, g, seg)
      return jnp.sum(o * w) + jnp.sum(s ** 2)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2) if g is None else (0, 1, 2, 3)))

  (o, s), (want_o, want_s) = jax.jit(sharded)(q, k, v, g, seg), jax.jit(whole)(q, k, v, g, seg)
  np.testing.assert_allclose(o, want_o, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(s, want_s, atol=1e-4, rtol=1e-4)
  (value, grads), (want_value, want_grads) = loss(sharded)(q, k, v, g), loss(whole)(q, k, v, g)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_normalised_linear_attention_and_negative_control():
  q, k, v, _ = _inputs("none")
  seg = jnp.asarray(SEGMENTS)
  norm = lambda axis: (lambda q, k, v, g, s: linear.linear_attention(  # noqa: E731
      q, k, v, segment_ids=s, return_final_state=True, chunk_size=4, context_parallel_axis=axis))
  o, s = jax.jit(_sharded("data2_seq4", norm("seq")))(q, k, v, None, seg)
  want_o, want_s = linear.linear_attention(q, k, v, segment_ids=seg, mode="recurrent", return_final_state=True)
  np.testing.assert_allclose(o, want_o, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(s, want_s, atol=1e-4, rtol=1e-4)
  alone, _ = jax.jit(_sharded("data2_seq4", norm(None)))(q, k, v, None, seg)
  assert np.max(np.abs(np.asarray(alone) - np.asarray(want_o))) > 1e-2


def test_initial_state_refused():
  q, k, v, _ = _inputs("none")
  with pytest.raises(ValueError, match="starts from a zero state"):
    decayed_linear_attention_context_parallel(q, k, v, initial_state=jnp.zeros((B, N, KP, H)))
