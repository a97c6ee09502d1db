"""What the decoders share: the result type, argument checks, the prefill, cache row selection, the output buffer.

Output layout (every decoder): `tokens` [B, P + max_new_tokens] holds row b's prompt left-aligned in
`tokens[b, :prompt_lengths[b]]`, its continuation right after it, from `tokens[b, prompt_lengths[b]]` to
`tokens[b, lengths[b] - 1]` (a stop token, when one ended the row, is the last of them), and `pad_id` everywhere
after. Prompt positions past a row's length are overwritten with `pad_id` too.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.decode.quantize import materialize
from seqjax.ops import backend


@flax.struct.dataclass
class GenerateResult:
  """What `seqjax.decode.generate` returns (a pytree).

  Attributes:
    tokens: int32 [B, P + max_new_tokens], prompt then continuation then pad (module docstring).
    lengths: int32 [B], prompt plus new tokens of each row (a stop token that ended it included).
    scores: float32 [B]. Sampling / greedy: the sum of the model's log-probabilities (temperature 1, before any
      filter) of the new tokens. Beam search: the length-penalised score of the returned hypothesis.
    beam_tokens, beam_scores, beam_lengths: beam search only (None otherwise): all `num_beams` finished
      hypotheses of each row, best first, [B, num_beams, P + max_new_tokens], [B, num_beams], [B, num_beams].
    draft_proposed, draft_accepted: speculative decoding only (None otherwise): int32 [B], the draft tokens
      proposed to and accepted by the target in each row's rounds (`acceptance_rate` is their ratio).
  """

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  beam_tokens: jax.Array | None = None
  beam_scores: jax.Array | None = None
  beam_lengths: jax.Array | None = None
  draft_proposed: jax.Array | None = None
  draft_accepted: jax.Array | None = None

  @property
  def acceptance_rate(self) -> float | None:
    """Speculative decoding: the fraction of proposed draft tokens the target accepted (all rows); else None."""
    if self.draft_proposed is None:
      return None
    return float(jnp.sum(self.draft_accepted)) / max(float(jnp.sum(self.draft_proposed)), 1.0)


def _concrete(x: Any) -> np.ndarray | None:
  """x as a NumPy array, or None when it is a tracer (checks that need values are skipped under a trace)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def check_prompts(prompts: Any, prompt_lengths: Any, *, max_new_tokens: int, max_len: int, vocab_size: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Validates the prompts [B, P] and their lengths [B] (None: all P); returns both as int32 arrays.

  Raises ValueError naming the argument: not 2-D, empty, lengths out of [1, P], tokens outside the vocabulary,
  max_new_tokens < 1, or a prompt plus max_new_tokens beyond the model's context `max_len`.
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  shape = np.shape(prompts)
  if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
    raise ValueError(f"prompts must be int tokens [batch, length] with at least one token per row (e.g. the BOS "
                     f"token), got shape {shape}")
  batch, length = shape
  values = _concrete(prompts)
  if values is not None:
    if not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"prompts must hold integer token ids, got dtype {values.dtype}")
  if prompt_lengths is None:
    lengths = np.full((batch,), length, np.int32)
  else:
    if np.shape(prompt_lengths) != (batch,):
      raise ValueError(f"prompt_lengths must have one entry per prompt row, shape ({batch},), got "
                       f"{np.shape(prompt_lengths)}")
    lengths = _concrete(prompt_lengths)
    if lengths is not None and (np.any(lengths < 1) or np.any(lengths > length)):
      raise ValueError(f"prompt_lengths must be in [1, {length}] (the prompts' width; a row needs at least one "
                       f"token), got {lengths.tolist()}")
  longest = length if lengths is None else int(np.max(lengths))
  if longest + max_new_tokens > max_len:
    raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                     f"context of {max_len} (model.max_len); shorten the prompt or ask for fewer tokens")
  if values is not None:
    used_B = np.full((batch,), length) if lengths is None else lengths
    real = values[np.arange(length)[None] < used_B[:, None]]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
      raise ValueError(f"prompt tokens must be in [0, {vocab_size}) (the model's vocabulary), got values in "
                       f"[{real.min()}, {real.max()}]")
  out_lengths = jnp.asarray(prompt_lengths if lengths is None else lengths, jnp.int32)
  return jnp.asarray(prompts, jnp.int32), out_lengths


