"""Position encodings: sinusoidal tables, rotary embeddings (RoPE) with scaling, ALiBi slopes and bias.

Legend: B batch, T length, N heads, H head dim, D width. (Learned position tables are parameters, so they live in
`seqjax.nn.layers.LearnedPositions`.) All tables are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.ops.attention import masks as masks_lib


def sinusoidal(positions: jax.Array, dim: int, *, max_timescale: float = 10000.0) -> jax.Array:
  """Fixed sinusoidal encodings [..., dim] of integer or real `positions` [...] (Vaswani et al. 2017).

  The first half of the features are sines and the second half cosines of `pos / max_timescale**(2i/dim)`.
  """
  if dim <= 0 or dim % 2:
    raise ValueError(f"sinusoidal: dim must be a positive even number, got {dim}")
  inv_freq = max_timescale ** (-np.arange(0, dim, 2, dtype=np.float32) / dim)
  angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rope_frequencies(head_dim: int, *, base: float = 10000.0, scaling: tuple[str, float] | None = None
                     ) -> tuple[np.ndarray, float]:
  """(inverse frequencies [H/2], position scale) for RoPE with optional context-extension scaling.

  `scaling=("linear", f)` divides positions by f (position interpolation); `("ntk", f)` keeps positions and
  raises the base to `base * f**(H / (H - 2))` (NTK-aware scaling), stretching low frequencies most.
  """
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"apply_rope: the head dim must be a positive even number, got {head_dim}")
  position_scale = 1.0
  if scaling is not None:
    if not (isinstance(scaling, tuple) and len(scaling) == 2 and scaling[0] in ("linear", "ntk")
            and float(scaling[1]) >= 1.0):
      raise ValueError(f"apply_rope: scaling must be None, ('linear', f) or ('ntk', f) with f >= 1, got {scaling!r}")
    kind, factor = scaling[0], float(scaling[1])
    if kind == "linear":
      position_scale = 1.0 / factor
    elif head_dim > 2:
      base = base * factor ** (head_dim / (head_dim - 2))
  inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  return inv_freq.astype(np.float32), position_scale


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, *, base: float = 10000.0,
               scaling: tuple[str, float] | None = None) -> jax.Array:
  """Rotary position embedding of queries or keys x [B, T, N, H] at integer positions [B, T] (or [T]).

  Features are rotated in pairs (h, h + H/2) by angle `pos * base**(-2h/H)` (the "rotate half" layout). The
  rotation is computed in float32 and the result cast back to x's dtype. See `rope_frequencies` for `scaling`.
  """
  if x_BTNH.ndim != 4:
    raise ValueError(f"apply_rope: expected x of shape [B, T, N, H], got {x_BTNH.shape}")
  positions_BT = jnp.asarray(positions_BT)
  if positions_BT.ndim == 1:
    positions_BT = positions_BT[None]
  if positions_BT.ndim != 2 or positions_BT.shape[1] != x_BTNH.shape[1] or positions_BT.shape[0] not in (
      1, x_BTNH.shape[0]):
    raise ValueError(f"apply_rope: positions must be [B, T] or [T] matching x {x_BTNH.shape[:2]}, got "
                     f"{positions_BT.shape}")
  inv_freq, position_scale = rope_frequencies(x_BTNH.shape[-1], base=base, scaling=scaling)
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * (position_scale * jnp.asarray(inv_freq))
  cos, sin = jnp.cos(angles_BTh)[:, :, None, :], jnp.sin(angles_BTh)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
  """ALiBi head slopes [N] (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for n heads.

  When N is not a power of two, the slopes of the nearest lower power of two are followed by every other slope of
  the next power of two, as in the paper's reference code.
  """
  if num_heads <= 0:
    raise ValueError(f"alibi_slopes: num_heads must be positive, got {num_heads}")

  def geometric(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  n = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(n)
  if n < num_heads:
    slopes += geometric(2 * n)[0::2][: num_heads - n]
  return jnp.asarray(slopes, jnp.float32)


class AlibiBias(masks_lib.TileFunction):
  """The ALiBi additive bias `-slope[n] * |pos_q - pos_k|`, computed per tile, never materialised.

  Pass it as `bias=` to any attention kernel (the reference materialises it). `slopes` float [N]; positions are
  `q_offset + i` and `kv_offset + j` as for the position masks (shift it with `.shift(...)` when decoding).
  With a causal mask this is the paper's `slope * (j - i)` for j <= i.
  """

  _arrays = ("slopes",)
  _offsets = ("q_offset", "kv_offset")

  def __init__(self, slopes: jax.Array, q_offset: Any = 0, kv_offset: Any = 0):
    slopes = jnp.asarray(slopes, jnp.float32)
    if slopes.ndim != 1:
      raise ValueError(f"AlibiBias: expected slopes of shape [N], got {slopes.shape}")
    self.slopes, self.q_offset, self.kv_offset = slopes, q_offset, kv_offset

  def block(self, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array:
    """The bias of a tile, float32 [1, N, T', S']."""
    q_pos = jnp.asarray(q_idx, jnp.int32) + jnp.asarray(self.q_offset, jnp.int32)
    kv_pos = jnp.asarray(kv_idx, jnp.int32) + jnp.asarray(self.kv_offset, jnp.int32)
    dist = jnp.abs(q_pos[:, None] - kv_pos[None, :]).astype(jnp.float32)
    return -self.slopes[None, :, None, None] * dist[None, None]

  def shift(self, q_offset=0, kv_offset=0):
    return self._replace(q_offset=masks_lib._add(self.q_offset, q_offset),  # pylint: disable=protected-access
                         kv_offset=masks_lib._add(self.kv_offset, kv_offset))  # pylint: disable=protected-access

  def check_heads(self, num_heads: int) -> None:
    if self.slopes.shape[0] != num_heads:
      raise ValueError(f"AlibiBias has {self.slopes.shape[0]} slopes but the attention has {num_heads} heads")
