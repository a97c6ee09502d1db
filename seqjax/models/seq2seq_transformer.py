"""The Transformer encoder-decoder (Vaswani et al. 2017), with cached decoding.

    src [B, S] -> embed + positions -> encoder_layers x (self-attention over the real source tokens, MLP) -> memory
    tgt [B, T] -> embed + positions -> decoder_layers x (causal self-attention, cross-attention over memory, MLP)
               -> tied read-out -> logits [B, T, V]

One token embedding [V, D] serves the source, the target and (tied, `layers.Embed.attend`) the read-out, so the
source and target vocabularies must be the same. Each sub-layer is `x + f(norm(x))` (pre-norm, with a final norm
after each stack) or `norm(x + f(x))` (post-norm, the paper's). Positions are sinusoidal or learned tables of
`max_len`. Attention is `seqjax.nn.attention.MultiHeadAttention` over a registered kernel (blockwise by default)
with mask objects: the encoder's keys past `src_lengths` are padding (`KeyPadding`), the decoder's self-attention
is `Causal`, its cross-attention sees the real source tokens only.

Decoding (each through `model.apply(variables, ..., method=...)`, jittable with the cache as an ordinary argument):

    logits_BTV = model.apply(v, src_BS, src_lengths_B, tgt_in_BT)                         # teacher forcing
    logits_BTV, cache = model.apply(v, src_BS, src_lengths_B, tgt_BT, method="prefill")  # encoder once + prefix
    logits_BV, cache = model.apply(v, tokens_B, cache, method="step")                    # one target token per row

`prefill` runs the encoder, then the decoder's parallel forward over a target prefix (for generation, the BOS
token alone; right-padded prefixes take `tgt_lengths`), and returns the cache

    {"decoder": {"position": int32 [B], "self": one KVCache per decoder layer},
     "memory": {"kv": one (key, value) [B, S, N, H] per decoder layer, "src_lengths": int32 [B]}}

The cross-attention keys and values of the encoder's output are computed there once and read by every step; the
self-attention caches hold `max_len` slots. `seqjax.decode.seq2seq` decodes greedily or with beam search through
`decode_start` / `decode_step`, which both encoder-decoders offer (beam search reorders only `cache["decoder"]`).

Dimension legend (docs/ARCHITECTURE.md): B batch, S source length, T target length, D model width (`hidden`),
N heads, H head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.config import Seq2SeqConfig
from seqjax.nn import layers
from seqjax.nn.attention import KVCache, MultiHeadAttention
from seqjax.ops.attention import masks as masks_lib

Array = jax.Array

_MODES = ("parallel", "prefill", "step")


def _check_cfg(cfg: Seq2SeqConfig) -> None:
  if cfg.src_vocab <= 0 or cfg.tgt_vocab <= 0:
    raise ValueError(f"Seq2SeqTransformer needs the vocabulary sizes, got src_vocab={cfg.src_vocab}, tgt_vocab="
                     f"{cfg.tgt_vocab} (0 means 'the tokenizer's': resolve them with "
                     f"seqjax.config.with_seq2seq_vocab_sizes)")
  if cfg.src_vocab != cfg.tgt_vocab:
    raise ValueError(f"Seq2SeqTransformer shares one embedding between source and target: src_vocab="
                     f"{cfg.src_vocab} and tgt_vocab={cfg.tgt_vocab} must be equal (pad the smaller one)")
  if cfg.hidden % cfg.num_heads:
    raise ValueError(f"Seq2SeqTransformer: num_heads={cfg.num_heads} must divide hidden={cfg.hidden}")


class _SubLayers(nn.Module):
  """What both blocks share: the residual wiring of one sub-layer (pre- or post-norm, dropout) and the MLP."""

  cfg: Seq2SeqConfig

  @nn.nowrap
  def attention(self, name: str) -> MultiHeadAttention:
    cfg = self.cfg
    return MultiHeadAttention(cfg.num_heads, implementation=cfg.attention_implementation, dropout_rate=cfg.dropout,
                              kernel_init=layers.dense_init(), name=name)

  @nn.nowrap
  def residual(self, x_BTD: Array, f, name: str, deterministic: bool):
    """x + dropout(f(norm(x))) (pre-norm) or norm(x + dropout(f(x))) (post-norm); f may return (y, extra)."""
    norm = layers.make_norm("layernorm", jnp.float32, f"norm_{name}")
    pre = self.cfg.norm_position == "pre"
    out = f(norm(x_BTD) if pre else x_BTD)
    y_BTD, extra = out if isinstance(out, tuple) else (out, None)
    y_BTD = x_BTD + nn.Dropout(self.cfg.dropout)(y_BTD, deterministic=deterministic)
    return (y_BTD if pre else norm(y_BTD)), extra

  @nn.nowrap
  def mlp(self, x_BTD: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    return layers.Mlp(cfg.mlp_dim or 4 * cfg.hidden, activation="relu", dropout=cfg.dropout, name="mlp")(
        x_BTD, deterministic=deterministic)


class EncoderBlock(_SubLayers):
  """Self-attention over the real source tokens (`KeyPadding`), then the MLP."""

  @nn.compact
  def __call__(self, x_BSD: Array, src_lengths_B: Array, deterministic: bool) -> Array:
    attend = lambda y: self.attention("self_attention")(  # noqa: E731
        y, mask=masks_lib.KeyPadding(src_lengths_B), deterministic=deterministic)
    x_BSD, _ = self.residual(x_BSD, attend, "self_attention", deterministic)
    x_BSD, _ = self.residual(x_BSD, lambda y: self.mlp(y, deterministic), "mlp", deterministic)
    return x_BSD


class DecoderBlock(_SubLayers):
  """Causal self-attention, cross-attention over the encoder's output, the MLP.

  `mode`: "parallel" (memory [B, S, D] -> y), "prefill" (the same, also returning this layer's state: the
  self-attention `KVCache` after `lengths[b]` tokens and the cross-attention (key, value)), "step" (y [B, 1, D] and
  that state -> (y, state)).
  """

  @nn.compact
  def __call__(self, y_BTD: Array, memory_BSD: Array | None, src_lengths_B: Array, *, mode: str,
               deterministic: bool, lengths_B: Array | None = None, state=None):
    cfg = self.cfg
    self_attention, cross_attention = self.attention("self_attention"), self.attention("cross_attention")
    source_mask = masks_lib.KeyPadding(src_lengths_B)

    def attend_self(x_BTD):
      if mode == "step":
        return self_attention(x_BTD, cache=state[0], deterministic=deterministic)
      if mode == "prefill":
        out_BTD, (k_BTKH, v_BTKH) = self_attention(x_BTD, mask=masks_lib.Causal(), return_kv=True,
                                                   deterministic=deterministic)
        return out_BTD, KVCache.from_sequence(k_BTKH, v_BTKH, lengths_B, lengths_B, cfg.max_len)
      return self_attention(x_BTD, mask=masks_lib.Causal(), deterministic=deterministic)

    def attend_source(x_BTD):
      if mode == "step":
        return cross_attention(x_BTD, kv=state[1], mask=source_mask, deterministic=deterministic), state[1]
      return cross_attention(x_BTD, memory_BSD, mask=source_mask, return_kv=True, deterministic=deterministic)

    y_BTD, cache = self.residual(y_BTD, attend_self, "self_attention", deterministic)
    y_BTD, kv = self.residual(y_BTD, attend_source, "cross_attention", deterministic)
    y_BTD, _ = self.residual(y_BTD, lambda x: self.mlp(x, deterministic), "mlp", deterministic)
    return y_BTD if mode == "parallel" else (y_BTD, (cache, kv))


class Seq2SeqTransformer(nn.Module):
  """The encoder-decoder. See the module docstring."""

  cfg: Seq2SeqConfig

  def setup(self):
    cfg = self.cfg
    _check_cfg(cfg)
    self.embed = layers.Embed(cfg.tgt_vocab, cfg.hidden, name="embed")
    if cfg.positions == "learned":
      self.src_positions = layers.LearnedPositions(cfg.max_len, cfg.hidden, name="src_positions")
      self.tgt_positions = layers.LearnedPositions(cfg.max_len, cfg.hidden, name="tgt_positions")
    self.encoder = [EncoderBlock(cfg, name=f"encoder_{i}") for i in range(cfg.encoder_layers)]
    self.decoder = [DecoderBlock(cfg, name=f"decoder_{i}") for i in range(cfg.decoder_layers)]
    if cfg.norm_position == "pre":
      self.encoder_norm = layers.make_norm("layernorm", jnp.float32, "encoder_norm")
      self.decoder_norm = layers.make_norm("layernorm", jnp.float32, "decoder_norm")
    self.drop = nn.Dropout(cfg.dropout)

  def _embed(self, tokens_BT: Array, positions_BT: Array, table: str, deterministic: bool) -> Array:
    x_BTD = self.embed(tokens_BT)
    if self.cfg.positions == "learned":
      x_BTD = x_BTD + getattr(self, table)(positions_BT)
    else:
      x_BTD = x_BTD + layers.sinusoidal_positions(positions_BT, self.cfg.hidden)
    return self.drop(x_BTD, deterministic=deterministic)

  def encode(self, src_BS: Array, src_lengths_B: Array, *, deterministic: bool = True) -> Array:
    """Source tokens [B, S] (row b's real ones the first src_lengths[b]) -> memory [B, S, D]."""
    if src_BS.ndim != 2 or src_lengths_B.shape != src_BS.shape[:1]:
      raise ValueError(f"expected src [B, S] and src_lengths [B], got {src_BS.shape} and {src_lengths_B.shape}")
    if src_BS.shape[1] > self.cfg.max_len:
      raise ValueError(f"a source of {src_BS.shape[1]} tokens exceeds seq2seq.max_len={self.cfg.max_len}")
    positions_BS = jnp.broadcast_to(jnp.arange(src_BS.shape[1], dtype=jnp.int32), src_BS.shape)
    x_BSD = self._embed(src_BS, positions_BS, "src_positions", deterministic)
    for block in self.encoder:
      x_BSD = block(x_BSD, src_lengths_B, deterministic)
    return self.encoder_norm(x_BSD) if self.cfg.norm_position == "pre" else x_BSD

  def _decode(self, tgt_BT, positions_BT, memory_BSD, src_lengths_B, *, mode, deterministic, lengths_B=None,
              states=None):
    """The decoder stack in one of the modes of `DecoderBlock` -> logits, or (logits, layer states)."""
    y_BTD = self._embed(tgt_BT, positions_BT, "tgt_positions", deterministic)
    new_states = []
    for i, block in enumerate(self.decoder):
      out = block(y_BTD, memory_BSD, src_lengths_B, mode=mode, deterministic=deterministic, lengths_B=lengths_B,
                  state=None if states is None else states[i])
      y_BTD, state = (out, None) if mode == "parallel" else out
      new_states.append(state)
    if self.cfg.norm_position == "pre":
      y_BTD = self.decoder_norm(y_BTD)
    logits_BTV = self.embed.attend(y_BTD).astype(jnp.float32)
    return logits_BTV if mode == "parallel" else (logits_BTV, tuple(new_states))

  def _check_target(self, tgt_BT: Array, batch: int) -> None:
    if tgt_BT.ndim != 2 or tgt_BT.shape[0] != batch:
      raise ValueError(f"expected target tokens [B, T] with the source's batch {batch}, got {tgt_BT.shape}")
    if tgt_BT.shape[1] > self.cfg.max_len:
      raise ValueError(f"a target of {tgt_BT.shape[1]} tokens exceeds seq2seq.max_len={self.cfg.max_len}")

  def __call__(self, src_BS: Array, src_lengths_B: Array, tgt_in_BT: Array, *,
               deterministic: bool = True) -> Array:
    """Teacher forcing: float32 logits [B, T, V] of the next target token for `tgt_in` (BOS-shifted gold)."""
    self._check_target(tgt_in_BT, src_BS.shape[0])
    memory_BSD = self.encode(src_BS, src_lengths_B, deterministic=deterministic)
    positions_BT = jnp.broadcast_to(jnp.arange(tgt_in_BT.shape[1], dtype=jnp.int32), tgt_in_BT.shape)
    return self._decode(tgt_in_BT, positions_BT, memory_BSD, src_lengths_B, mode="parallel",
                        deterministic=deterministic)

  def prefill(self, src_BS: Array, src_lengths_B: Array, tgt_BT: Array, *,
              tgt_lengths: Array | None = None) -> tuple[Array, dict]:
    """Encodes the source and runs the decoder over a target prefix [B, T] (row b's the first tgt_lengths[b];
    None: all T) -> (float32 logits [B, T, V], the cache after each row's prefix; module docstring)."""
    self._check_target(tgt_BT, src_BS.shape[0])
    batch, length = tgt_BT.shape
    lengths_B = (jnp.full((batch,), length, jnp.int32) if tgt_lengths is None else
                 jnp.asarray(tgt_lengths, jnp.int32))
    memory_BSD = self.encode(src_BS, src_lengths_B)
    positions_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tgt_BT.shape)
    logits_BTV, states = self._decode(tgt_BT, positions_BT, memory_BSD, src_lengths_B, mode="prefill",
                                      deterministic=True, lengths_B=lengths_B)
    cache = {"decoder": {"position": lengths_B, "self": tuple(s[0] for s in states)},
             "memory": {"kv": tuple(s[1] for s in states), "src_lengths": jnp.asarray(src_lengths_B, jnp.int32)}}
    return logits_BTV, cache

  def step(self, tokens_B: Array, cache: dict) -> tuple[Array, dict]:
    """One target token per row [B] and the cache -> (float32 logits [B, V] of the next token, the new cache)."""
    decoder, memory = cache["decoder"], cache["memory"]
    position_B = decoder["position"]
    states = tuple(zip(decoder["self"], memory["kv"]))
    logits_B1V, states = self._decode(tokens_B[:, None], position_B[:, None], None, memory["src_lengths"],
                                      mode="step", deterministic=True, states=states)
    new_decoder = {"position": position_B + 1, "self": tuple(s[0] for s in states)}
    return logits_B1V[:, 0], {"decoder": new_decoder, "memory": memory}

  def decode_start(self, src_BS: Array, src_lengths_B: Array, bos_B: Array) -> tuple[Array, dict]:
    """The decoding interface of `seqjax.decode.seq2seq`: (logits [B, V] after the BOS token, the cache)."""
    logits_B1V, cache = self.prefill(src_BS, src_lengths_B, bos_B[:, None])
    return logits_B1V[:, 0], cache

  def decode_step(self, tokens_B: Array, cache: dict) -> tuple[Array, dict]:
    """The decoding interface of `seqjax.decode.seq2seq`: `step`."""
    return self.step(tokens_B, cache)
