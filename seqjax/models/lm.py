"""A decoder-only language model over any stack of registered mixers, with cached decoding.

    tokens[B, T] -> embed (+ learned / sinusoidal positions) -> num_layers x Block -> norm -> logits[B, T, V]

Each Block is `x + mixer(norm(x))`, `x + mlp(norm(x))` (pre-norm) or `norm(x + mixer(x))`, `norm(x + mlp(x))`
(post-norm); with `config.model.moe` the MLP of every k-th block is a mixture of experts (`seqjax.nn.moe`, whose
auxiliary losses are sown into the collection "moe": apply with mutable=["moe"] to collect them). With `scan_layers` the blocks are one `nn.scan` (one compiled body, parameters stacked on a leading
"layers" axis); with `remat` each block's activations are recomputed in the backward pass.

Decoding (every method through `model.apply(variables, ..., method=...)`, each jittable with the cache as an
ordinary argument):

    logits_BTV = model.apply(v, tokens_BT, segment_ids=..., positions=...)             # training / scoring
    logits_BTV, cache = model.apply(v, tokens_BT, lengths=lengths_B, method="prefill")  # ragged prompts
    logits_BV, cache = model.apply(v, tokens_B, cache, method="step")                   # one token per row
    cache = model.init_cache(batch_size, max_len=None)                                 # before any token

`prefill` runs the parallel forward over right-padded prompts (row b's prompt is tokens[b, :lengths[b]]; lengths
None: all T) and returns each row's cache after its last prompt token; the logits of row b's next token are
`logits_BTV[b, lengths[b] - 1]`. `step` feeds one token per row and returns the logits of the next one: prefill
of T tokens then k steps gives the parallel forward's logits over T + k (tests/nn/test_mixer_contract.py).

The cache is a plain dict `{"position": int32 [B], "layers": ...}`: `position` is each row's next position (the
learned / sinusoidal embeddings read it), `layers` one mixer state per layer (`seqjax.nn.contract`), a tuple over
the layers, or with `scan_layers` one state whose leaves are stacked on a leading layers axis [num_layers, B, ...].
Attention caches hold `model.max_len` tokens (`attention.window` with a sliding window); `init_cache` needs no
parameters and may size them differently with `max_len`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.config import ModelConfig
from seqjax.nn import contract, layers
from seqjax.nn import extend as extend_lib
from seqjax.nn.attention import WEIGHTS_COLLECTION
from seqjax.nn.mixers import compute_dtype, make_mixer
from seqjax.nn.moe import MoeMlp
from seqjax.ops.dense.dot import flat_dot_general

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_MODES = ("parallel", "prefill", "step", "extend")


class Block(nn.Module):
  """One (mixer, MLP) block. `mode`: "parallel" (x -> x), "prefill" (x -> (x, state)), "step" (x [B, 1, D] and
  the mixer's state -> (x, state)) or "extend" (x [B, T, D] and the state -> (x, pending); `seqjax.nn.extend`)."""

  cfg: ModelConfig
  mixer: str
  deterministic: bool = True
  mode: str = "parallel"
  moe: bool = False  # A mixture of experts (`seqjax.nn.moe.MoeMlp`, config.model.moe) instead of the MLP.

  @nn.compact
  def __call__(self, x_BTD: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               state: contract.State = None):
    cfg = self.cfg
    dtype = compute_dtype(cfg)
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)  # noqa: E731
    mixer = make_mixer(self.mixer, cfg)
    mlp = None if cfg.mlp == "none" else layers.Mlp(cfg.mlp_dim, kind=cfg.mlp, activation=cfg.activation, dropout=cfg.dropout, dtype=dtype,
                     name="mlp")
    if self.moe:
      mlp = _moe_mlp(cfg, dtype, segment_ids)
    norm1 = layers.make_norm(cfg.norm, dtype, "norm_mixer")
    norm2 = None if mlp is None else layers.make_norm(cfg.norm, dtype, "norm_mlp")
    new_state = None

    def mix(y_BTD):
      nonlocal new_state
      if self.mode == "parallel":
        return mixer(y_BTD, segment_ids=segment_ids, positions=positions, deterministic=self.deterministic)
      if self.mode == "prefill":
        y_BTD, new_state = mixer(y_BTD, segment_ids=segment_ids, positions=positions,
                                 deterministic=self.deterministic, return_state=True)
        return y_BTD
      if self.mode == "extend":
        y_BTD, new_state = extend_lib.extend(mixer, y_BTD, state, deterministic=self.deterministic)
        return y_BTD
      y_BD, new_state = mixer.step(y_BTD[:, 0], state, deterministic=self.deterministic)
      return y_BD[:, None]

    if getattr(mixer, "owns_block", False):  # a whole block (e.g. RWKV's): its own norms, residuals and MLP
      x_BTD = mix(x_BTD)
      return x_BTD if self.mode == "parallel" else (x_BTD, new_state)

    if cfg.norm_position == "pre":
      x_BTD = x_BTD + drop(mix(norm1(x_BTD)))
      if mlp is not None:
        x_BTD = x_BTD + drop(mlp(norm2(x_BTD), deterministic=self.deterministic))
    else:
      x_BTD = norm1(x_BTD + drop(mix(x_BTD)))
      if mlp is not None:
        x_BTD = norm2(x_BTD + drop(mlp(x_BTD, deterministic=self.deterministic)))
    return x_BTD if self.mode == "parallel" else (x_BTD, new_state)


