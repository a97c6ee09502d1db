"""Scaled dot-product attention: the registry, the reference oracle, the fast kernels, masks and positions.

Legend: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0; G = N // K query heads share
each kv head, so multi-query and grouped-query attention never repeat K/V in memory), H head dim.

    out[b, t, n] = sum_s softmax_s(scale * q[b, t, n] . k[b, s, n // G] + bias[b, n, t, s] | visible) v[b, s, n // G]

Every implementation takes q [B, T, N, H], k and v [B, S, K, H] (the `jax.nn.dot_product_attention` layout), returns
[B, T, N, H] in q's dtype, computes the softmax in float32, and returns 0 for a query row with no visible key (in the
forward and the backward pass, never NaN). Implementations (see `available_attentions()`):

- "reference": `reference_attention` (`reference.py`), materialises the [B, N, T, S] scores. The oracle.
  `attention_weights` there returns the probabilities themselves (attention maps).
- "blockwise": `blockwise_attention` (`blockwise.py`), flash-style tiles with an online softmax and a
  memory-efficient custom_vjp. On a CPU it runs the C++ kernel of `seqjax.cpu_kernels.attention` where that covers
  the mask and bias (the switch: `seqjax.ops.backend`).
- "pallas": `pallas_attention` (`pallas.py`), the same algorithm as a Pallas kernel for GPU/TPU (interpret mode
  on CPU).

- "splash" (`splash.py`): JAX's TPU splash attention; "pallas_gpu" and "cudnn" (`gpu.py`): JAX's Pallas/Triton GPU
  kernel and cuDNN's fused attention; "auto" (`auto.py`): splash on a TPU, cuDNN or the Pallas kernel on CUDA,
  blockwise elsewhere, chosen per lowering platform. They express `Causal`, `SlidingWindow`, `SegmentIds`,
  `KeyPadding` (each a subset: docs/parallelism.md); anything else raises `UnsupportedAttention` (a ValueError),
  and "auto" falls back to blockwise (`mask_parts.py` reads a mask object into what they take).

Context parallelism: `ring_attention` (`ring.py`), called inside `jax.shard_map` on a sequence sharded along a
mesh axis, passes K/V blocks around the ring and runs the blockwise kernel per hop; `ring_layout_permutation`
deals a sequence to the shards in the "contiguous", "striped" or "zigzag" layout; `all_gather_attention` is the
same computation with K/V gathered once (short contexts).

Also here: `masks` (mask objects: causal, sliding window, segment ids, prefix, global tokens) and `positions`
(sinusoidal embeddings, RoPE, ALiBi). The registry (`register_attention`, `get_attention`, `available_attentions`)
and the shared argument checks live in `_registry.py`.
"""

from seqjax.ops.attention import masks, positions
from seqjax.ops.attention._registry import (AttentionFn, Dims, available_attentions, check_inputs, default_scale,
                                            get_attention, group_heads, register_attention)
from seqjax.ops.attention.blockwise import blockwise_attention  # registers "blockwise"
from seqjax.ops.attention.pallas import pallas_attention  # registers "pallas"
from seqjax.ops.attention.reference import attention_weights, reference_attention  # registers "reference"
from seqjax.ops.attention.ring import all_gather_attention, ring_attention, ring_layout_permutation
from seqjax.ops.attention.mask_parts import UnsupportedAttention
from seqjax.ops.attention.splash import splash_attention  # registers "splash"
from seqjax.ops.attention.gpu import cudnn_attention, cudnn_available, pallas_gpu_attention  # "pallas_gpu", "cudnn"
from seqjax.ops.attention.auto import auto_attention, auto_choice  # registers "auto"

__all__ = ["AttentionFn", "Dims", "all_gather_attention", "attention_weights", "available_attentions", "blockwise_attention", "check_inputs", "default_scale",
           "get_attention", "group_heads", "masks", "pallas_attention", "positions", "reference_attention",
           "register_attention", "ring_attention", "ring_layout_permutation",
           "UnsupportedAttention", "auto_attention", "auto_choice", "cudnn_attention", "cudnn_available",
           "pallas_gpu_attention", "splash_attention"]