def stop_table(stop_tokens: Any, batch: int, vocab_size: int) -> jax.Array:
  """int32 [B, S]: each row's stop tokens, -1 filling. `stop_tokens` is a sequence of ids for every row, or an
  int array [B, S] per row (-1: no token)."""
  table = np.asarray(stop_tokens if np.size(stop_tokens) else np.zeros((0,), np.int32), np.int64)
  if table.ndim == 1:
    table = np.broadcast_to(table[None], (batch, table.shape[0]))
  if table.ndim != 2 or table.shape[0] != batch:
    raise ValueError(f"stop_tokens must be a sequence of token ids (for every row) or an int array [{batch}, S] "
                     f"(per row, -1 filling), got shape {table.shape}")
  if np.any((table < -1) | (table >= vocab_size)):
    raise ValueError(f"stop_tokens must be ids in [0, {vocab_size}) (or -1 filling a per-row table), got "
                     f"{sorted(set(table.ravel().tolist()))}")
  return jnp.asarray(table, jnp.int32)


def is_stop(tokens: jax.Array, stop_BS: jax.Array) -> jax.Array:
  """bool, shape of tokens [B, ...]: whether each token is one of its row's stop tokens."""
  stop = stop_BS.reshape(stop_BS.shape[:1] + (1,) * (tokens.ndim - 1) + stop_BS.shape[1:])
  return jnp.any(tokens[..., None] == stop, axis=-1)


def output_buffer(prompts_BP: jax.Array, lengths_B: jax.Array, max_new_tokens: int, pad_id: int) -> jax.Array:
  """int32 [B, P + max_new_tokens]: each row's prompt, pad everywhere else."""
  length = prompts_BP.shape[1]
  prompts_BP = jnp.where(jnp.arange(length)[None] < lengths_B[:, None], prompts_BP, pad_id)
  return jnp.pad(prompts_BP, ((0, 0), (0, max_new_tokens)), constant_values=pad_id)


def write_at(buffer_BL: jax.Array, offsets_B: jax.Array, tokens_B: jax.Array) -> jax.Array:
  """buffer [B, ..., L] with tokens [B, ...] written at position offsets[b] of the last axis of each row b."""
  shape = offsets_B.shape + (1,) * (buffer_BL.ndim - 1)
  at = jnp.arange(buffer_BL.shape[-1]) == offsets_B.reshape(shape)
  return jnp.where(at, tokens_B[..., None], buffer_BL)


def prefill(model: Any, params: Any, prompts_BP: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, dict]:
  """The parallel forward over the prompts: (float32 logits [B, V] of each row's next token, the cache)."""
  logits_BPV, cache = model.apply({"params": materialize(params)}, prompts_BP, lengths=lengths_B, method="prefill")
  return logits_BPV[jnp.arange(prompts_BP.shape[0]), lengths_B - 1], cache


# Cached steps and extensions are traced with the portable JAX ops (`seqjax.ops.backend` mode "off"), whatever the
# process's CPU-kernel mode: the C++ kernels (matmul, MLP, LayerNorm; docs/native.md) pay a thread-pool dispatch
# per call that only the row counts of training and prefill repay. For the B rows of a step they cost more than
# they save: the demo model's greedy step at batch 1 took ~2x as long with them (docs/decoding.md). The prefill
# keeps the process's mode.
_STEP_CPU_KERNELS = "off"


def step(model: Any, params: Any, tokens_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
  """One cached step: (float32 logits [B, V] of the next token, the new cache)."""
  with backend.cpu_kernels_mode(_STEP_CPU_KERNELS):
    return model.apply({"params": materialize(params)}, tokens_B, cache, method="step")


def extend(model: Any, params: Any, tokens_BT: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
  """T new tokens per row from the cache (`DecoderLM.extend`): (float32 logits [B, T, V], pending)."""
  with backend.cpu_kernels_mode(_STEP_CPU_KERNELS):
    return model.apply({"params": materialize(params)}, tokens_BT, cache, method="extend")


def select_rows(model: Any, cache: dict, rows: jax.Array) -> dict:
  """The cache of rows `rows` (int [B']) of `cache`, in that order: the batch axis of every leaf gathered.

  The batch is axis 0 of `position` and of each layer's state, axis 1 of the layer states stacked on a leading
  layers axis by `scan_layers`.
  """
  axis = 1 if model.cfg.scan_layers else 0
  return {"position": cache["position"][rows],
          "layers": jax.tree.map(lambda x: jnp.take(x, rows, axis=axis), cache["layers"])}


def check_model(model: Any) -> None:
  """A model the decoders can drive: a `DecoderLM` (prefill / step over a cache)."""
  from seqjax.models.lm import DecoderLM  # pylint: disable=import-outside-toplevel
  if not isinstance(model, DecoderLM):
    raise ValueError(f"generate decodes a seqjax.models.lm.DecoderLM, got {type(model).__name__}")

