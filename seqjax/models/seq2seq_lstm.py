"""LSTM encoder-decoder with additive (Bahdanau) attention.

Encoder: embedding -> stacked LSTM (optionally bidirectional, concat) over the source, padded
positions masked by `src_lengths`. Decoder, one step per target token (Bahdanau):

    context_t = attention(s_{t-1}, memory)          # query is the state before the step
    s_t       = LSTM([embed(y_{t-1}); context_t], s_{t-1})
    logits_t  = W_o tanh(W_c [s_t; context_t])

Training uses teacher forcing with optional **scheduled sampling**: at each step and for each row,
the decoder input is the gold previous token with probability `teacher_forcing_prob`, otherwise the
model's own previous argmax prediction. The per-step coin flips come from an explicit rng; with
probability 1 the model is exactly teacher forced. Decoding (greedy and beam search,
`seqjax.decode.seq2seq`) runs the same decoder step through `decode_start` / `decode_step`.

The model takes `seqjax.config.Seq2SeqConfig` (validated with the run's config, vocabulary sizes resolved from
the tokenizer) as is.

Dimension legend (docs/ARCHITECTURE.md): B batch, S source length, T target length, D embedding width, R recurrent
state width, U memory width (R, or 2R when bidirectional), F attention (score MLP) width, V vocabulary.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from seqjax.config import Seq2SeqConfig
from seqjax.nn.additive_attention import AdditiveAttention, length_mask
from seqjax.nn.recurrent import Recurrent

Array = jax.Array


def _check_vocab(cfg: Seq2SeqConfig) -> None:
  if cfg.src_vocab <= 0 or cfg.tgt_vocab <= 0:
    raise ValueError(f"Seq2SeqLSTM needs the vocabulary sizes, got src_vocab={cfg.src_vocab}, tgt_vocab="
                     f"{cfg.tgt_vocab} (0 means 'the tokenizer's': resolve them with "
                     f"seqjax.config.with_seq2seq_vocab_sizes)")


class _DecoderStep(nn.Module):
  """One decoder step; scanned over the target with `nn.scan` (params broadcast)."""

  cfg: Seq2SeqConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.tgt_vocab, cfg.embed_dim, name="embed")
    self.rnn = Recurrent(hidden=cfg.hidden, cell="lstm", num_layers=cfg.decoder_layers,
                         dropout=cfg.dropout, name="rnn")
    self.attention = AdditiveAttention(cfg.attention_dim, name="attention")
    self.combine = nn.Dense(cfg.hidden, name="combine")
    self.readout = nn.Dense(cfg.tgt_vocab, name="readout")
    self.drop = nn.Dropout(cfg.dropout)

  def __call__(self, carry, xs, memory_BSU, keys_BSF, mask_BS, deterministic: bool):
    states, prev_pred_B = carry
    gold_B, use_gold_B = xs
    token_B = jnp.where(use_gold_B, gold_B, prev_pred_B)
    query_BR = states[-1][0]  # top layer's h before the step
    context_BU, weights_BS = self.attention(query_BR, memory_BSU, keys_BSF, mask_BS)
    emb_BD = self.drop(self.embed(token_B), deterministic=deterministic)
    h_BR, states = self.rnn.step(jnp.concatenate([emb_BD, context_BU], -1), states,
                                 deterministic=deterministic)
    out_BR = jnp.tanh(self.combine(jnp.concatenate([h_BR, context_BU], -1)))
    logits_BV = self.readout(self.drop(out_BR, deterministic=deterministic))
    pred_B = jnp.argmax(logits_BV, axis=-1).astype(prev_pred_B.dtype)
    return (states, pred_B), (logits_BV.astype(jnp.float32), weights_BS)


class Seq2SeqLSTM(nn.Module):
  """The encoder-decoder. See the module docstring."""

  cfg: Seq2SeqConfig

  def setup(self):
    cfg = self.cfg
    _check_vocab(cfg)
    self.src_embed = nn.Embed(cfg.src_vocab, cfg.embed_dim, name="src_embed")
    self.encoder = Recurrent(hidden=cfg.hidden, cell="lstm", num_layers=cfg.encoder_layers,
                             bidirectional=cfg.bidirectional_encoder, merge="concat",
                             dropout=cfg.dropout, name="encoder")
    self.bridge = nn.Dense(cfg.hidden, name="bridge")
    self.attention_keys = nn.Dense(cfg.attention_dim, name="attention_keys")
    self.decoder = nn.scan(
        _DecoderStep, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
        in_axes=(1, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), out_axes=1)(
            cfg, name="decoder")

  def encode(self, src_BS: Array, src_lengths_B: Array, *, deterministic: bool = True):
    """Source tokens [B, S] -> (memory [B, S, U], keys [B, S, F], mask [B, S], decoder states)."""
    if src_BS.ndim != 2 or src_lengths_B.shape != src_BS.shape[:1]:
      raise ValueError(f"expected src [B, S] and src_lengths [B], got {src_BS.shape} and "
                       f"{src_lengths_B.shape}.")
    cfg = self.cfg
    mask_BS = length_mask(src_lengths_B, src_BS.shape[1])
    memory_BSU, finals = self.encoder(self.src_embed(src_BS), lengths=src_lengths_B,
                                      deterministic=deterministic)
    # Decoder initial state: h = tanh(W [final h of the top encoder layer (both directions)]).
    ndir = 2 if cfg.bidirectional_encoder else 1
    top = [finals[-ndir + k][0] for k in range(ndir)]
    h0_BR = jnp.tanh(self.bridge(jnp.concatenate(top, -1)))
    states = [(h0_BR, jnp.zeros_like(h0_BR)) for _ in range(cfg.decoder_layers)]
    # The key projection of additive attention is step-independent: computed once here and
    # broadcast into the scanned decoder step (whose attention then only projects its query).
    keys_BSF = self.attention_keys(memory_BSU)
    return memory_BSU, keys_BSF, mask_BS, states

  def _decode(self, memory_BSU, keys_BSF, mask_BS, states, gold_BT, use_gold_BT, deterministic):
    b = gold_BT.shape[0]
    prev_pred_B = jnp.zeros((b,), gold_BT.dtype)
    (_, _), (logits_BTV, weights_BTS) = self.decoder(
        (states, prev_pred_B), (gold_BT, use_gold_BT), memory_BSU, keys_BSF, mask_BS,
        deterministic)
    return logits_BTV, weights_BTS

  def __call__(self, src_BS: Array, src_lengths_B: Array, tgt_in_BT: Array, *,
               teacher_forcing_prob: float | Array = 1.0, sampling_rng: Array | None = None,
               deterministic: bool = True) -> Array:
    """Training forward: logits [B, T, V] float32 for targets `tgt_in` (BOS-shifted gold).

    With `teacher_forcing_prob` < 1 (a float or a traced scalar from a schedule), each step of
    each row feeds the model's own previous prediction with probability 1 - p; pass
    `sampling_rng`. The first step always feeds the gold BOS.
    """
    if tgt_in_BT.ndim != 2 or tgt_in_BT.shape[0] != src_BS.shape[0]:
      raise ValueError(f"expected tgt_in [B, T] with the batch of src {src_BS.shape}, got "
                       f"{tgt_in_BT.shape}.")
    memory_BSU, keys_BSF, mask_BS, states = self.encode(src_BS, src_lengths_B,
                                                        deterministic=deterministic)
    use_gold_BT = scheduled_sampling_mask(sampling_rng, tgt_in_BT.shape, teacher_forcing_prob)
    logits_BTV, _ = self._decode(memory_BSU, keys_BSF, mask_BS, states, tgt_in_BT, use_gold_BT,
                                 deterministic)
    return logits_BTV

  def greedy_alignment(self, src_BS: Array, src_lengths_B: Array, *, max_len: int, bos_id: int,
                       eos_id: int, pad_id: int = 0) -> tuple[Array, Array, Array]:
    """`greedy` and its alignment: (tokens [B, T], lengths [B], attention weights float32 [B, T, S]).

    Row t of the weights is the additive attention that produced output token t (zero on padded
    source positions; rows past a row's length are what the decoder computed after its EOS).
    """
    memory_BSU, keys_BSF, mask_BS, states = self.encode(src_BS, src_lengths_B)
    b = src_BS.shape[0]
    gold_BT = jnp.full((b, max_len), bos_id, jnp.int32)
    use_gold_BT = jnp.zeros((b, max_len), bool).at[:, 0].set(True)
    logits_BTV, weights_BTS = self._decode(memory_BSU, keys_BSF, mask_BS, states, gold_BT,
                                           use_gold_BT, True)
    tokens_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
    return (*stop_at_eos(tokens_BT, eos_id, pad_id), weights_BTS)

  def decode_start(self, src_BS: Array, src_lengths_B: Array, bos_B: Array) -> tuple[Array, dict]:
    """The decoding interface of `seqjax.decode.seq2seq`: encodes the source once and feeds the BOS tokens [B];
    -> (float32 logits [B, V] of the first target token, the state {"decoder": the LSTM states, "memory": the
    encoder's memory, attention keys and mask}). Beam search reorders only "decoder"."""
    memory_BSU, keys_BSF, mask_BS, states = self.encode(src_BS, src_lengths_B)
    return self.decode_step(bos_B, {"decoder": states,
                                    "memory": {"memory": memory_BSU, "keys": keys_BSF, "mask": mask_BS}})

  def decode_step(self, tokens_B: Array, state: dict) -> tuple[Array, dict]:
    """One target token per row [B] -> (float32 logits [B, V] of the next one, the new state): the scanned
    decoder step of training over a target of one token."""
    memory = state["memory"]
    (states, _), (logits_B1V, _) = self.decoder(
        (state["decoder"], tokens_B), (tokens_B[:, None], jnp.ones(tokens_B.shape + (1,), bool)),
        memory["memory"], memory["keys"], memory["mask"], True)
    return logits_B1V[:, 0], {"decoder": states, "memory": memory}


def scheduled_sampling_mask(rng: Array | None, shape: tuple[int, int],
                            teacher_forcing_prob: float | Array) -> Array:
  """[B, T] bool: True where the gold token is fed. Column 0 (BOS) is always gold.

  `uniform(rng) < p` with uniforms in [0, 1), so p = 1 feeds gold everywhere (exact teacher
  forcing) and p = 0 never after BOS.
  """
  if isinstance(teacher_forcing_prob, (int, float)):
    if not 0.0 <= teacher_forcing_prob <= 1.0:
      raise ValueError(f"teacher_forcing_prob must be in [0, 1], got {teacher_forcing_prob}.")
    if teacher_forcing_prob == 1.0:
      return jnp.ones(shape, bool)
  if rng is None:
    raise ValueError("scheduled sampling (teacher_forcing_prob < 1) needs `sampling_rng`.")
  use_gold = jax.random.uniform(rng, shape) < teacher_forcing_prob
  return use_gold.at[:, 0].set(True)


def stop_at_eos(tokens_BT: Array, eos_id: int, pad_id: int = 0) -> tuple[Array, Array]:
  """Replace everything after the first EOS by `pad_id`; lengths count up to and incl. EOS."""
  is_eos_BT = tokens_BT == eos_id
  seen_before_BT = jnp.cumsum(is_eos_BT, axis=1) - is_eos_BT > 0
  tokens_BT = jnp.where(seen_before_BT, pad_id, tokens_BT)
  has_eos_B = jnp.any(is_eos_BT, axis=1)
  lengths_B = jnp.where(has_eos_B, jnp.argmax(is_eos_BT, axis=1) + 1, tokens_BT.shape[1])
  return tokens_BT, lengths_B.astype(jnp.int32)


def seq2seq_loss(logits_BTV: Array, tgt_out_BT: Array, tgt_lengths_B: Array,
                 label_smoothing: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Mean token cross-entropy over valid target positions -> (loss, metrics)."""
  if logits_BTV.shape[:2] != tgt_out_BT.shape:
    raise ValueError(f"logits [B, T, V] {logits_BTV.shape} do not match targets "
                     f"{tgt_out_BT.shape}.")
  mask_BT = length_mask(tgt_lengths_B, tgt_out_BT.shape[1])
  v = logits_BTV.shape[-1]
  labels_BTV = optax.smooth_labels(jax.nn.one_hot(tgt_out_BT, v), label_smoothing)
  xent_BT = optax.softmax_cross_entropy(logits_BTV.astype(jnp.float32), labels_BTV)
  n = jnp.maximum(mask_BT.sum(), 1)
  loss = jnp.sum(jnp.where(mask_BT, xent_BT, 0.0)) / n
  correct_BT = (jnp.argmax(logits_BTV, -1) == tgt_out_BT) & mask_BT
  seq_correct_B = jnp.all(correct_BT | ~mask_BT, axis=1)
  return loss, {"loss": loss, "token_accuracy": correct_BT.sum() / n,
                "sequence_accuracy": seq_correct_B.mean()}
