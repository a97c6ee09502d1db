"""The "based" mixer (linen): Based (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff") — linear attention with a 2nd-order Taylor feature map, for the global, long-range
part, plus exact softmax attention over a small sliding window, for the local part, summed:

    y = LinearAttention_taylor(x) + SlidingWindowAttention_W(x)

- the linear branch is the "linear" mixer (`seqjax.nn.linear_attention.LinearAttention`) with
  `feature_map="taylor"`: q, k projected to `based_feature_dim` (P) per head and mapped to [1, x, x (x) x / sqrt 2]
  (P^-1/4 scaled, 1 + P + P^2 features) so phi(q).phi(k) = 1 + z + z^2 / 2, z = q.k / sqrt(P); normalised causal
  linear attention in the configured form (`model.linear.mode`: chunked, parallel or recurrent); values of width
  `model.linear.value_dim` (0: D / heads); its own output projection;
- the window branch is the "attention" mixer (`seqjax.nn.mixers.AttentionMixer`: `model.attention` heads, kernel,
  RoPE / ALiBi from `model.positions`) with `attention.window = based_window` (64), whose KV cache is a ring buffer
  of `based_window` slots.

The paper interleaves these (and short gated convolutions) as separate layers; here one mixer holds both, so a
"based" layer is a drop-in mixer. (`mixer="linear,attention"` with `model.linear.feature_map="taylor"` and
`model.attention.window` gives the interleaved variant without this mixer.)

Decode state: {"linear": the linear branch's {"kv": float32 [B, N, 1 + P + P^2, H + 1], "position": int32 [B]},
"window": KVCache of `based_window` slots} — constant in the context length.

Legend: B batch, T length, D model width, N heads, P feature width, H value width, W window.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from seqjax.config import ModelConfig, override
from seqjax.nn.linear_attention import LinearAttention
from seqjax.nn.mixers import AttentionMixer, compute_dtype


def _parts(cfg: ModelConfig) -> tuple[LinearAttention, AttentionMixer]:
  """The two branches as unbound modules (the linear one, the sliding-window one)."""
  lin = cfg.linear
  value_dim = lin.resolved_dims(cfg.d_model)[1]
  linear = LinearAttention(d_model=cfg.d_model, variant="linear", num_heads=lin.num_heads,
                           key_dim=lin.based_feature_dim, value_dim=value_dim, mode=lin.mode,
                           chunk_size=lin.chunk or None, feature_map="taylor", normalize=True,
                           dtype=compute_dtype(cfg), name="linear", parent=None)
  window = AttentionMixer(override(cfg, {"attention": {"window": lin.based_window}}), name="window", parent=None)
  return linear, window


class Based(nn.Module):
  """Taylor linear attention + sliding-window softmax attention, summed (module docstring)."""

  cfg: ModelConfig

  def setup(self):
    linear, window = _parts(self.cfg)
    self.linear = linear.clone(parent=self, name="linear")
    self.window = window.clone(parent=self, name="window")

  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True, return_state: bool = False):
    kwargs = dict(segment_ids=segment_ids, positions=positions, deterministic=deterministic,
                  return_state=return_state)
    y_linear, y_window = self.linear(x_BTD, **kwargs), self.window(x_BTD, **kwargs)
    if not return_state:
      return y_linear + y_window.astype(y_linear.dtype)
    (y_linear, s_linear), (y_window, s_window) = y_linear, y_window
    return y_linear + y_window.astype(y_linear.dtype), {"linear": s_linear, "window": s_window}

  def init_state(self, batch_size: int, max_len: int, dtype: Any = None):
    linear, window = _parts(self.cfg)
    return {"linear": linear.init_state(batch_size, max_len, dtype),
            "window": window.init_state(batch_size, max_len, dtype)}

  def step(self, x_BD: jax.Array, state, *, deterministic: bool = True):
    y_linear, s_linear = self.linear.step(x_BD, state["linear"], deterministic=deterministic)
    y_window, s_window = self.window.step(x_BD, state["window"], deterministic=deterministic)
    return y_linear + y_window.astype(y_linear.dtype), {"linear": s_linear, "window": s_window}
