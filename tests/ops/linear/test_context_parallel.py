"""Context-parallel linear attention on 8 simulated devices = the whole sequence on one device.

`decayed_linear_attention_context_parallel` on (data 2, seq 4) and (seq 8), under check_vma=True, for every decay
shape (none: linear attention; [N]: RetNet; [B, T, N]; [B, T, N, P]: GLA) and the normalised linear attention
(its key-sum column travels in the state): output and final state against the unsharded *recurrent* form
(`lax.scan`, one token at a time: another algorithm), gradients of q, k, v and the decay against its autodiff;
packed documents starting on and inside shard boundaries; a negative control (shards run alone differ).
Catches: S_in decayed by the wrong cumulative sum (off by one token), not cut at a reset, a per-head decay's
gradient not summed over the shards.

The delta rule (`delta_rule_context_parallel`, DeltaNet and Gated DeltaNet) against the float64 NumPy loop of
`test_numpy_oracle` (outputs and end state) and the unsharded recurrent form's autodiff (gradients), with its own
negative control.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from seqjax.ops import linear
from seqjax.ops.linear.context_parallel import decayed_linear_attention_context_parallel, delta_rule_context_parallel
from tests.ops.linear.test_numpy_oracle import delta_rule_oracle

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


# The delta rule (DeltaNet, Gated DeltaNet): its shard maps are P x P matrices (`delta_rule_context_parallel`).

def _delta_inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  k = f(B, L, N, KP)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)  # unit keys, as the mixer makes them
  beta = (1.0 / (1.0 + np.exp(-f(B, L, N)))).astype(np.float32)
  return f(B, L, N, KP), k, f(B, L, N, H), beta, (-np.exp(f(B, L, N)) * 0.3).astype(np.float32)


def _sharded_delta(mesh_name, fn):
  """fn(q, k, v, beta, g, seg) on the local shards -> (o, the state after the whole sequence)."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(MESHES[mesh_name]), ("data", "seq"))
  spec = P("data", "seq")

  def run(q, k, v, beta, g, seg):
    o, s = jax.shard_map(lambda *a: (lambda o, s: (o, s[None]))(*fn(*a)), mesh=mesh, in_specs=(spec,) * 6,
                         out_specs=(spec, P("seq", "data")))(q, k, v, beta, g, seg)
    return o, s[-1]
  return run


@pytest.mark.parametrize("gated, mesh, combine, chunk", [
    pytest.param(False, "data2_seq4", "all_gather", 4, id="deltanet_data2_seq4_all_gather",
                 marks=pytest.mark.slow),  # the same scheme as the gated case; DeltaNet runs in the nn and LM tests
    pytest.param(True, "data2_seq4", "all_gather", 3, id="gated_data2_seq4_all_gather_ragged_chunks"),
    pytest.param(True, "seq8", "ppermute", 4, id="gated_seq8_ppermute", marks=pytest.mark.slow)])
def test_context_parallel_delta_rule_equals_the_whole_sequence(gated, mesh, combine, chunk):
  """Outputs and end state against the float64 NumPy loop of the recurrence (tests/ops/linear/test_numpy_oracle);
  gradients of q, k, v, beta and the gate against autodiff of the unsharded recurrent form. Packed documents: one
  starts on a shard boundary (position 8), others inside shards; row 1 is one document crossing every shard.
  Catches: the matrix maps composed in the wrong order, S_in read through R_t instead of R_t^T, the identity not cut
  where a shard starts a document, a reset inside a shard not cutting the map."""
  q, k, v, beta, g = _delta_inputs()
  g = g if gated else None
  seg = jnp.asarray(SEGMENTS)
  sharded = _sharded_delta(mesh, lambda q, k, v, beta, g, s: delta_rule_context_parallel(
      q, k, v, beta, log_decay=g if gated else None, segment_ids=s, chunk_size=chunk, return_final_state=True,
      combine=combine))
  o, s = jax.jit(sharded)(q, k, v, beta, np.zeros_like(beta) if g is None else g, seg)
  want_o, want_s = delta_rule_oracle(q, k, v, beta, np.zeros((B, N, KP, H)), SEGMENTS, g)
  np.testing.assert_allclose(o, want_o, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(s, want_s, atol=2e-5, rtol=1e-4)

  w = np.random.default_rng(1).standard_normal((B, L, N, H)).astype(np.float32)
  whole = lambda q, k, v, beta, g, s: linear.delta_rule(  # noqa: E731
      q, k, v, beta, log_decay=g if gated else None, segment_ids=s, mode="recurrent", return_final_state=True)

  def loss(fn):
    def f(q, k, v, beta, g):
      o, s = fn(q, k, v, beta, g, seg)
      return jnp.sum(o * w) + jnp.sum(s ** 2)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4) if gated else (0, 1, 2, 3)))

  g_in = np.zeros_like(beta) if g is None else g
  (value, grads), (want_value, want_grads) = loss(sharded)(q, k, v, beta, g_in), loss(whole)(q, k, v, beta, g_in)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for name, got, want in zip("q k v beta g".split(), grads, want_grads):
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4, err_msg=f"d loss / d {name}")


def test_delta_rule_negative_control_and_refusal():
  """Shards run alone (no incoming state) differ from the whole sequence by far more than the tolerance above."""
  q, k, v, beta, g = _delta_inputs()
  alone, _ = jax.jit(_sharded_delta("data2_seq4", lambda q, k, v, beta, g, s: linear.delta_rule(
      q, k, v, beta, log_decay=g, segment_ids=s, chunk_size=4, return_final_state=True)))(
          q, k, v, beta, g, jnp.asarray(SEGMENTS))
  want_o, _ = delta_rule_oracle(q, k, v, beta, np.zeros((B, N, KP, H)), SEGMENTS, g)
  assert np.max(np.abs(np.asarray(alone) - want_o)) > 1e-2
  with pytest.raises(ValueError, match="starts from a zero state"):
    delta_rule_context_parallel(q, k, v, beta, initial_state=jnp.zeros((B, N, KP, H)))
  with pytest.raises(ValueError, match=r"beta must be \[B, T, N\]"):
    delta_rule_context_parallel(q, k, v, beta[..., :1])
