"""The attention registry and the argument checks every attention kernel shares.

An attention implementation is a pure function with the signature of `reference_attention`:

    fn(q_BTNH, k_BSKH, v_BSKH, *, causal=False, mask=None, bias=None, scale=None) -> out_BTNH

Register one under a name with `@register_attention("name")`; configs and `MultiHeadAttention(implementation=...)`
select it by that name through `get_attention(name)`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.ops.attention import masks as masks_lib

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
  """Decorator: registers an attention function under `name` (a name can be registered once)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_attention: the name must be a non-empty string, got {name!r}")

  def wrap(fn: AttentionFn) -> AttentionFn:
    if name in _REGISTRY and _REGISTRY[name] is not fn:
      raise ValueError(f"attention {name!r} is already registered (by {_REGISTRY[name].__module__}."
                       f"{_REGISTRY[name].__qualname__}); pick another name")
    _REGISTRY[name] = fn
    return fn

  return wrap


def get_attention(name: str) -> AttentionFn:
  """The attention function registered under `name`; ValueError listing the known names otherwise."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention implementation {name!r}; registered: {', '.join(available_attentions())}. "
                     f"Register a new one with @seqjax.ops.attention.register_attention({name!r}).")
  return _REGISTRY[name]


def available_attentions() -> tuple[str, ...]:
  """Names of all registered attention implementations, sorted."""
  return tuple(sorted(_REGISTRY))


class Dims(NamedTuple):
  """Sizes of one attention call: B batch, T queries, S keys, N query heads, K kv heads, G = N // K, H head dim."""
  B: int
  T: int
  S: int
  N: int
  K: int
  G: int
  H: int


def check_inputs(name: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, bias: Any,
                 *, array_bias: bool) -> Dims:
  """Validates shapes, the mask and the bias; returns the sizes. Raises ValueError saying what to fix."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{name}: expected q [B, T, N, H] and k, v [B, S, K, H], got ranks {q.ndim}, {k.ndim}, "
                     f"{v.ndim} (shapes {q.shape}, {k.shape}, {v.shape})")
  B, T, N, H = q.shape
  if k.shape != v.shape:
    raise ValueError(f"{name}: k and v must have the same shape [B, S, K, H], got {k.shape} and {v.shape}")
  Bk, S, K, Hk = k.shape
  if Bk != B or Hk != H:
    raise ValueError(f"{name}: q {q.shape} and k {k.shape} disagree on batch or head dim")
  if K == 0 or N % K:
    raise ValueError(f"{name}: the {N} query heads must be a multiple of the {K} kv heads")
  if mask is not None:
    if not isinstance(mask, masks_lib.Mask):
      raise ValueError(f"{name}: mask must be a seqjax.ops.attention.masks object, got {type(mask).__name__}")
    mask.check(B, T, S)
  if bias is not None:
    if isinstance(bias, masks_lib.TileFunction):
      if hasattr(bias, "check_heads"):
        bias.check_heads(N)
      bias.check(B, T, S)
    elif not array_bias:
      raise ValueError(f"{name}: bias must be a per-tile bias object (e.g. seqjax.ops.attention.positions.AlibiBias); "
                       f"an arbitrary bias array is supported by the 'reference' implementation only")
    else:
      shape = jnp.shape(bias)
      try:
        jnp.broadcast_shapes(shape, (B, N, T, S))
      except ValueError:
        shape = None
      if shape is None or len(jnp.shape(bias)) != 4:
        raise ValueError(f"{name}: an array bias must be 4-d and broadcastable to [B, N, T, S] = "
                         f"{(B, N, T, S)}, got {jnp.shape(bias)}")
  return Dims(B, T, S, N, K, N // K, H)


def default_scale(scale: float | None, head_dim: int) -> float:
  return head_dim ** -0.5 if scale is None else scale


def group_heads(x_BNTS: jax.Array, K: int) -> jax.Array:
  """[B, N or 1, T, S] -> [B, K or 1, G or 1, T, S] so it broadcasts against grouped scores."""
  b, n = x_BNTS.shape[:2]
  if n == 1:
    return x_BNTS[:, :, None]
  return x_BNTS.reshape(b, K, n // K, *x_BNTS.shape[2:])
