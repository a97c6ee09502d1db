"""TPU splash attention behind the registry: "splash" (`jax.experimental.pallas.ops.tpu.splash_attention`).

JAX's block-sparse flash attention for TPU, with its own fused backward kernels. Our call is translated as:

- layout: the kernel takes one example [N, T, H] / [K, S, H] (grouped-query attention by head grouping, K/V never
  repeated); the batch is a `vmap`. The kernel does not scale q: q is multiplied by `scale` first.
- mask: the band of `mask_parts.decompose` becomes a splash `CausalMask` / `LocalMask` / `FullMask` per head (a
  `MultiHeadMask`, processed at trace time into the kernel's block tables: empty blocks are skipped, full blocks
  skip the mask arithmetic); `SegmentIds` become the kernel's segment ids; `KeyPadding` is folded into the key
  segment ids (a padded key gets an id no query has).
- our padding convention (segment id `padding_id` sees and is seen by nothing): padded queries and keys get two
  distinct ids that match nothing.
- rows with no visible key return 0, as every implementation here must: each head gets an attention *sink* of
  logit -1e30 (above the kernel's masked-score value, below any real score), so an empty row puts all its weight
  on the sink, whose value is 0, and a non-empty row gives it weight exp(-1e30 - max) = 0.
- lengths: T and S must be multiples of 128 (the TPU lane width the kernel's key blocks need); blocks are the
  largest of 512 / 256 / 128 dividing the length, or `block_q` / `block_kv` (multiples of 128 dividing T / S).

`interpret=None` runs the compiled kernel where the program is lowered for a TPU and the Pallas interpreter
elsewhere (`jax.lax.platform_dependent`), so one jitted function exports for TPU with the kernel's
`tpu_custom_call` and runs interpreted on this CPU. Anything the kernel cannot express raises
`UnsupportedAttention` before any compute.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import Dims, check_inputs, default_scale, register_attention
from seqjax.ops.attention.mask_parts import UnsupportedAttention, decompose

LANE = 128  # key blocks of the TPU kernel are multiples of this
BLOCKS = (512, 256, 128)  # the default block side: the largest of these dividing the length
SINK_LOGIT = -1e30  # finite, above the kernel's masked-score value (-0.7 * float32 max), below any real score
_Q_PAD, _KV_PAD = np.iinfo(np.int32).min, np.iinfo(np.int32).min + 1  # ids that match nothing


def _block(name: str, length: int, requested: int | None) -> int:
  if length % LANE:
    raise UnsupportedAttention(f"splash: the {name} length {length} must be a multiple of {LANE} (the TPU kernel's "
                               f"block unit); pad the sequence or use 'blockwise' ('auto' falls back to it)")
  if requested is not None:
    if requested % LANE or length % requested:
      raise UnsupportedAttention(f"splash: block size {requested} must be a multiple of {LANE} dividing the "
                                 f"{name} length {length}")
    return requested
  return next(b for b in BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(band: tuple | None, T: int, S: int, N: int, bq: int, bk: int, interpret: bool):
  """The splash kernel for one mask band and shape (built once: mask processing runs NumPy over the blocks)."""
  if band is None:
    head_mask = splash_lib.FullMask((T, S))
  elif band[0] is None and band[1] == 0:
    head_mask = splash_lib.CausalMask((T, S), offset=band[2])
  else:
    head_mask = splash_lib.LocalMask((T, S), window_size=(band[0], band[1]), offset=band[2])
  blocks = splash_lib.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                 block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  with jax.ensure_compile_time_eval():  # the block tables are constants, never tracers of the first caller's trace
    return splash_lib.make_splash_mha(splash_lib.MultiHeadMask([head_mask] * N), block_sizes=blocks, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def _segment_ids(dims: Dims, segments: masks_lib.SegmentIds | None, lengths: jax.Array | None):
  """Per-example splash ids (q [B, T], kv [B, S]) carrying our segments, padding convention and key lengths."""
  if segments is None and lengths is None:
    return None
  if segments is None:
    q_ids, kv_ids = jnp.zeros((dims.B, dims.T), jnp.int32), jnp.zeros((dims.B, dims.S), jnp.int32)
  else:
    q_ids, kv_ids = segments.q_ids.astype(jnp.int32), segments.kv_ids.astype(jnp.int32)
    if segments.padding_id is not None:
      q_ids = jnp.where(q_ids == segments.padding_id, _Q_PAD, q_ids)
      kv_ids = jnp.where(kv_ids == segments.padding_id, _KV_PAD, kv_ids)
  if lengths is not None:
    kv_ids = jnp.where(jnp.arange(dims.S)[None] < lengths[:, None], kv_ids, _KV_PAD)
  return q_ids, kv_ids


def prepare(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks_lib.Mask | None, bias: Any, scale: float | None,
            block_q: int | None, block_kv: int | None) -> Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]:
  """Checks the call (UnsupportedAttention if splash cannot express it); returns `run(q, k, v, interpret)`."""
  dims = check_inputs("splash_attention", q, k, v, mask, None, array_bias=False)
  parts = decompose("splash", mask, bias)
  bq, bk = _block("query", dims.T, block_q), _block("key", dims.S, block_kv)
  scale = float(default_scale(scale, dims.H))

  def run(q, k, v, interpret):
    kernel = _kernel(parts.band, dims.T, dims.S, dims.N, bq, bk, bool(interpret))
    ids = _segment_ids(dims, parts.segments, parts.lengths)
    sinks_N = jnp.full((dims.N,), SINK_LOGIT, jnp.float32)
    q_BNTH = (jnp.swapaxes(q, 1, 2).astype(jnp.float32) * scale).astype(q.dtype)
    k_BKSH, v_BKSH = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if ids is None:
      out_BNTH = jax.vmap(lambda q, k, v: kernel(q, k, v, None, sinks_N))(q_BNTH, k_BKSH, v_BKSH)
    else:
      one = lambda q, k, v, qi, ki: kernel(q, k, v, splash_lib.SegmentIds(qi, ki), sinks_N)  # noqa: E731
      out_BNTH = jax.vmap(one)(q_BNTH, k_BKSH, v_BKSH, *ids)
    return jnp.swapaxes(out_BNTH, 1, 2).astype(q.dtype)

  return run


def on_platform(run: Callable[..., jax.Array], compiled_on: str, q: jax.Array, k: jax.Array, v: jax.Array,
                interpret: bool | None) -> jax.Array:
  """`run(q, k, v, interpret)`; with interpret=None compiled where lowered for `compiled_on`, interpreted elsewhere."""
  if interpret is not None:
    return run(q, k, v, bool(interpret))
  return jax.lax.platform_dependent(q, k, v, **{compiled_on: lambda q, k, v: run(q, k, v, False)},
                                    default=lambda q, k, v: run(q, k, v, True))


@register_attention("splash")
def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None,
                     block_q: int | None = None, block_kv: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """JAX's TPU splash attention; same arguments and results as `reference_attention` (see the module docstring).

  Args:
    q: queries [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K; T and S multiples of 128.
    causal, mask: `Causal`, `SlidingWindow` (int offsets), `SegmentIds`, `KeyPadding`, joined by `&`.
    bias: must be None (UnsupportedAttention otherwise).
    scale: score scale, default 1 / sqrt(H).
    block_q, block_kv: the kernel's block sides (multiples of 128 dividing T / S; default the largest of 512, 256,
      128 that divides).
    interpret: None: compiled when lowered for a TPU, the Pallas interpreter elsewhere; True / False: forced.

  Returns:
    [B, T, N, H] in q's dtype; rows with no visible key are 0. Gradients through the kernel's own backward.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  run = prepare(q, k, v, masks_lib.combine(causal, mask), bias, scale, block_q, block_kv)
  return on_platform(run, "tpu", q, k, v, interpret)
