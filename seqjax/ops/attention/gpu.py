"""GPU attention kernels behind the registry: "pallas_gpu" (JAX's Pallas/Triton flash attention) and "cudnn".

"pallas_gpu" wraps `jax.experimental.pallas.ops.gpu.attention.mha`: a Triton flash attention with a fused Triton
backward. What it expresses, and how our call is translated:

- causal (offset 0) or no position mask; no sliding window;
- segment ids for *self-attention* only: the kernel takes one id array for queries and keys, so T == S and
  `SegmentIds(ids, ids)` must hold the same array (the same object, as the LM's mixers build it, or equal
  concrete values); the padding id (0) is applied by zeroing the padded query rows (a padded key only ever
  matches padded queries, whose output is dropped);
- grouped-query attention by repeating each kv head G = N // K times (the kernel has no head groups; K/V memory
  grows G-fold, gradients sum back over the copies);
- T == S (the fused backward pass walks queries and keys in the same number of blocks), a multiple of 16.

`interpret=None`: compiled where lowered for CUDA, the Pallas interpreter elsewhere. Exporting a program with the
compiled kernel for CUDA needs
`disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]` (Triton calls are not on
`jax.export`'s list of stable custom calls).

"cudnn" is `jax.nn.dot_product_attention(implementation="cudnn")`: causal or a causal sliding window (right side
0, offset 0; cuDNN's windows are causal), key padding (`KeyPadding` → key lengths), grouped-query heads natively; no segment ids. It runs only in a process
with a CUDA GPU and cuDNN: elsewhere it raises `UnsupportedAttention` at trace time (cuDNN's attention cannot
even be lowered without the library, so no CUDA program using it can be exported from this CPU-only machine).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as gpu_attention

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import check_inputs, default_scale, register_attention
from seqjax.ops.attention.mask_parts import UnsupportedAttention, decompose
from seqjax.ops.attention.splash import on_platform

FORWARD_BLOCKS = (128, 64, 32, 16)  # the largest dividing T (forward kernel)
BACKWARD_BLOCKS = (32, 16)  # the largest dividing T (the fused backward's tiles; Triton's defaults)


def _largest_dividing(length: int, choices: tuple[int, ...], requested: int | None, name: str) -> int:
  if requested is not None:
    if length % requested or requested < 16:
      raise UnsupportedAttention(f"pallas_gpu: {name}={requested} must be >= 16 and divide the length {length}")
    return requested
  return next(b for b in choices if length % b == 0)


def _same_ids(segments: masks_lib.SegmentIds) -> bool:
  if segments.q_ids is segments.kv_ids:
    return True
  try:
    return bool(np.array_equal(np.asarray(segments.q_ids), np.asarray(segments.kv_ids)))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return False


def prepare_pallas_gpu(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.Mask | None, bias: Any,
                       scale: float | None, block_q: int | None, block_kv: int | None
                       ) -> Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]:
  """Checks the call (UnsupportedAttention if the Pallas GPU kernel cannot express it); returns `run(q, k, v,
  interpret)`."""
  dims = check_inputs("pallas_gpu_attention", q, k, v, mask, None, array_bias=False)
  parts = decompose("pallas_gpu", mask, bias)
  if dims.T != dims.S or dims.T % 16:
    raise UnsupportedAttention(f"pallas_gpu: needs T == S, a multiple of 16 (its fused backward walks queries and "
                               f"keys in the same blocks), got T={dims.T}, S={dims.S}")
  if parts.band not in (None, (None, 0, 0)):
    raise UnsupportedAttention(f"pallas_gpu: the kernel knows causal attention (offset 0) only, not the band "
                               f"(left, right, offset) = {parts.band}; use 'splash' / 'blockwise'")
  if parts.lengths is not None:
    raise UnsupportedAttention("pallas_gpu: KeyPadding is not supported (the kernel has no key lengths); give the "
                               "padded keys a segment id instead, or use 'blockwise'")
  segments = parts.segments
  if segments is not None and not _same_ids(segments):
    raise UnsupportedAttention("pallas_gpu: the kernel takes one segment-id array for queries and keys; pass "
                               "SegmentIds(ids, ids) with the same array (self-attention)")
  blocks = gpu_attention.BlockSizes(
      block_q=_largest_dividing(dims.T, FORWARD_BLOCKS, block_q, "block_q"),
      block_k=_largest_dividing(dims.S, FORWARD_BLOCKS, block_kv, "block_kv"),
      block_q_dkv=_largest_dividing(dims.T, BACKWARD_BLOCKS, None, ""),
      block_kv_dkv=_largest_dividing(dims.S, BACKWARD_BLOCKS, None, ""),
      block_q_dq=_largest_dividing(dims.T, BACKWARD_BLOCKS, None, ""),
      block_kv_dq=_largest_dividing(dims.S, BACKWARD_BLOCKS, None, ""))
  scale = float(default_scale(scale, dims.H))

  def run(q, k, v, interpret):
    if dims.G > 1:
      k, v = jnp.repeat(k, dims.G, axis=2), jnp.repeat(v, dims.G, axis=2)
    ids_BT = None if segments is None else segments.q_ids.astype(jnp.int32)
    out_BTNH = gpu_attention.mha(q, k, v, ids_BT, sm_scale=scale, causal=parts.band is not None,
                                 block_sizes=blocks, interpret=bool(interpret))
    if segments is not None and segments.padding_id is not None:
      out_BTNH = jnp.where((ids_BT != segments.padding_id)[:, :, None, None], out_BTNH, 0)
    return out_BTNH.astype(q.dtype)

  return run


@register_attention("pallas_gpu")
def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                         mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None,
                         block_q: int | None = None, block_kv: int | None = None,
                         interpret: bool | None = None) -> jax.Array:
  """JAX's Pallas GPU (Triton) flash attention; the arguments and results of `reference_attention`.

  Masks: `Causal()` and self-attention `SegmentIds(ids, ids)`; T == S, a multiple of 16 (module docstring).
  `block_q` / `block_kv` set the forward kernel's blocks (they must divide T). `interpret=None`: compiled when
  lowered for CUDA, interpreted elsewhere. Gradients through the kernel's fused Triton backward.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  run = prepare_pallas_gpu(q, k, v, masks_lib.combine(causal, mask), bias, scale, block_q, block_kv)
  return on_platform(run, "cuda", q, k, v, interpret)


