"""Decoding for the encoder-decoders (`Seq2SeqLSTM`, `Seq2SeqTransformer`): greedy and beam search, jitted as one
program each, with the loops of `seqjax.decode.generate` (greedy) and `seqjax.decode.beam` (beam search).

    result = decode(model, params, src_BS, src_lengths_B, max_new_tokens=64, bos_id=1, eos_id=2, num_beams=4)
    result.tokens      # int32 [B, max_new_tokens]: the target, its EOS, then pad
    result.lengths     # int32 [B]: target tokens including the EOS (max_new_tokens when none came)

Both models offer the same two methods, which is all the loops need:

    logits_BV, state = model.apply(v, src_BS, src_lengths_B, bos_B, method="decode_start")  # encoder once, BOS
    logits_BV, state = model.apply(v, tokens_B, state, method="decode_step")                # one token per row

The state is `{"decoder": what the decoder carries (LSTM (h, c); Transformer self-attention KV caches and
position), "memory": the encoder's output (LSTM: memory, attention keys, mask; Transformer: every decoder layer's
cross-attention keys and values, the source lengths)}`. Beam search copies the whole state to the K beams of each
source once; afterwards it reorders only "decoder": the K beams of one source share their memory rows, so a
reorder within a source leaves "memory" as it is.

The result is a `seqjax.decode.GenerateResult` without the BOS: scores are the sum of the new tokens' log-
probabilities (greedy) or the length-penalised score log p / ((5 + n) / 6) ** length_penalty (beam search; `beam_*`
hold all K hypotheses, best first). num_beams=1 is greedy.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.decode import beam, common
from seqjax.decode.common import GenerateResult
from seqjax.decode.generate import sample_loop
from seqjax.decode.samplers import Sampler


def _readable_values(x: Any) -> np.ndarray:
  """The values of `x` this process can read: all of them, or those of its devices' shards of a global array that
  spans several processes (each checks its own rows)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.concatenate([np.asarray(shard.data).ravel() for shard in x.addressable_shards])
  return np.asarray(x)


def _check(model: Any, src: Any, src_lengths: Any, *, max_new_tokens: int, num_beams: int, length_penalty: float,
           ids: dict[str, int]) -> None:
  if not (hasattr(model, "decode_start") and hasattr(model, "decode_step")):
    raise ValueError(f"seqjax.decode.seq2seq decodes an encoder-decoder with decode_start / decode_step "
                     f"(Seq2SeqLSTM, Seq2SeqTransformer), got {type(model).__name__}; for a DecoderLM use "
                     f"seqjax.decode.generate")
  if np.ndim(src) != 2 or 0 in np.shape(src):
    raise ValueError(f"src must be int tokens [batch, length], got shape {np.shape(src)}")
  if np.shape(src_lengths) != np.shape(src)[:1]:
    raise ValueError(f"src_lengths must have one entry per source row, shape {np.shape(src)[:1]}, got "
                     f"{np.shape(src_lengths)}")
  if not isinstance(src_lengths, jax.core.Tracer):
    lengths = _readable_values(src_lengths)
    if np.any(lengths < 1) or np.any(lengths > np.shape(src)[1]):
      raise ValueError(f"src_lengths must be in [1, {np.shape(src)[1]}], got {lengths.tolist()}")
  for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if not math.isfinite(length_penalty):
    raise ValueError(f"length_penalty must be a finite number, got {length_penalty}")
  cfg = model.cfg
  for name, value in ids.items():
    if not 0 <= value < cfg.tgt_vocab:
      raise ValueError(f"{name}={value} is outside the target vocabulary [0, {cfg.tgt_vocab})")
  if cfg.arch == "transformer" and max(np.shape(src)[1], 1 + max_new_tokens) > cfg.max_len:
    raise ValueError(f"a source of {np.shape(src)[1]} tokens or BOS + max_new_tokens={max_new_tokens} exceeds the "
                     f"transformer's seq2seq.max_len={cfg.max_len} (its position table and decoder cache)")


