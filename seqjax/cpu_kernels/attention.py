"""Flash attention as a CPU kernel (C++, XLA FFI): what `blockwise_attention` runs on a CPU (op family "attention").

The algorithm is the one of `seqjax.ops.attention.blockwise` (tiles, online softmax, key-major backward recomputing
the probabilities from the saved log-sum-exp, O(T) memory); `src/flash_attention.cc` implements it with
register-blocked SIMD matmuls and runs its work items on XLA's intra-op thread pool, which a JAX program cannot
do on a CPU (XLA runs each fusion inside a loop body on one core, and between two tile matmuls the tile leaves the
cache). On other platforms, and for what the kernel does not cover, `blockwise_attention` runs its JAX tiles.

Covered: float32 / bfloat16 / float16 inputs (computed in float32), GQA/MQA, any lengths, T != S, and masks made
of an `And` of at most: `Causal` and `SlidingWindow` with static offsets (any number; they intersect into one band
`lo <= (j - i) <= hi` on array rows), one `SegmentIds`, one `KeyPadding`. Not covered (the JAX kernel runs):
`bias` (ALiBi), `GlobalTokens`, `PrefixLM`, `Or`, traced offsets (decoding steps).

    flash_attention(q, k, v, *, causal=False, mask=None, scale=None, block_q=None, block_kv=None)

raises ValueError for an uncovered mask or bias; `supports(...)` says beforehand.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cpu_kernels import _build
from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import check_inputs, default_scale

KERNEL = "flash_attention"

# Default tile sides of the kernel. A query tile has G * block_q rows (the query heads of one kv group are
# folded in), so block_q shrinks as G grows to keep the tile and its [rows, block_kv] score buffer in L2. Long
# sequences take 128 x 128 tiles; up to SHORT_LEN, 64 x 64 tiles waste less on the causal diagonal and let packed
# segments skip more tiles (B=16, T=256, N=4, H=32 causal + segments: forward+backward 9.6 vs 12.4 ms; at T=4096,
# B=1, N=8, H=64, 128-row tiles are 0.66-0.72 of a dense matmul and 64 x 64 ones 0.60).
TILE_ROWS = 128
BLOCK_KV = 128
SHORT_LEN = 512
_UNBOUNDED = 1 << 62
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


class KernelMask(NamedTuple):
  """The canonical mask the kernel evaluates: static attributes + (q_seg [B, T], kv_seg [B, S], kv_len [B])."""
  has_band: bool
  band_lo: int
  band_hi: int
  has_seg: bool
  has_pad: bool
  pad_id: int
  has_len: bool


def canonical_mask(mask: masks_lib.Mask | None):
  """(KernelMask, arrays) for a mask the kernel covers, or None."""
  parts = [] if mask is None else (list(mask.masks) if type(mask) is masks_lib.And else [mask])
  lo, hi, band = -_UNBOUNDED, _UNBOUNDED, False
  seg = lengths = None
  for m in parts:
    kind = type(m)
    if kind in (masks_lib.Causal, masks_lib.SlidingWindow):
      if not m._offsets_static():  # pylint: disable=protected-access
        return None
      shift = int(m.kv_offset) - int(m.q_offset)  # visible iff lo' <= (j - i) + shift <= hi'
      if kind is masks_lib.Causal:
        m_lo, m_hi = None, 0
      else:
        m_lo, m_hi = (None if m.left is None else -m.left), m.right
      if m_lo is not None:
        lo = max(lo, m_lo - shift)
      if m_hi is not None:
        hi = min(hi, m_hi - shift)
      band = True
    elif kind is masks_lib.SegmentIds and seg is None:
      seg = m
    elif kind is masks_lib.KeyPadding and lengths is None:
      lengths = m
    else:
      return None
  spec = KernelMask(band, lo, hi, seg is not None, seg is not None and seg.padding_id is not None,
                    0 if seg is None or seg.padding_id is None else int(seg.padding_id), lengths is not None)
  dummy = jnp.zeros((1,), jnp.int32)
  arrays = (dummy if seg is None else jnp.asarray(seg.q_ids, jnp.int32),
            dummy if seg is None else jnp.asarray(seg.kv_ids, jnp.int32),
            dummy if lengths is None else jnp.asarray(lengths.lengths, jnp.int32))
  return spec, arrays


def supports(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.Mask | None = None,
             bias: Any = None) -> bool:
  """Whether `flash_attention` covers these arguments (dtypes, mask, bias)."""
  if bias is not None or any(x.dtype not in _FLOATS for x in (q, k, v)):
    return False
  return canonical_mask(mask) is not None


def tile_sides(G: int, T: int, S: int, block_q: int | None, block_kv: int | None) -> tuple[int, int]:
  """(block_q, block_kv) of the kernel: the given sides or the defaults above, capped at T and S."""
  rows = TILE_ROWS if T > SHORT_LEN else TILE_ROWS // 2
  bq = block_q or max(8, rows // G)
  bk = block_kv or (BLOCK_KV if S > SHORT_LEN else BLOCK_KV // 2)
  return max(1, min(bq, T)), max(1, min(bk, S))


def _attrs(spec: KernelMask, scale: float, bq: int, bk: int) -> dict:
  return dict(block_q=np.int64(bq), block_kv=np.int64(bk), scale=np.float32(scale), has_band=spec.has_band,
              band_lo=np.int64(spec.band_lo), band_hi=np.int64(spec.band_hi), has_seg=spec.has_seg,
              has_pad=spec.has_pad, pad_id=np.int64(spec.pad_id), has_len=spec.has_len)


def _call_forward(q, k, v, arrays, spec, scale, bq, bk):
  B, T, N, H = q.shape
  f32 = jnp.float32
  out_types = (jax.ShapeDtypeStruct((B, T, N, H), f32), jax.ShapeDtypeStruct((B, T, N), f32))
  return jax.ffi.ffi_call("seqjax_flash_attention_fwd", out_types, vmap_method="sequential")(
      q.astype(f32), k.astype(f32), v.astype(f32), *arrays, **_attrs(spec, scale, bq, bk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash(q, k, v, arrays, spec, scale, bq, bk):
  """The kernel with its custom_vjp: `arrays`, `spec` from `canonical_mask`; static scale and tile sides."""
  return _call_forward(q, k, v, arrays, spec, scale, bq, bk)[0].astype(q.dtype)


def _flash_fwd(q, k, v, arrays, spec, scale, bq, bk):
  out, lse = _call_forward(q, k, v, arrays, spec, scale, bq, bk)
  return out.astype(q.dtype), (q, k, v, arrays, out, lse)


def _flash_bwd(spec, scale, bq, bk, residuals, d_out):
  q, k, v, arrays, out, lse = residuals
  f32 = jnp.float32
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, f32) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call("seqjax_flash_attention_bwd", out_types, vmap_method="sequential")(
      q.astype(f32), k.astype(f32), v.astype(f32), out, lse, d_out.astype(f32), *arrays,
      **_attrs(spec, scale, bq, bk))
  zeros = tuple(np.zeros(a.shape, jax.dtypes.float0) for a in arrays)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), zeros


flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                    mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None,
                    block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
  """Flash attention by the CPU kernel (CPU only; `blockwise_attention` picks it where it applies).

  Args: as `blockwise_attention`. `block_q` counts query positions (a tile has G * block_q rows; default
  max(8, 128 // G), halved up to T = 512), `block_kv` keys (default 128; 64 up to S = 512).

  Returns:
    [B, T, N, H] in q's dtype (computed in float32); rows with no visible key are 0.

  Raises:
    ValueError: a bias, or a mask outside the covered set (see the module docstring).
    CpuKernelBuildError: the kernel is unavailable here (the message says why).
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  dims = check_inputs("flash_attention", q, k, v, mask, bias, array_bias=False)
  mask = masks_lib.combine(causal, mask)
  canonical = canonical_mask(mask)
  if bias is not None or canonical is None:
    raise ValueError(f"flash_attention (CPU kernel) covers Causal / SlidingWindow (static offsets), SegmentIds and "
                     f"KeyPadding combined with &, and no bias; got mask={mask!r}, bias={type(bias).__name__}. Use "
                     f"blockwise_attention, which runs its JAX tiles for these.")
  if any(x.dtype not in _FLOATS for x in (q, k, v)):
    raise ValueError(f"flash_attention: q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
  _build.load(KERNEL, required=True)
  spec, arrays = canonical
  bq, bk = tile_sides(dims.G, dims.T, dims.S, block_q, block_kv)
  return flash(q, k, v, arrays, spec, float(default_scale(scale, dims.H)), bq, bk)
