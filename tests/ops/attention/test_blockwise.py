"""Blockwise attention == reference attention (forward and gradients) across masks, GQA, lengths and dtypes.

Both tile programs are tested: "jax" (the JAX tiles that GPUs/TPUs run: `blockwise_attention` traced with the CPU
kernels off) and "native" (the C++ kernel that `blockwise_attention` runs on a CPU, called through its binding
`seqjax.cpu_kernels.attention.flash_attention`) wherever the C++ kernel covers the mask/bias.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import cpu_kernels
from seqjax.cpu_kernels.attention import flash_attention
from seqjax.ops import attention, backend
from seqjax.ops.attention import masks, positions
from seqjax.ops.attention.blockwise import BLOCKWISE_BLOCK, make_plan, resolve_blocks

B, N, H = 2, 4, 8
TOL = {jnp.float32: 2e-5}
BF16_RMS_TOL, BF16_ELEM_TOL = 1e-2, 4e-2  # bfloat16 against float32, see _assert_bf16_close


def _qkv(T, S, K, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
          jax.random.normal(kv, (B, S, K, H), dtype))


def _segments(length, seed):
  ids = np.sort(np.random.default_rng(seed).integers(1, 4, size=(B, length)), axis=1)
  ids[0, -3:] = 0  # trailing padding in batch row 0
  return jnp.asarray(ids, jnp.int32)


def _mask(kind, T, S):
  """(mask, bias) for a case name."""
  if kind == "none":
    return None, None
  if kind == "causal":
    return masks.Causal(), None
  if kind == "window":
    return masks.SlidingWindow(5, 2), None
  if kind == "causal_segments":
    return masks.Causal() & masks.SegmentIds(_segments(T, 0), _segments(S, 0)), None
  if kind == "key_padding_empty_row":
    return masks.KeyPadding(jnp.array([0, S - 4])), None
  if kind == "prefix":
    return masks.PrefixLM(jnp.array([3, 11])), None
  if kind == "causal_window_or_global":
    return masks.Causal() & (masks.SlidingWindow(6, 0) | masks.GlobalTokens(3)), None
  if kind == "causal_alibi":
    return masks.Causal(), positions.AlibiBias(positions.alibi_slopes(N))
  if kind == "alibi":  # a bias on tiles that need no masking
    return None, positions.AlibiBias(positions.alibi_slopes(N))
  if kind == "segments_alibi":
    return masks.Causal() & masks.SegmentIds(_segments(T, 1), _segments(S, 1)), positions.AlibiBias(
        positions.alibi_slopes(N))
  if kind == "offset_causal":  # queries are the last T of S positions (a chunk after a cache)
    return masks.Causal(q_offset=S - T), None
  if kind == "traced_offset_causal":
    return masks.Causal(q_offset=jnp.int32(S - T)) & masks.KeyPadding(jnp.array([S, S - 2])), None
  raise AssertionError(kind)


# Masks the native kernel covers (the others always run the JAX tiles, tested as "jax").
NATIVE_CASES = {"none", "causal", "window", "causal_segments", "key_padding_empty_row", "offset_causal"}
IMPLS = ["jax", "native"]


def _jax_tiles(q, k, v, **kw):
  with backend.cpu_kernels_mode("off"):  # read when traced: this function always traces the JAX tiles
    return attention.blockwise_attention(q, k, v, **kw)


def _impl(name):
  if name == "jax":
    return _jax_tiles
  if not cpu_kernels.available("flash_attention"):
    pytest.skip(f"CPU kernel unavailable: {cpu_kernels.unavailable_reason('flash_attention')}")
  return flash_attention


def _run(fn, q, k, v, mask, bias, cotangent_dtype=None, **kw):
  """Output and the gradients of a fixed random projection of it, from one jitted function. The projection is
  rounded to `cotangent_dtype` (default: the output's), so a float32 run can use the bfloat16 one's."""
  w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)
  if cotangent_dtype is not None:
    w = w.astype(cotangent_dtype)

  @jax.jit
  def run(q, k, v):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask=mask, bias=bias, **kw), q, k, v)
    return out, pullback(w.astype(out.dtype))

  return run(q, k, v)


def _assert_close(got, want, dtype):
  tol = TOL[dtype]
  scale = max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * scale, rtol=tol)


def _float32_reference(q, k, v, mask, bias):
  """The float32 reference from the same (bfloat16-rounded) inputs and cotangent as a bfloat16 run."""
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  return _run(attention.reference_attention, f32(q), f32(k), f32(v), mask, bias, cotangent_dtype=q.dtype)


def _assert_bf16_close(got, want, rms_tol=BF16_RMS_TOL, elem_tol=BF16_ELEM_TOL):
  """A bfloat16 result against the float32 reference, in units of the reference's own scale: relative RMS error
  below `rms_tol` and every element within `elem_tol` of (its own magnitude + the reference's RMS). A result off by
  a constant factor of 0.9 misses both by far."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  rms = np.sqrt(np.mean(want ** 2))
  err = got - want
  rel_rms = np.sqrt(np.mean(err ** 2)) / rms
  assert rel_rms < rms_tol, f"relative RMS error {rel_rms:.3g} >= {rms_tol}"
  worst = float(np.max(np.abs(err) / (np.abs(want) + rms)))
  assert worst < elem_tol, f"worst element error {worst:.3g} of (|reference| + RMS) >= {elem_tol}"


# Plain and offset causal masks are covered by the GQA / length / dtype cases below.
CASES = ["none", "window", "causal_segments", "key_padding_empty_row", "prefix", "causal_window_or_global",
         "causal_alibi", "alibi", "traced_offset_causal"]


@pytest.mark.parametrize("kind,impl", [(kind, impl) for kind in CASES + ["offset_causal"] for impl in IMPLS
                                       if impl == "jax" or kind in NATIVE_CASES])
def test_blockwise_equals_reference_masks(kind, impl):
  T = S = 37  # not a multiple of either block size
  if kind in ("offset_causal", "traced_offset_causal"):
    T = 13
  q, k, v = _qkv(T, S, K=2)
  mask, bias = _mask(kind, T, S)
  out_b, grads_b = _run(_impl(impl), q, k, v, mask, bias, block_q=8, block_kv=16)
  out_r, grads_r = _run(attention.reference_attention, q, k, v, mask, bias)
  _assert_close(out_b, out_r, jnp.float32)
  for gb, gr in zip(grads_b, grads_r):
    assert np.isfinite(np.asarray(gb)).all()
    _assert_close(gb, gr, jnp.float32)


@pytest.mark.parametrize("K,T,S,blocks,dtype", [
    (4, 19, 19, (16, 8), jnp.float32),     # multi-head, ragged blocks
    (1, 10, 33, (4, 8), jnp.float32),      # multi-query, S > T
    (2, 33, 10, (8, 4), jnp.bfloat16),     # grouped-query, T > S, bfloat16
    (1, 19, 19, (8, 8), jnp.bfloat16),
    (2, 7, 7, (None, None), jnp.float32),  # default blocks capped at the lengths
])
@pytest.mark.parametrize("impl", IMPLS)
def test_blockwise_gqa_cross_lengths_dtypes(K, T, S, blocks, dtype, impl):
  q, k, v = _qkv(T, S, K, dtype=dtype, seed=1)
  mask = masks.Causal(q_offset=max(0, S - T))
  out_b, grads_b = _run(_impl(impl), q, k, v, mask, None, block_q=blocks[0], block_kv=blocks[1])
  if dtype == jnp.bfloat16:
    out_r, grads_r = _float32_reference(q, k, v, mask, None)
    check = _assert_bf16_close
  else:
    out_r, grads_r = _run(attention.reference_attention, q, k, v, mask, None)
    check = lambda got, want: _assert_close(got, want, dtype)  # noqa: E731
  assert out_b.dtype == dtype and all(g.dtype == dtype for g in grads_b)
  check(out_b, out_r)
  for gb, gr in zip(grads_b, grads_r):
    check(gb, gr)


def _assert_bf16_run_close(out_b, grads_b, out_r, grads_r):
  """A bfloat16 run (output and gradients stay bfloat16, gradients finite) against its float32 reference."""
  assert out_b.dtype == jnp.bfloat16
  _assert_bf16_close(out_b, out_r)
  for gb, gr in zip(grads_b, grads_r):
    assert gb.dtype == jnp.bfloat16 and np.isfinite(np.asarray(gb, np.float32)).all()
    _assert_bf16_close(gb, gr)


@pytest.mark.parametrize("K,blocks", [(1, (8, 16)), (2, (16, 8)), (4, (8, 8))])
def test_blockwise_bfloat16_masks_bias_gqa(K, blocks):
  """The masked and biased tile paths of both passes in bfloat16, with every head grouping, T != S, ragged."""
  T, S = 29, 37
  q, k, v = _qkv(T, S, K, dtype=jnp.bfloat16, seed=2)
  mask, bias = _mask("segments_alibi", T, S)
  mask = mask & masks.Causal(q_offset=S - T)
  out_b, grads_b = _run(_impl("jax"), q, k, v, mask, bias, block_q=blocks[0], block_kv=blocks[1])
  out_r, grads_r = _float32_reference(q, k, v, mask, bias)
  _assert_bf16_run_close(out_b, grads_b, out_r, grads_r)


@pytest.mark.parametrize("kind", ["window", "causal_segments", "key_padding_empty_row"])
def test_native_bfloat16_masks_gqa(kind):
  """The C++ kernel's masked tiles in bfloat16 (grouped-query, ragged blocks, an empty row), against float32."""
  T = S = 37
  q, k, v = _qkv(T, S, K=2, dtype=jnp.bfloat16, seed=3)
  mask, bias = _mask(kind, T, S)
  out_b, grads_b = _run(_impl("native"), q, k, v, mask, bias, block_q=8, block_kv=16)
  out_r, grads_r = _float32_reference(q, k, v, mask, bias)
  _assert_bf16_run_close(out_b, grads_b, out_r, grads_r)


@pytest.mark.parametrize("impl", IMPLS)
def test_blockwise_causal_by_gradients(impl):
  q, k, v = _qkv(20, 20, K=2)
  t = 9
  fn = _impl(impl)
  grads = jax.jit(jax.grad(
      lambda k, v: fn(q, k, v, causal=True, block_q=4, block_kv=4)[:, t].sum(),
      argnums=(0, 1)))(k, v)
  for g in grads:
    assert np.abs(np.asarray(g[:, t + 1:])).max() == 0.0
    assert np.abs(np.asarray(g[:, :t + 1])).max() > 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_zero_and_no_nan(impl):
  q, k, v = _qkv(12, 12, K=2)
  ids = jnp.array([[0] * 12, [1] * 6 + [0] * 6])  # row 0 is all padding
  mask = masks.Causal() & masks.SegmentIds(ids, ids)
  out, grads = _run(_impl(impl), q, k, v, mask, None, block_q=4, block_kv=4)
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(out[1, 6:], 0.0)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_plan_skips_empty_tiles():
  plan = make_plan(masks.Causal(), 64, 64, 16, 16)
  assert plan.visited_tiles == 4 * 5 // 2
  np.testing.assert_array_equal(plan.n_full_kv, [0, 1, 2, 3])
  np.testing.assert_array_equal(plan.n_part_kv, [1, 1, 1, 1])
  np.testing.assert_array_equal(plan.part_kv[:, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(plan.n_full_q, [3, 2, 1, 0])
  window = make_plan(masks.SlidingWindow(15, 0), 128, 128, 16, 16)
  assert window.visited_tiles == 8 + 7  # the diagonal and the one below it
  # Padding keys in a ragged last block force masking there.
  ragged = make_plan(None, 20, 20, 8, 8)
  np.testing.assert_array_equal(ragged.n_part_kv, [1, 1, 1])
  np.testing.assert_array_equal(ragged.n_full_kv, [2, 2, 2])


def test_default_blocks():
  largest = (BLOCKWISE_BLOCK, BLOCKWISE_BLOCK)
  assert resolve_blocks(65536, 4096, None, None, largest=largest) == (512, 512)
  assert resolve_blocks(1024, 256, None, None, largest=largest) == (256, 64)  # >= 4 tiles per axis, down to 64
  assert resolve_blocks(40, 40, None, None, largest=largest) == (40, 40)
  assert resolve_blocks(4096, 4096, None, None) == (256, 256)  # the shared default (Pallas) is unchanged
  assert resolve_blocks(4096, 4096, 128, None, largest=largest) == (128, 512)


@pytest.mark.parametrize("impl", IMPLS)
def test_default_blocks_ragged_equal_reference(impl):
  """Default tiles (JAX: 272 x 272 over 1090 rows, a ragged fifth block; native: 64 x 128) with GQA and a
  packed causal mask."""
  q, k, v = _qkv(1090, 1090, K=2, seed=3)
  mask = masks.Causal() & masks.SegmentIds(_segments(1090, 3), _segments(1090, 3))
  out_b, grads_b = _run(_impl(impl), q, k, v, mask, None)
  out_r, grads_r = _run(attention.reference_attention, q, k, v, mask, None)
  _assert_close(out_b, out_r, jnp.float32)
  for gb, gr in zip(grads_b, grads_r):
    _assert_close(gb, gr, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_retrace_when_data_changes(impl):
  fn = _impl(impl)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(q, k, v, ids, lengths):
    mask = masks.Causal() & masks.SegmentIds(ids, ids) & masks.KeyPadding(lengths)
    return fn(q, k, v, mask=mask, block_q=8, block_kv=8)

  for seed in range(3):
    q, k, v = _qkv(16, 16, K=2, seed=seed)
    f(q, k, v, _segments(16, seed), jnp.array([16 - seed, 9]))


def test_blockwise_is_registered_validates_and_runs_without_jit():
  assert attention.get_attention("blockwise") is attention.blockwise_attention
  q, k, v = _qkv(8, 8, K=2)
  np.testing.assert_allclose(attention.blockwise_attention(q, k, v, causal=True, block_q=4, block_kv=4),
                             attention.reference_attention(q, k, v, causal=True), rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="reference"):
    attention.blockwise_attention(q, k, v, bias=jnp.zeros((B, N, 8, 8)))
  with pytest.raises(ValueError, match="block_q"):
    attention.blockwise_attention(q, k, v, block_q=0)