def decode(model: Any, params: Any, src: Any, src_lengths: Any, *, max_new_tokens: int, bos_id: int, eos_id: int,
           pad_id: int = 0, num_beams: int = 1, length_penalty: float = 0.6) -> GenerateResult:
  """Translates sources [B, S] (row b's real tokens the first src_lengths[b]); see the module docstring.

  Greedy for num_beams=1, beam search (`seqjax.decode.beam`) for more. A row ends at its EOS or after
  max_new_tokens tokens. Raises ValueError, before anything is compiled, for an argument out of range.
  """
  return _run(model, params, src, src_lengths, "greedy" if num_beams == 1 else "beam", max_new_tokens=max_new_tokens,
              bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, num_beams=num_beams, length_penalty=length_penalty)


def beam_search(model: Any, params: Any, src: Any, src_lengths: Any, *, num_beams: int, max_new_tokens: int,
                bos_id: int, eos_id: int, pad_id: int = 0, length_penalty: float = 0.6) -> GenerateResult:
  """Beam search with any num_beams >= 1 (`decode` runs greedy for 1: the two agree, tested)."""
  return _run(model, params, src, src_lengths, "beam", max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id,
              pad_id=pad_id, num_beams=num_beams, length_penalty=length_penalty)


def _run(model, params, src, src_lengths, algorithm, *, max_new_tokens, bos_id, eos_id, pad_id, num_beams,
         length_penalty):
  _check(model, src, src_lengths, max_new_tokens=max_new_tokens, num_beams=num_beams,
         length_penalty=length_penalty, ids={"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id})
  return _decode(model, algorithm, int(num_beams), int(max_new_tokens), float(length_penalty), int(bos_id),
                 int(eos_id), int(pad_id), params, jnp.asarray(src, jnp.int32), jnp.asarray(src_lengths, jnp.int32))


def _take_rows(tree: Any, rows: jax.Array) -> Any:
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _decode(model, algorithm: str, num_beams: int, max_new_tokens: int, alpha: float, bos_id: int, eos_id: int,
            pad_id: int, params, src_BS, src_lengths_B):
  batch, k = src_BS.shape[0], num_beams
  variables = {"params": params}
  bos_B = jnp.full((batch,), bos_id, jnp.int32)
  logits_BV, state = model.apply(variables, src_BS, src_lengths_B, bos_B, method="decode_start")
  step = lambda tokens, s: model.apply(variables, tokens, s, method="decode_step")  # noqa: E731
  ones_B = jnp.ones((batch,), jnp.int32)
  buffer_BL = common.output_buffer(bos_B[:, None], ones_B, max_new_tokens, pad_id)
  stop_BS = jnp.full((batch, 1), eos_id, jnp.int32)
  pad = jnp.int32(pad_id)
  if algorithm == "greedy":
    out = sample_loop(step, Sampler(), logits_BV, state, buffer_BL, ones_B, stop_BS, jax.random.key(0), pad,
                      max_new_tokens=max_new_tokens)
  else:
    state = _take_rows(state, jnp.repeat(jnp.arange(batch), k))  # K copies of each source's state
    reorder = lambda s, rows: {**s, "decoder": _take_rows(s["decoder"], rows)}  # noqa: E731
    out = beam.search(step, reorder, logits_BV, state, buffer_BL, ones_B, stop_BS, num_beams=k,
                      max_new_tokens=max_new_tokens, alpha=alpha, pad_id=pad)
  strip = lambda x: None if x is None else x[..., 1:]  # noqa: E731  (the BOS column)
  minus_bos = lambda x: None if x is None else x - 1  # noqa: E731
  return GenerateResult(tokens=strip(out.tokens), lengths=minus_bos(out.lengths), scores=out.scores,
                        beam_tokens=strip(out.beam_tokens), beam_scores=out.beam_scores,
                        beam_lengths=minus_bos(out.beam_lengths))
