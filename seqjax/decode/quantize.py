"""int8 weight-only quantization of a model's parameters for decoding.

    qparams = seqjax.decode.quantize(params)          # the big matrices as int8 + per-output-channel scales
    out = generate(model, qparams, prompts, ...)      # dequantised on the fly inside the jitted program
    parameter_bytes(qparams) / parameter_bytes(params)

Which leaves are quantized (every other leaf — norm scales, biases, SSM / recurrent vectors — stays as it is):

- `kernel` (Dense / DenseGeneral, [in..., out...]): one scale per slice along the first input axis, i.e. per
  output channel of a Dense kernel [D_in, D_out] and per (head, head-dim) output of a [D, N, H] projection (an
  attention output kernel [N, H, D] gets one per (h, d): finer than per output, never coarser);
- `embedding` (token table [V, D]), `table` (learned positions [max_len, D]), `w_ih` / `w_hh` (recurrent cells,
  [gates x R, in], output first): one scale per row (the output channel of a lookup, of the tied read-out
  x @ E^T, and of a cell's gate pre-activations);
- a leaf under a `layers` scope (an `nn.scan` stack, [L, ...]) keeps its leading layer axis: one scale set per
  layer.

Only leaves with at least `min_size` entries and 2+ dimensions are quantized. A `QuantizedTensor` is a pytree
(int8 values, float32 scale, the original dtype), so quantized params pass through `jax.jit` and the decoders
like float ones; `seqjax.decode.common.prefill/step` call `materialize`, which turns each back into
values * scale inside the compiled program (XLA may hoist that out of the decoding loop: the saving is in the
parameters held and loaded, not in decoding FLOPs). `dequantize` does the same outside a program, e.g. to evaluate
the quantized model with the float code path.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops.quant import dequantize_int8, quantize_int8

_CHANNEL_LAST = ("embedding", "table", "w_ih", "w_hh")  # row = output channel: reduce over the trailing axes


@flax.struct.dataclass
class QuantizedTensor:
  """An int8 weight: `values` (int8, the weight's shape) x `scale` (float32, 1 on the reduced axes)."""

  values: jax.Array
  scale: jax.Array
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)

  @property
  def shape(self):
    return self.values.shape

  def dequantize(self) -> jax.Array:
    return dequantize_int8(self.values, self.scale, self.dtype)


def _name(entry: Any) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def reduce_axes(path: tuple, leaf: Any) -> tuple[int, ...] | None:
  """The axes one scale spans for the leaf at `path` (None: not quantized; see the module docstring)."""
  names = [_name(p) for p in path]
  name, ndim = names[-1], np.ndim(leaf)
  first = 1 if "layers" in names[:-1] else 0  # the layer axis of a scanned stack is never reduced
  if ndim - first < 2:
    return None
  if name == "kernel":
    return (first,)
  if name in _CHANNEL_LAST:
    return tuple(range(first + 1, ndim))
  return None


def quantize(params: Any, *, min_size: int = 1024) -> Any:
  """params with every big matrix (see the module docstring) replaced by a `QuantizedTensor`."""
  def convert(path, leaf):
    axes = reduce_axes(path, leaf)
    if axes is None or np.size(leaf) < min_size or not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      return leaf
    values, scale = quantize_int8(leaf, axes)
    return QuantizedTensor(values, scale, jnp.asarray(leaf).dtype)
  return jax.tree_util.tree_map_with_path(convert, params)


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedTensor)


def materialize(params: Any) -> Any:
  """params with each `QuantizedTensor` dequantized (values * scale); float params are returned as they are."""
  if not any(_is_quantized(x) for x in jax.tree.leaves(params, is_leaf=_is_quantized)):
    return params
  return jax.tree.map(lambda x: x.dequantize() if _is_quantized(x) else x, params, is_leaf=_is_quantized)


dequantize = materialize


def parameter_bytes(params: Any) -> int:
  """Bytes held by the parameters (int8 values and float32 scales for quantized leaves)."""
  return int(sum(np.size(x) * jnp.asarray(x).dtype.itemsize for x in jax.tree.leaves(params)))