def cudnn_available() -> bool:
  """True when this process has a CUDA GPU and a cuDNN recent enough (>= 8.9) for its fused attention."""
  if not any(d.platform == "gpu" for d in jax.devices()) and jax.default_backend() != "gpu":
    return False
  try:
    from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=import-outside-toplevel
    return fused_attention_stablehlo.check_cudnn_version() >= 8904
  except Exception:  # pylint: disable=broad-except  # no cuDNN library: any failure to load it means "absent"
    return False


def prepare_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.Mask | None, bias: Any,
                  scale: float | None) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """Checks the call (UnsupportedAttention if cuDNN is absent or cannot express it); returns `run(q, k, v)`."""
  dims = check_inputs("cudnn_attention", q, k, v, mask, None, array_bias=False)
  parts = decompose("cudnn", mask, bias)
  if parts.segments is not None:
    raise UnsupportedAttention("cudnn: segment ids are not supported here (cuDNN's packed-sequence layout is not "
                               "wired); use 'pallas_gpu', 'blockwise' or 'auto'")
  if parts.band is not None and (parts.band[1] != 0 or parts.band[2] != 0):
    raise UnsupportedAttention(f"cudnn: the position mask must be causal or a causal window (right = 0, offset 0), "
                               f"got the band (left, right, offset) = {parts.band}")
  if not cudnn_available():
    raise UnsupportedAttention(
        f"cudnn: needs a CUDA GPU with cuDNN >= 8.9 in this process (this one runs on {jax.default_backend()!r}; "
        f"cuDNN attention cannot even be lowered without the library). Use 'blockwise' here, or 'auto' (cuDNN on "
        f"a GPU that has it, the Pallas GPU kernel otherwise)")
  kwargs = dict(scale=float(default_scale(scale, dims.H)), implementation="cudnn")
  if parts.band is not None:
    kwargs["is_causal"] = True
    if parts.band[0] is not None:
      kwargs["local_window_size"] = (parts.band[0], 0)
  lengths = parts.lengths

  def run(q, k, v):
    if lengths is not None:
      kwargs["key_value_seq_lengths"] = lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, **kwargs).astype(q.dtype)

  return run


@register_attention("cudnn")
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                    mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None) -> jax.Array:
  """cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`).

  Masks: `Causal()`, `SlidingWindow(left, 0)` (offset 0), `KeyPadding`; GQA natively. Raises
  `UnsupportedAttention` (a ValueError) at trace time without a CUDA GPU and cuDNN, or for other masks / a bias.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  return prepare_cudnn(q, k, v, masks_lib.combine(causal, mask), bias, scale)(q, k, v)
