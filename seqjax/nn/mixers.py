"""The mixer registry: every sequence mixer the LM can stack, selected by name from `config.model.mixer`.

A mixer maps x[B, T, D] to y[B, T, D] along the sequence. A registered factory takes the validated
`ModelConfig` and returns a linen module that implements the mixer contract of `seqjax.nn.contract`:

    y_BTD = mixer(x_BTD, *, segment_ids=None, positions=None, deterministic=True)
    y_BTD, state = mixer(x_BTD, ..., return_state=True)            # the state after each row's last real token
    state = mixer.init_state(batch_size, max_len, dtype=None)
    y_BD, state = mixer.step(x_BD, state, *, deterministic=True)

where `segment_ids` (int32, 0 = padding) separate packed documents — no information may flow between them — and
`positions` restart at 0 at every document. Register a new one with

    @register_mixer("my_mixer")
    def _make(cfg: ModelConfig) -> nn.Module: ...

Registration builds the module from a default `ModelConfig` and rejects it, naming what is missing, if it does not
implement the contract. A mixer that computes the same function in several ways (an FFT convolution and a scan, a
chunked and a sequential form, several attention kernels) declares them as `modes`: names mapped to the config
overrides that select each, e.g. `register_mixer("s5", modes={"parallel": {"ssm": {"mode": "parallel"}}, ...})`.
`python -m seqjax.conformance NAME` then checks the contract's promises for a mixer — causality, packed documents,
its modes against each other, prefill + step against the parallel forward, gradients against finite differences,
jit, sharding, bfloat16 (docs/conformance.md); tests/nn/test_mixer_contract.py checks the decoding contract for
every registered mixer and for the LM.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.config import SSM_MODES, ModelConfig, override
from seqjax.nn import contract
from seqjax.nn.attention import KVCache, MultiHeadAttention
from seqjax.nn import extend as extend_lib
from seqjax.nn.extend import NewKeys
from seqjax.nn.recurrent import RecurrentMixer
from seqjax.nn import ssm as ssm_blocks
from seqjax.ops.attention import masks

MixerFactory = Callable[[ModelConfig], nn.Module]
_MIXERS: dict[str, MixerFactory] = {}
_MODES: dict[str, dict[str, Mapping[str, Any]]] = {}
_BIDIRECTIONAL: set[str] = set()
_CONTRACT_CHECK_CONFIG = ModelConfig(d_model=32, num_layers=1, mlp_dim=32, vocab_size=8, max_len=16)


def register_mixer(name: str, *, modes: Mapping[str, Mapping[str, Any]] | None = None, bidirectional: bool = False
                   ) -> Callable[[MixerFactory], MixerFactory]:
  """Decorator: registers `factory(cfg) -> module` under `name`.

  `modes` (optional) names the ways the mixer can compute the same function, each as the `ModelConfig` overrides
  that select it (`seqjax.config.override`); every mode must build a module with the same parameters.
  `bidirectional=True` declares a mixer with no causal form (every token sees the whole sequence, e.g. Linformer):
  it still implements the contract's methods (its `step` raises a clear error), the conformance harness skips its
  causality and decoding checks, and the LM task refuses it (`seqjax.config.BIDIRECTIONAL_MIXERS`).

  Raises ValueError if the name is taken, if a mode's overrides are not fields of `ModelConfig`, or if the module
  the factory builds from a default `ModelConfig` does not implement the mixer contract (`seqjax.nn.contract`);
  the message names the mixer and what is missing.
  """
  def wrap(factory: MixerFactory) -> MixerFactory:
    if name in _MIXERS:
      raise ValueError(f"mixer {name!r} is already registered")
    for mode, overrides in (modes or {}).items():
      try:
        override(_CONTRACT_CHECK_CONFIG, overrides)
      except ValueError as e:
        raise ValueError(f"mixer {name!r}: mode {mode!r} has overrides that do not fit ModelConfig: {e}") from e
    try:
      module = factory(_CONTRACT_CHECK_CONFIG)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"mixer {name!r}: its factory failed on a default ModelConfig ({type(e).__name__}: {e})") from e
    problems = (["the factory must return a flax.linen.Module, got " + type(module).__name__]
                if not isinstance(module, nn.Module) else contract.contract_problems(module))
    if problems:
      raise ValueError(f"mixer {name!r} ({type(module).__name__}) does not implement the mixer contract of "
                       f"seqjax.nn.contract: " + "; ".join(problems))
    _MIXERS[name] = factory
    _MODES[name] = {mode: dict(overrides) for mode, overrides in (modes or {}).items()}
    if bidirectional:
      _BIDIRECTIONAL.add(name)
    return factory
  return wrap


def unregister_mixer(name: str) -> None:
  """Removes a registered mixer (e.g. to re-register it from an edited notebook cell, or a test's own mixer)."""
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(available_mixers())}")
  del _MIXERS[name], _MODES[name]
  _BIDIRECTIONAL.discard(name)


