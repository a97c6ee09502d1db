""""auto": the attention kernel chosen by the platform the program is lowered for.

    TPU   "splash"      (JAX's TPU splash attention)
    CUDA  "cudnn"       when this process has cuDNN, else "pallas_gpu" (JAX's Pallas/Triton kernel)
    else  "blockwise"   (on a CPU: its C++ kernel where it covers the call, `seqjax.ops.backend`)

Each accelerator choice falls back, explicitly, to the next one that can express the call and finally to
"blockwise": a mask piece the kernel has no word for (`GlobalTokens`, `PrefixLM`, `|`, a sliding window for the
Pallas GPU kernel, segment ids for cuDNN), a per-tile bias (ALiBi), or lengths the kernel cannot tile (splash:
multiples of 128). `auto_choice(platform, ...)` says which kernel a call gets on a platform, and why the others
were passed over.

The choice is made per *lowering* platform with `jax.lax.platform_dependent`: one jitted function runs blockwise on
this CPU and exports with the splash kernel's `tpu_custom_call` for `platforms=("tpu",)` and with the Triton call
for `("cuda",)` (exporting that one needs `disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
"__gpu$xla.gpu.triton")]`). Every branch is traced, so a call pays the accelerator kernels' trace-time mask
processing on any platform; only the lowering platform's branch is compiled.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from seqjax.ops.attention import gpu, splash
from seqjax.ops.attention import masks as masks_lib
from seqjax.ops.attention._registry import check_inputs, register_attention
from seqjax.ops.attention.blockwise import blockwise_attention
from seqjax.ops.attention.mask_parts import UnsupportedAttention

PLATFORMS = ("tpu", "cuda", "cpu")


def _candidates(platform: str, q, k, v, mask, bias, scale, block_q, block_kv):
  """(name, prepare) for the accelerator kernels of `platform`, in order of preference."""
  if platform == "tpu":
    return [("splash", lambda: splash.prepare(q, k, v, mask, bias, scale, block_q, block_kv))]
  if platform == "cuda":
    cudnn = lambda: (lambda run: lambda q, k, v, interpret: run(q, k, v))(  # noqa: E731
        gpu.prepare_cudnn(q, k, v, mask, bias, scale))
    return [("cudnn", cudnn),
            ("pallas_gpu", lambda: gpu.prepare_pallas_gpu(q, k, v, mask, bias, scale, block_q, block_kv))]
  return []


def _choose(platform, q, k, v, mask, bias, scale, block_q, block_kv) -> tuple[str, Callable | None, list[str]]:
  """(kernel name, its `run(q, k, v, interpret)` or None for blockwise, reasons the others were passed over)."""
  reasons = []
  for name, prepare in _candidates(platform, q, k, v, mask, bias, scale, block_q, block_kv):
    try:
      return name, prepare(), reasons
    except UnsupportedAttention as e:
      reasons.append(str(e))
  return "blockwise", None, reasons


def auto_choice(platform: str, q: Any, k: Any, v: Any, *, causal: bool = False, mask: masks_lib.Mask | None = None,
                bias: Any = None, block_q: int | None = None, block_kv: int | None = None) -> tuple[str, list[str]]:
  """Which kernel "auto" runs for this call on `platform` ("tpu", "cuda", "cpu", ...), and why the preferred ones
  were passed over. q, k, v may be arrays or `jax.ShapeDtypeStruct`s."""
  mask = masks_lib.combine(causal, mask)
  check_inputs("auto_attention", q, k, v, mask, bias, array_bias=False)
  name, _, reasons = _choose(platform, q, k, v, mask, bias, None, block_q, block_kv)
  return name, reasons


@register_attention("auto")
def auto_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                   mask: masks_lib.Mask | None = None, bias: Any = None, scale: float | None = None,
                   block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
  """The platform's tuned attention kernel (module docstring); the arguments and results of `blockwise_attention`.

  `block_q` / `block_kv` are passed to whichever kernel runs (a size one kernel cannot use makes it fall back).
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  mask = masks_lib.combine(causal, mask)
  check_inputs("auto_attention", q, k, v, mask, bias, array_bias=False)

  def blockwise(q, k, v):
    return blockwise_attention(q, k, v, mask=mask, bias=bias, scale=scale, block_q=block_q, block_kv=block_kv)

  branches = {}
  for platform in ("tpu", "cuda"):
    _, run, _ = _choose(platform, q, k, v, mask, bias, scale, block_q, block_kv)
    if run is not None:
      branches[platform] = (lambda run: lambda q, k, v: run(q, k, v, False))(run)
  if not branches:
    return blockwise(q, k, v)
  return jax.lax.platform_dependent(q, k, v, **branches, default=blockwise)
