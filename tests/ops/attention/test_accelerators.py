"""The accelerator backends ("splash", "pallas_gpu", "cudnn", "auto") against a float64 NumPy oracle.

Splash (JAX's TPU kernel) and the Pallas GPU (Triton) kernel run here in the Pallas interpreter: the same kernel
code as on the accelerator, so a wrong translation of our masks (an off-by-one window, segment ids or padding
mixed up, GQA heads grouped wrongly, a missing scale) shows up as a wrong number. The oracle
(`_attention64` and `_grads64`) materialises the softmax in float64 from the equations; it shares no code with
the kernels or with `reference_attention`. Gradients go through each kernel's own backward (custom VJP).

Bugs these catch: padded queries (segment id 0) attending to each other (splash and the Triton kernel treat id 0 as
a segment), rows with no visible key returning the mean of the values instead of 0, a window's left side off by
one, KeyPadding not reaching the kernel, "auto" running an accelerator kernel (or its interpreter) on the CPU, and a
program lowered for a TPU or CUDA not containing the kernel.

Interpret mode is slow: shapes are the smallest the kernels accept (splash: multiples of 128).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax.ops import attention
from seqjax.ops.attention import masks

WINDOW = 40  # SlidingWindow(WINDOW, 0): the query and 40 keys before it


def _visible64(kind, B, T, S, seg, lengths):
  """bool [B, T, S] written from the definitions."""
  t, s = np.arange(T)[:, None], np.arange(S)[None, :]
  vis = np.ones((B, T, S), bool)
  if kind in ("causal", "segments"):
    vis &= (s <= t)[None]
  if kind == "window":
    vis &= ((s <= t) & (s >= t - WINDOW))[None]
  if kind == "segments":
    vis &= (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
  if kind == "key_padding":
    vis &= s[None] < lengths[:, None, None]
  return vis


def _mask(kind, seg, lengths):
  if kind == "segments":
    seg = jnp.asarray(seg)
    return masks.Causal() & masks.SegmentIds(seg, seg)
  if kind == "key_padding":
    return masks.KeyPadding(jnp.asarray(lengths))
  return {"none": None, "causal": masks.Causal(), "window": masks.SlidingWindow(WINDOW, 0)}[kind]


def _probs64(q, k, vis):
  G = q.shape[2] // k.shape[2]
  kg = np.repeat(k, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, kg) / np.sqrt(q.shape[-1])
  s = np.where(vis[:, None], s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  e = np.where(vis[:, None], np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  z = e.sum(-1, keepdims=True)
  return e / np.where(z == 0, 1.0, z), kg


def _attention64(q, k, v, vis):
  p, _ = _probs64(q, k, vis)
  return np.einsum("bnts,bsnh->btnh", p, np.repeat(v, q.shape[2] // k.shape[2], axis=2))


def _grads64(q, k, v, vis, d_out):
  """dq, dk, dv of sum(out * d_out) by the softmax backward equations (summed over each kv head's group)."""
  B, T, N, H = q.shape
  K = k.shape[2]
  p, kg = _probs64(q, k, vis)
  vg = np.repeat(v, N // K, axis=2)
  dv = np.einsum("bnts,btnh->bsnh", p, d_out)
  dp = np.einsum("btnh,bsnh->bnts", d_out, vg)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(H)
  dq = np.einsum("bnts,bsnh->btnh", ds, kg)
  dk = np.einsum("bnts,btnh->bsnh", ds, q)
  fold = lambda x: x.reshape(B, -1, K, N // K, H).sum(3)  # noqa: E731
  return dq, fold(dk), fold(dv)


def _case(kind, B, T, N, K, H, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, T, n, H)).astype(np.float32) for n in (N, K, K))
  seg = np.sort(rng.integers(1, 4, size=(B, T)), axis=1).astype(np.int32)
  seg[0, -T // 8:] = 0  # padding at the end of row 0
  lengths = np.array([0, T // 3, T, T - 5][:B], np.int32)  # row 0: no visible key at all
  d_out = rng.standard_normal((B, T, N, H)).astype(np.float32)
  return q, k, v, seg, lengths, d_out


def _check_against_oracle(fn, kind, B, T, N, K, H, grads=True, **kw):
  q, k, v, seg, lengths, d_out = _case(kind, B, T, N, K, H)
  mask = _mask(kind, seg, lengths)
  vis = _visible64(kind, B, T, T, seg, lengths)
  q64, k64, v64, d64 = (a.astype(np.float64) for a in (q, k, v, d_out))

  def loss(q, k, v):
    out = fn(q, k, v, mask=mask, **kw)
    return jnp.sum(out * d_out), out

  if grads:
    (_, out), got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    for name, g, want in zip(("dq", "dk", "dv"), got, _grads64(q64, k64, v64, vis, d64)):
      np.testing.assert_allclose(np.asarray(g), want, atol=2e-4, rtol=2e-4, err_msg=name)
  else:
    out = jax.jit(lambda q, k, v: loss(q, k, v)[1])(q, k, v)
  np.testing.assert_allclose(np.asarray(out), _attention64(q64, k64, v64, vis), atol=2e-5, rtol=2e-5)


class SplashTest(parameterized.TestCase):
  """Splash, interpreted, = float64 attention: 2 x 2 blocks of 128, GQA (4 query heads on 2 kv heads)."""

  @parameterized.named_parameters(("window", "window"), ("segments", "segments"))
  def test_forward_and_gradients(self, kind):
    _check_against_oracle(attention.splash_attention, kind, B=1, T=256, N=4, K=2, H=16, block_q=128, block_kv=128)

  def test_forward_key_padding_with_empty_rows(self):
    # KeyPadding with a length-0 row: every query of that row sees nothing and must come out 0 (the sink).
    _check_against_oracle(attention.splash_attention, "key_padding", B=2, T=128, N=2, K=2, H=16, grads=False)

  def test_bfloat16_keeps_dtype_near_float32(self):
    """bf16 inputs: output in bf16 within bf16 rounding of the float64 attention of the same (rounded) inputs."""
    q, k, v, _, _, _ = _case("causal", 1, 128, 2, 1, 16)
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    out = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, causal=True))(q, k, v)
    assert out.dtype == jnp.bfloat16
    want = _attention64(*(np.asarray(a, np.float64) for a in (q, k, v)), _visible64("causal", 1, 128, 128, None, None))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2e-2)


class PallasGpuTest(parameterized.TestCase):
  """The Pallas GPU (Triton) kernel, interpreted, = float64 attention (GQA by repeated kv heads)."""

  def test_segments_forward_and_gradients(self):
    _check_against_oracle(attention.pallas_gpu_attention, "segments", B=2, T=64, N=4, K=2, H=16)


@pytest.mark.slow
class SlowKernelTest(parameterized.TestCase):
  """The remaining mask kinds (each kernel's causal case is also inside its segments case)."""

  def test_splash_causal(self):
    _check_against_oracle(attention.splash_attention, "causal", B=1, T=256, N=4, K=2, H=16, block_q=128, block_kv=128)

  def test_splash_no_mask_multi_query(self):
    _check_against_oracle(attention.splash_attention, "none", B=2, T=128, N=2, K=1, H=16, grads=False)

  @parameterized.named_parameters(("causal", "causal"), ("none", "none"))
  def test_pallas_gpu(self, kind):
    _check_against_oracle(attention.pallas_gpu_attention, kind, B=2, T=64, N=4, K=2, H=16)


def _custom_calls(text):
  return set(re.findall(r"custom_call @([\w$.]+)", text)) | set(re.findall(r'call_target_name = "([^"]+)"', text))


TRITON = "__gpu$xla.gpu.triton"


class AutoTest(parameterized.TestCase):

  def test_auto_on_cpu_is_blockwise(self):
    """On this CPU "auto" computes exactly what blockwise computes, and its CPU program has no TPU / Triton call
    (neither the compiled kernels nor their interpreters, which would be far slower)."""
    q, k, v, seg, _, _ = _case("segments", 2, 128, 4, 2, 16)
    mask = _mask("segments", seg, None)
    auto = jax.jit(lambda q, k, v: attention.auto_attention(q, k, v, mask=mask))
    blockwise = jax.jit(lambda q, k, v: attention.blockwise_attention(q, k, v, mask=mask))
    np.testing.assert_array_equal(np.asarray(auto(q, k, v)), np.asarray(blockwise(q, k, v)))
    calls = _custom_calls(auto.lower(q, k, v).as_text())
    assert not {c for c in calls if c == "tpu_custom_call" or "triton" in c}, calls
    interpreted = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, mask=mask)).lower(q, k, v).as_text()
    assert len(interpreted) > 2 * len(auto.lower(q, k, v).as_text())  # the interpreter would show up in the size

  def test_choice_per_platform(self):
    """What "auto" picks, and its explicit fallbacks with the reason."""
    x = jax.ShapeDtypeStruct((1, 256, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 16), jnp.float32)
    seg = jnp.ones((1, 256), jnp.int32)
    assert attention.auto_choice("cpu", x, kv, kv, causal=True) == ("blockwise", [])
    assert attention.auto_choice("tpu", x, kv, kv, causal=True) == ("splash", [])
    assert attention.auto_choice("tpu", x, kv, kv, mask=masks.SlidingWindow(8, 0) & masks.SegmentIds(seg, seg)
                                 )[0] == "splash"
    name, reasons = attention.auto_choice("tpu", x, kv, kv, mask=masks.PrefixLM(jnp.array([3])))
    assert name == "blockwise" and "PrefixLM" in reasons[0], reasons
    # No cuDNN in this process: CUDA gets the Pallas (Triton) kernel, or blockwise for a window it cannot express.
    name, reasons = attention.auto_choice("cuda", x, kv, kv, mask=masks.Causal() & masks.SegmentIds(seg, seg))
    assert name == "pallas_gpu" and "cuDNN" in reasons[0], reasons
    name, reasons = attention.auto_choice("cuda", x, kv, kv, mask=masks.SlidingWindow(8, 0))
    assert name == "blockwise" and len(reasons) == 2, reasons
    short = jax.ShapeDtypeStruct((1, 100, 4, 16), jnp.float32)
    name, reasons = attention.auto_choice("tpu", short, short, short, causal=True)
    assert name == "blockwise" and "multiple of 128" in reasons[0], reasons

  def test_one_program_exports_for_each_platform(self):
    """One jitted "auto" function (forward and backward) exports with the splash kernel for TPU, the Triton kernel
    for CUDA and neither for CPU."""
    x = jax.ShapeDtypeStruct((1, 128, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 128, 2, 16), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention.auto_attention(q, k, v, causal=True)),
                            argnums=(0, 1, 2)))
    tpu = _custom_calls(jax.export.export(grad, platforms=("tpu",))(x, kv, kv).mlir_module())
    cuda = _custom_calls(jax.export.export(
        grad, platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(x, kv, kv).mlir_module())
    cpu = _custom_calls(grad.lower(x, kv, kv).as_text())  # (its C++ kernel call cannot be exported: no guarantee)
    assert "tpu_custom_call" in tpu and TRITON not in tpu, tpu
    assert TRITON in cuda and "tpu_custom_call" not in cuda, cuda
    assert "tpu_custom_call" not in cpu and TRITON not in cpu, cpu


def _qkv(T=128, S=128, N=4, K=2, H=16):
  return (jnp.zeros((1, T, N, H)), jnp.zeros((1, S, K, H)), jnp.zeros((1, S, K, H)))


@pytest.mark.parametrize("impl, kwargs, message", [
    ("cudnn", dict(causal=True), "needs a CUDA GPU with cuDNN"),
    ("cudnn", dict(mask=masks.SegmentIds(jnp.ones((1, 128), jnp.int32), jnp.ones((1, 128), jnp.int32))),
     "segment ids are not supported"),
    ("splash", dict(mask=masks.GlobalTokens(4)), "cannot express the mask piece GlobalTokens"),
    ("splash", dict(causal=True, block_q=64), "multiple of 128"),
    ("splash", dict(mask=masks.Causal(q_offset=jnp.int32(3))), "traced (array) offsets"),
    ("pallas_gpu", dict(mask=masks.SlidingWindow(8, 0)), "causal attention (offset 0) only"),
    ("pallas_gpu", dict(mask=masks.SegmentIds(jnp.ones((1, 128), jnp.int32), jnp.full((1, 128), 2, jnp.int32))),
     "one segment-id array"),
    ("auto", dict(bias=jnp.zeros((1, 4, 128, 128))), "bias must be a per-tile bias object"),
])
def test_clear_errors(impl, kwargs, message):
  """Each refusal names what cannot be expressed, before any kernel runs."""
  with pytest.raises(ValueError, match=re.escape(message)):
    attention.get_attention(impl)(*_qkv(), **kwargs)


def test_splash_length_error():
  with pytest.raises(attention.UnsupportedAttention, match="query length 100 must be a multiple of 128"):
    attention.splash_attention(*_qkv(T=100), causal=True)