def _moe_mlp(cfg: ModelConfig, dtype, segment_ids):
  """The block's mixture of experts, called like `layers.Mlp` (padding, segment id 0, takes no expert slot)."""
  m = cfg.moe
  moe = MoeMlp(m.num_experts, m.top_k, m.expert_dim or cfg.mlp_dim, kind=m.kind, activation=cfg.activation,
               capacity_factor=m.capacity_factor, dtype=dtype, name="moe")
  valid_BT = None if segment_ids is None else segment_ids > 0
  return lambda x_BTD, deterministic: moe(x_BTD, valid_BT=valid_BT)  # noqa: ARG005


class _ScannedBlock(Block):
  """`Block` with the (carry, xs...) -> (carry, ys) signature `nn.scan` wants: parallel and prefill broadcast
  (segment_ids, positions) and emit nothing / the state; step scans over the stacked states."""

  def __call__(self, x_BTD, *args):  # pylint: disable=arguments-differ
    if self.mode in ("step", "extend"):
      return super().__call__(x_BTD, state=args[0])
    out = super().__call__(x_BTD, *args)
    return (out, None) if self.mode == "parallel" else out


class DecoderLM(nn.Module):
  """Decoder-only LM. `__call__` returns float32 logits [B, T, V]; `prefill` / `step` / `init_cache` decode (see the
  module docstring)."""

  cfg: ModelConfig

  def __call__(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True,
               read_positions: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V]; with `read_positions` (int [B, K]), only those of row b's positions read_positions[b]:
    [B, K, V], the final norm and the head applied to K positions instead of T (the synthetic tasks score a few
    answer positions per row, and with a large vocabulary the head is most of a step's cost)."""
    return self._forward(tokens_BT, segment_ids, positions, None, deterministic=deterministic, mode="parallel",
                         read_positions=read_positions)

  def features(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """The final hidden states [B, T, D] (after the final norm; the compute dtype), before the LM read-out: what
    another head reads (`seqjax.models.classifier`). The same parameters as `__call__` (an untied head is not
    created)."""
    return self._forward(tokens_BT, segment_ids, positions, None, deterministic=deterministic, mode="parallel",
                         features_only=True)

  def prefill(self, tokens_BT: jax.Array, *, lengths: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Right-padded prompts tokens [B, T] (row b's are the first lengths[b]; None: all T) -> (float32 logits
    [B, T, V], the cache after each row's last prompt token)."""
    batch, length = tokens_BT.shape
    if lengths is None:
      segment_ids, lengths = None, jnp.full((batch,), length, jnp.int32)
    else:
      lengths = jnp.asarray(lengths, jnp.int32)
      segment_ids = (jnp.arange(length, dtype=jnp.int32)[None] < lengths[:, None]).astype(jnp.int32)
    logits_BTV, states = self._forward(tokens_BT, segment_ids, None, None, deterministic=True, mode="prefill")
    return logits_BTV, {"position": lengths, "layers": states}

  def step(self, tokens_B: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """One token per row [B] and the cache -> (float32 logits [B, V] of the next token, the new cache)."""
    position_B = cache["position"]
    logits_B1V, states = self._forward(tokens_B[:, None], None, position_B[:, None], cache["layers"],
                                       deterministic=True, mode="step")
    return logits_B1V[:, 0], {"position": position_B + 1, "layers": states}

  def extend(self, tokens_BT: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """T new tokens per row [B, T] from the cache -> (float32 logits [B, T, V], pending): the logits T `step`s
    give, in one pass for attention layers (`seqjax.nn.extend`); the cache is not changed. `commit(cache,
    pending, count_B)` is the cache after each row's first count[b] of the T tokens."""
    position_B = cache["position"]
    positions_BT = position_B[:, None] + jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None]
    logits_BTV, pending = self._forward(tokens_BT, None, positions_BT, cache["layers"], deterministic=True,
                                        mode="extend")
    return logits_BTV, {"position": position_B, "layers": pending}

  @nn.nowrap
  def commit(self, cache: dict, pending: dict, count_B: jax.Array) -> dict:
    """The cache after the first count[b] (1 <= count[b] <= T) tokens of `extend`'s T for each row b."""
    count_B = jnp.asarray(count_B, jnp.int32)
    if self.cfg.scan_layers:  # states and pending stacked on a leading layers axis
      layers_state = jax.vmap(extend_lib.commit, in_axes=(0, 0, None))(cache["layers"], pending["layers"], count_B)
    else:
      layers_state = tuple(extend_lib.commit(s, p, count_B) for s, p in zip(cache["layers"], pending["layers"]))
    return {"position": cache["position"] + count_B, "layers": layers_state}

  @nn.nowrap
  def init_cache(self, batch_size: int, max_len: int | None = None) -> dict:
    """The cache before any token: zero states, attention caches of `max_len` (default model.max_len) slots.
    Needs no parameters: `model.init_cache(batch_size)` works on the unbound model."""
    cfg = self.cfg
    max_len = max_len or cfg.max_len
    states = tuple(make_mixer(name, cfg).init_state(batch_size, max_len, compute_dtype(cfg))
                   for name in cfg.layer_mixers())
    if cfg.scan_layers:
      states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    return {"position": jnp.zeros((batch_size,), jnp.int32), "layers": states}

  @nn.compact
  def _forward(self, tokens_BT, segment_ids, positions, states, *, deterministic, mode, features_only=False,
               read_positions=None):
    """The stack in one of the Block modes; returns logits, or (logits, layer states) unless mode is parallel
    (`features_only`: the final hidden states instead of the logits; `read_positions` [B, K]: the logits of those
    positions only, parallel mode)."""
    cfg = self.cfg
    if mode not in _MODES:
      raise ValueError(f"DecoderLM: mode must be one of {_MODES}, got {mode!r}")
    if cfg.vocab_size <= 0:
      raise ValueError("DecoderLM: model.vocab_size is 0 (\"the tokenizer's\"); resolve it first with "
                       "seqjax.config.with_vocab_size(config, tokenizer.vocab_size)")
    dtype = compute_dtype(cfg)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
    embed = layers.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, name="embed")
    x_BTD = embed(tokens_BT)
    if cfg.positions == "learned":
      x_BTD = x_BTD + layers.LearnedPositions(cfg.max_len, cfg.d_model, name="pos_embed")(positions).astype(dtype)
    elif cfg.positions == "sinusoidal":
      x_BTD = x_BTD + layers.sinusoidal_positions(positions, cfg.d_model).astype(dtype)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)

    block_cls = _ScannedBlock if cfg.scan_layers else Block
    if cfg.remat != "none" and mode == "parallel":
      block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      in_axes = (0,) if mode in ("step", "extend") else (nn.broadcast, nn.broadcast)
      stack = nn.scan(block_cls, variable_axes={"params": 0, "moe": 0, WEIGHTS_COLLECTION: 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=in_axes, length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      block = stack(cfg, cfg.layer_mixers()[0], deterministic, mode, cfg.moe_layer(0), name="layers")
      x_BTD, states = (block(x_BTD, states) if mode in ("step", "extend")
                       else block(x_BTD, segment_ids, positions))
    else:
      new_states = []
      for i, mixer in enumerate(cfg.layer_mixers()):
        block = block_cls(cfg, mixer, deterministic, mode, cfg.moe_layer(i), name=f"layer_{i}")
        if mode == "parallel":
          x_BTD = block(x_BTD, segment_ids, positions)
        elif mode == "prefill":
          x_BTD, state = block(x_BTD, segment_ids, positions)
          new_states.append(state)
        else:  # step, extend
          x_BTD, state = block(x_BTD, state=states[i])
          new_states.append(state)
      states = tuple(new_states)

    if read_positions is not None:
      if mode != "parallel" or read_positions.ndim != 2 or read_positions.shape[0] != x_BTD.shape[0]:
        raise ValueError(f"DecoderLM: read_positions must be [B, K] = [{x_BTD.shape[0]}, K] integer positions in "
                         f"the parallel forward, got shape {read_positions.shape} in mode {mode!r}")
      x_BTD = jnp.take_along_axis(x_BTD, read_positions[:, :, None].astype(jnp.int32), axis=1)
    x_BTD = layers.make_norm(cfg.norm, dtype, "final_norm")(x_BTD) if cfg.norm_position == "pre" else x_BTD
    if features_only:
      return x_BTD
    if cfg.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      logits_BTV = nn.DenseGeneral(cfg.vocab_size, use_bias=False, dtype=dtype, name="head",
                                   dot_general=flat_dot_general,
                                   kernel_init=nn.with_logical_partitioning(layers.dense_init(),
                                                                            ("embed", "vocab")))(x_BTD)
    logits_BTV = logits_BTV.astype(jnp.float32)
    return logits_BTV if mode == "parallel" else (logits_BTV, states)
