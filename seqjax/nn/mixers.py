"""The mixer registry: every sequence mixer the LM can stack, selected by name from `config.model.mixer`.

A mixer maps x[B, T, D] to y[B, T, D] along the sequence. A registered factory takes the validated
`ModelConfig` and returns a linen module called as

    mixer(x_BTD, segment_ids=seg_BT, positions=pos_BT, deterministic=bool) -> y_BTD

where `segment_ids` (int32, 0 = padding) separate packed documents — no information may flow between them —
and `positions` restart at 0 at every document. Register a new one with

    @register_mixer("my_mixer")
    def _make(cfg: ModelConfig) -> nn.Module: ...
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.config import ModelConfig
from seqjax.nn.attention import MultiHeadAttention
from seqjax.nn.recurrent import RecurrentMixer
from seqjax.nn import ssm as ssm_blocks
from seqjax.ops.attention import masks

MixerFactory = Callable[[ModelConfig], nn.Module]
_MIXERS: dict[str, MixerFactory] = {}


def register_mixer(name: str) -> Callable[[MixerFactory], MixerFactory]:
  def wrap(factory: MixerFactory) -> MixerFactory:
    if name in _MIXERS:
      raise ValueError(f"mixer {name!r} is already registered")
    _MIXERS[name] = factory
    return factory
  return wrap


def available_mixers() -> tuple[str, ...]:
  return tuple(sorted(_MIXERS))


def make_mixer(name: str, cfg: ModelConfig) -> nn.Module:
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(available_mixers())}")
  return _MIXERS[name](cfg)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  return jnp.dtype(cfg.dtype)


class AttentionMixer(nn.Module):
  """Causal self-attention restricted to each packed document (and to a sliding window if `attention.window`)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    window = cfg.attention.window
    mask = masks.SlidingWindow(window - 1, 0) if window else masks.Causal()
    if segment_ids is not None:
      mask = mask & masks.SegmentIds(segment_ids, segment_ids)
    attention = MultiHeadAttention(
        num_heads=cfg.attention.num_heads, num_kv_heads=cfg.resolved_num_kv_heads,
        head_dim=cfg.resolved_head_dim, implementation=cfg.attention.implementation,
        rope=cfg.positions == "rope", rope_base=cfg.attention.rope_base, alibi=cfg.positions == "alibi",
        qk_norm=cfg.attention.qk_norm, dropout_rate=cfg.dropout,
        dtype=compute_dtype(cfg), name="attention")
    return attention(x_BTD, mask=mask, q_positions=positions, kv_positions=positions,
                     deterministic=deterministic)


@register_mixer("attention")
def _make_attention(cfg: ModelConfig) -> nn.Module:
  return AttentionMixer(cfg)


def _make_recurrent(cell: str) -> MixerFactory:
  def factory(cfg: ModelConfig) -> nn.Module:
    return RecurrentMixer(d_model=cfg.d_model, hidden=cfg.recurrent.hidden or None, cell=cell, dtype=compute_dtype(cfg))
  return factory


for _cell in ("lstm", "gru", "rnn"):
  register_mixer(_cell)(_make_recurrent(_cell))


def _ssm_kwargs(cfg: ModelConfig, **extra) -> dict:
  kwargs = dict(d_model=cfg.d_model, dtype=compute_dtype(cfg), **extra)
  if cfg.ssm.state:
    kwargs["d_state"] = cfg.ssm.state
  return kwargs


@register_mixer("s4d")
def _make_s4d(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.S4D(**_ssm_kwargs(cfg))


@register_mixer("s5")
def _make_s5(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.S5(**_ssm_kwargs(cfg))


@register_mixer("mamba")
def _make_mamba(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.Mamba(**_ssm_kwargs(cfg, expand=cfg.ssm.expand, d_conv=cfg.ssm.conv,
                                        chunk_size=cfg.ssm.chunk or None))


@register_mixer("mamba2")
def _make_mamba2(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.Mamba2(**_ssm_kwargs(cfg, expand=cfg.ssm.expand, d_conv=cfg.ssm.conv,
                                         head_dim=cfg.ssm.head_dim, chunk_size=cfg.ssm.chunk or None))
