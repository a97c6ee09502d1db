"""A decoder-only language model over any stack of registered mixers.

    tokens[B, T] -> embed (+ learned / sinusoidal positions) -> num_layers x Block -> norm -> logits[B, T, V]

Each Block is `x + mixer(norm(x))`, `x + mlp(norm(x))` (pre-norm) or `norm(x + mixer(x))`, `norm(x + mlp(x))`
(post-norm). With `scan_layers` the blocks are one `nn.scan` (one compiled body, parameters stacked on a leading
"layers" axis); with `remat` each block's activations are recomputed in the backward pass.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.config import ModelConfig
from seqjax.nn import layers
from seqjax.nn.mixers import compute_dtype, make_mixer
from seqjax.ops.dense.dot import flat_dot_general

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  cfg: ModelConfig
  mixer: str
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: jax.Array, segment_ids: jax.Array | None, positions: jax.Array | None):
    cfg = self.cfg
    dtype = compute_dtype(cfg)
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)  # noqa: E731
    mixer = make_mixer(self.mixer, cfg)
    mlp = None if cfg.mlp == "none" else layers.Mlp(cfg.mlp_dim, kind=cfg.mlp, activation=cfg.activation, dropout=cfg.dropout, dtype=dtype,
                     name="mlp")
    norm1 = layers.make_norm(cfg.norm, dtype, "norm_mixer")
    norm2 = None if mlp is None else layers.make_norm(cfg.norm, dtype, "norm_mlp")
    mix = lambda y: mixer(y, segment_ids=segment_ids, positions=positions,  # noqa: E731
                          deterministic=self.deterministic)
    if cfg.norm_position == "pre":
      x_BTD = x_BTD + drop(mix(norm1(x_BTD)))
      if mlp is not None:
        x_BTD = x_BTD + drop(mlp(norm2(x_BTD), deterministic=self.deterministic))
    else:
      x_BTD = norm1(x_BTD + drop(mix(x_BTD)))
      if mlp is not None:
        x_BTD = norm2(x_BTD + drop(mlp(x_BTD, deterministic=self.deterministic)))
    return x_BTD


class _ScannedBlock(Block):
  """`Block` with the (carry, broadcast...) -> (carry, None) signature `nn.scan` wants."""

  def __call__(self, x_BTD, segment_ids, positions):  # pylint: disable=arguments-differ
    return super().__call__(x_BTD, segment_ids, positions), None


class DecoderLM(nn.Module):
  """Decoder-only LM. `__call__` returns float32 logits [B, T, V]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
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
    if cfg.remat != "none":
      block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, _ = stack(cfg, cfg.layer_mixers()[0], deterministic, name="layers")(x_BTD, segment_ids, positions)
    else:
      for i, mixer in enumerate(cfg.layer_mixers()):
        x_BTD = block_cls(cfg, mixer, deterministic, name=f"layer_{i}")(x_BTD, segment_ids, positions)

    x_BTD = layers.make_norm(cfg.norm, dtype, "final_norm")(x_BTD) if cfg.norm_position == "pre" else x_BTD
    if cfg.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      logits_BTV = nn.DenseGeneral(cfg.vocab_size, use_bias=False, dtype=dtype, name="head",
                                   dot_general=flat_dot_general,
                                   kernel_init=nn.with_logical_partitioning(layers.dense_init(),
                                                                            ("embed", "vocab")))(x_BTD)
    return logits_BTV.astype(jnp.float32)