def mixer_modes(name: str) -> dict[str, Mapping[str, Any]]:
  """The modes a registered mixer declared (mode name -> `ModelConfig` overrides); empty if it declared none."""
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(available_mixers())}")
  return dict(_MODES[name])


def is_bidirectional(name: str) -> bool:
  """Whether a registered mixer declared itself bidirectional (no causal form, no decoding)."""
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(available_mixers())}")
  return name in _BIDIRECTIONAL


def available_mixers() -> tuple[str, ...]:
  return tuple(sorted(_MIXERS))


def make_mixer(name: str, cfg: ModelConfig) -> nn.Module:
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(available_mixers())}")
  return _MIXERS[name](cfg)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  return jnp.dtype(cfg.dtype)


class AttentionMixer(nn.Module):
  """Causal self-attention restricted to each packed document (and to a sliding window if `attention.window`).

  State: a `KVCache` of `max_len` slots, or of `attention.window` slots (a ring buffer: memory is the window, not
  the context) when the window is set.
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.attention = MultiHeadAttention(
        num_heads=cfg.attention.num_heads, num_kv_heads=cfg.resolved_num_kv_heads,
        head_dim=cfg.resolved_head_dim, implementation=cfg.attention.implementation,
        rope=cfg.positions == "rope", rope_base=cfg.attention.rope_base, alibi=cfg.positions == "alibi",
        qk_norm=cfg.attention.qk_norm, dropout_rate=cfg.dropout, dtype=compute_dtype(cfg),
        context_parallel=cfg.context_parallel, context_parallel_layout=cfg.context_parallel_layout)

  def cache_size(self, max_len: int) -> int:
    window = self.cfg.attention.window
    return min(window, max_len) if window else max_len

  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True, return_state: bool = False):
    window = self.cfg.attention.window
    if return_state and not window and x_BTD.shape[1] > self.cfg.max_len:
      raise ValueError(f"AttentionMixer: a prompt of {x_BTD.shape[1]} tokens does not fit the KV cache of "
                       f"model.max_len={self.cfg.max_len} tokens; shorten it or raise model.max_len")
    out = self.attention(x_BTD, mask=self.mask(segment_ids, positions), q_positions=positions, kv_positions=positions,
                         deterministic=deterministic, return_kv=return_state)
    if not return_state:
      return out
    y_BTD, (k_BTKH, v_BTKH) = out
    lengths_B = contract.last_token_lengths(segment_ids, *x_BTD.shape[:2])
    state = KVCache.from_sequence(k_BTKH, v_BTKH, lengths_B, contract.next_positions(positions, lengths_B),
                                  self.cache_size(self.cfg.max_len))
    return y_BTD, state

  def mask(self, segment_ids: jax.Array | None, positions: jax.Array | None) -> masks.Mask:
    """The mask of the parallel form (subclasses: sparse patterns, seqjax.nn.sparse_attention)."""
    del positions  # full and windowed attention look only at distances, the same in every document
    window = self.cfg.attention.window
    mask = masks.SlidingWindow(window - 1, 0) if window else masks.Causal()
    if segment_ids is not None:
      mask = mask & masks.SegmentIds(segment_ids, segment_ids)
    return mask

  def cache_mask(self) -> masks.Mask | None:
    """A position mask restricting what a step sees in the cache (None: the whole document)."""
    return None

  def init_state(self, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
    cfg = self.cfg
    return KVCache.empty(batch_size, self.cache_size(max_len), cfg.resolved_num_kv_heads, cfg.resolved_head_dim,
                         dtype or compute_dtype(cfg))

  def step(self, x_BD: jax.Array, state: KVCache, *, deterministic: bool = True) -> tuple[jax.Array, KVCache]:
    y_B1D, state = self.attention(x_BD[:, None], cache=state, deterministic=deterministic,
                                  cache_mask=self.cache_mask())
    return y_B1D[:, 0], state

  def extend(self, x_BTD: jax.Array, state: KVCache, *, deterministic: bool = True):
    """T new tokens per row over the cache in one parallel pass (`seqjax.nn.extend`): (y [B, T, D], NewKeys);
    the cache is not changed (`seqjax.nn.extend.commit` writes the accepted prefix). A sparse pattern
    (`cache_mask`, e.g. Longformer / BigBird) is evaluated per step: such a mixer extends by cached steps."""
    if self.cache_mask() is not None:
      return extend_lib.stepped(self, x_BTD, state, deterministic=deterministic)
    y_BTD, (k_BTKH, v_BTKH) = self.attention(x_BTD, cache=state, deterministic=deterministic)
    return y_BTD, NewKeys(k_BTKH, v_BTKH)


# The attention kernels compared by the conformance harness: the materialised reference, the blockwise tiles and
# the Pallas kernel (interpreted off accelerators). A kernel registered later is selected by config, not listed here.
_ATTENTION_MODES = {impl: {"attention": {"implementation": impl}} for impl in ("reference", "blockwise", "pallas")}


@register_mixer("attention", modes=_ATTENTION_MODES)
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
  if cfg.ssm.mode:
    kwargs["mode"] = cfg.ssm.mode
  return kwargs


def _ssm_modes(mixer: str) -> dict[str, dict]:
  return {mode: {"ssm": {"mode": mode}} for mode in SSM_MODES[mixer]}


@register_mixer("s4d", modes=_ssm_modes("s4d"))
def _make_s4d(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.S4D(**_ssm_kwargs(cfg, chunk_size=cfg.ssm.chunk or None))


@register_mixer("s5", modes=_ssm_modes("s5"))
def _make_s5(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.S5(**_ssm_kwargs(cfg))


@register_mixer("mamba", modes=_ssm_modes("mamba"))
def _make_mamba(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.Mamba(**_ssm_kwargs(cfg, expand=cfg.ssm.expand, d_conv=cfg.ssm.conv,
                                        chunk_size=cfg.ssm.chunk or None))


@register_mixer("mamba2", modes=_ssm_modes("mamba2"))
def _make_mamba2(cfg: ModelConfig) -> nn.Module:
  return ssm_blocks.Mamba2(**_ssm_kwargs(cfg, expand=cfg.ssm.expand, d_conv=cfg.ssm.conv,
                                         head_dim=cfg.ssm.head_dim, chunk_size=cfg.ssm.chunk or None))


def _make_linear_attention(variant: str) -> MixerFactory:
  def factory(cfg: ModelConfig) -> nn.Module:
    from seqjax.nn.linear_attention import LinearAttention  # pylint: disable=import-outside-toplevel
    lin = cfg.linear
    key_dim, value_dim = lin.resolved_dims(cfg.d_model)
    return LinearAttention(
        d_model=cfg.d_model, variant=variant, num_heads=lin.num_heads, key_dim=key_dim, value_dim=value_dim,
        mode=lin.mode, chunk_size=lin.chunk or None, feature_map=lin.feature_map, normalize=lin.normalize,
        rotary=lin.rotary, rope_base=cfg.attention.rope_base, gate_rank=lin.gate_rank,
        gate_normalizer=lin.gate_normalizer, num_features=lin.num_features, feature_seed=lin.feature_seed,
        redraw_every=lin.redraw_every, dtype=compute_dtype(cfg))
  return factory


_LINEAR_MODES = {mode: {"linear": {"mode": mode}} for mode in ("chunked", "parallel", "recurrent")}

# seqjax.config.LINEAR_ATTENTION_MIXERS (with "rwkv" and "based", registered below)
for _variant in ("linear", "retnet", "gla", "deltanet", "performer", "gated_deltanet"):
  register_mixer(_variant, modes=_LINEAR_MODES)(_make_linear_attention(_variant))


def _make_sparse(kind: str) -> MixerFactory:
  def factory(cfg: ModelConfig) -> nn.Module:
    from seqjax.nn import sparse_attention  # pylint: disable=import-outside-toplevel
    return sparse_attention.make(kind, cfg)
  return factory


# seqjax.config.SPARSE_ATTENTION_MIXERS (docs/sparse_attention.md)
_SPARSE_MODES = {impl: {"attention": {"implementation": impl}} for impl in ("reference", "blockwise")}
register_mixer("longformer", modes=_SPARSE_MODES)(_make_sparse("longformer"))
register_mixer("bigbird", modes=_SPARSE_MODES)(_make_sparse("bigbird"))
register_mixer("reformer")(_make_sparse("reformer"))
register_mixer("linformer", bidirectional=True)(_make_sparse("linformer"))
@register_mixer("rwkv", modes=_LINEAR_MODES)
def _make_rwkv(cfg: ModelConfig) -> nn.Module:
  from seqjax.nn.rwkv import Rwkv6  # pylint: disable=import-outside-toplevel
  lin = cfg.linear
  key_dim, value_dim = lin.resolved_dims(cfg.d_model)
  return Rwkv6(d_model=cfg.d_model, num_heads=lin.num_heads, key_dim=key_dim, value_dim=value_dim,
               mix_rank=lin.rwkv_mix_rank, decay_rank=lin.rwkv_decay_rank, channel_mix=lin.rwkv_channel_mix,
               ffn_dim=cfg.mlp_dim, norm=cfg.norm, mode=lin.mode, chunk_size=lin.chunk or None,
               dtype=compute_dtype(cfg))


@register_mixer("based", modes=_LINEAR_MODES)
def _make_based(cfg: ModelConfig) -> nn.Module:
  from seqjax.nn.based import Based  # pylint: disable=import-outside-toplevel
  return Based(cfg)
