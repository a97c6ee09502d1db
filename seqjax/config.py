"""Typed, frozen run configuration, validated once before any compute.

Configs are written as `ml_collections.ConfigDict` in `configs/*.py` (so any field can be overridden from the
command line, `--config.train.num_steps=100`) and converted here into frozen dataclasses. The conversion is the
single place where a run is checked: an unknown field, a wrong type, a value outside its allowed set or an
inconsistent combination raises `ConfigError` naming the field and saying what is allowed, in well under a second
and before JAX compiles anything.

Adding a field: add it to the dataclass below with a default and a comment; add a check to that dataclass's
`_check` if it constrains other fields. Nothing else needs to know.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal, Mapping

import ml_collections


class ConfigError(ValueError):
  """A configuration that cannot run. The message names the field and what is allowed."""


def _fail(field: str, message: str) -> typing.NoReturn:
  raise ConfigError(f"config.{field}: {message}")


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The attention mixer ("attention"): heads, kernel, positions inside attention, window."""

  implementation: str = "blockwise"  # A name in the attention registry (seqjax.ops.attention).
  num_heads: int = 4
  num_kv_heads: int = 0  # 0: as many as num_heads (multi-head); 1: multi-query; else grouped-query.
  head_dim: int = 0  # 0: d_model // num_heads.
  qk_norm: bool = False
  rope_base: float = 10000.0  # model.positions="rope": the rotary base.
  window: int = 0  # > 0: causal sliding window of this many keys (the query's own and window - 1 before); 0: full.

  def _check(self, prefix: str) -> None:
    if self.num_heads <= 0:
      _fail(f"{prefix}.num_heads", f"must be positive, got {self.num_heads}")
    for name in ("num_kv_heads", "head_dim", "window"):
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", f"must be >= 0 (0: the default), got {getattr(self, name)}")
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads % kv:
      _fail(f"{prefix}.num_kv_heads", f"num_heads={self.num_heads} must be a multiple of num_kv_heads={kv}")
    if self.rope_base <= 0:
      _fail(f"{prefix}.rope_base", f"must be positive, got {self.rope_base}")

  def resolved_head_dim(self, d_model: int) -> int:
    return self.head_dim or d_model // self.num_heads

  @property
  def resolved_num_kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """The recurrent mixers ("lstm", "gru", "rnn")."""

  hidden: int = 0  # State width (0: d_model).

  def _check(self, prefix: str) -> None:
    if self.hidden < 0:
      _fail(f"{prefix}.hidden", f"must be >= 0 (0: d_model), got {self.hidden}")


# The modes of each SSM mixer, the first its default (the ops' MODES; not imported: validating a config stays light).
SSM_MODES = {"s4d": ("conv", "chunked", "parallel", "sequential"), "s5": ("parallel", "sequential"),
             "mamba": ("chunked", "parallel", "sequential"), "mamba2": ("chunked", "sequential")}


@dataclasses.dataclass(frozen=True)
class SsmConfig:
  """The state-space mixers ("s4d", "s5", "mamba", "mamba2"); 0 means the block's own default."""

  state: int = 0  # State size per channel (S4D/S5/Mamba) or per head (Mamba-2).
  expand: int = 2  # Mamba / Mamba-2 inner width = expand * d_model.
  conv: int = 4  # Mamba / Mamba-2 causal depthwise convolution width.
  head_dim: int = 32  # Mamba-2 head width.
  chunk: int = 0  # Chunk length of the chunked scan (0: the op's default); S4D's chunked form too.
  # How the sequence is computed ("": each block's default); every SSM mixer of the pattern must know it:
  # s4d "conv" (default; the chunked form where segment ids need resets) | "chunked" | "parallel" | "sequential";
  # s5 "parallel" (default) | "sequential"; mamba "chunked" (default) | "parallel" | "sequential";
  # mamba2 "chunked" (default) | "sequential". All modes compute the same function (python -m seqjax.conformance).
  mode: str = ""

  def _check(self, prefix: str) -> None:
    for name in ("state", "chunk"):
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", f"must be >= 0 (0: the default), got {getattr(self, name)}")
    for name in ("expand", "conv", "head_dim"):
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
  """The linear-attention mixers ("linear", "retnet", "gla", "deltanet", "performer"; docs/linear_attention.md)."""

  num_heads: int = 4
  key_dim: int = 0  # Per-head query / key feature width P (0: d_model // num_heads).
  value_dim: int = 0  # Per-head value width H (0: d_model // num_heads).
  mode: Literal["chunked", "parallel", "recurrent"] = "chunked"  # The training form (all three agree).
  chunk: int = 0  # Chunk length of the chunked form (0: the op's default: 64; 16 for "gla", 32 for "deltanet").
  feature_map: Literal["elu1", "relu", "identity", "taylor"] = "elu1"  # "linear": phi applied to q and k.
  normalize: bool = True  # "linear": divide by phi(q) . sum phi(k) (Katharopoulos); False: per-head RMSNorm instead.
  rotary: bool = True  # "retnet": rotate q and k by their position (RoPE; the rotation of the paper's xPos).
  gate_rank: int = 16  # "gla": rank of the low-rank projection giving the data-dependent decay.
  gate_normalizer: float = 16.0  # "gla": alpha = sigmoid(gate) ** (1 / gate_normalizer) (the paper's tau).
  num_features: int = 64  # "performer": positive random features per head (the state's key width).
  feature_seed: int = 0  # "performer": the draw of the orthogonal random features (redraw: another seed).
  # "rwkv": True: the mixer is the whole RWKV-6 block (time mix + channel mix, its own norms and residuals; the LM's
  # block adds no MLP); False: the time mix alone inside an ordinary block with model.mlp. docs/linear_attention.md.
  rwkv_channel_mix: bool = True
  rwkv_mix_rank: int = 32  # "rwkv": rank of the ddlerp LoRA (the data-dependent token-shift interpolation).
  rwkv_decay_rank: int = 64  # "rwkv": rank of the LoRA giving the data-dependent decay.
  # "performer": > 0: the features are redrawn every this many steps — `model.init` then returns a non-trainable
  # "performer" collection holding each layer's draw, set with seqjax.nn.linear_attention.set_feature_draw.
  redraw_every: int = 0
  based_feature_dim: int = 16  # "based": q, k width per head before the Taylor map (state key width 1 + P + P^2).
  based_window: int = 64  # "based": the sliding-window softmax attention's window (keys incl. the query's own).

  def _check(self, prefix: str) -> None:
    for name in ("num_heads", "gate_rank", "num_features", "rwkv_mix_rank", "rwkv_decay_rank", "based_feature_dim",
                 "based_window"):
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
    for name in ("key_dim", "value_dim", "chunk", "redraw_every"):
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", f"must be >= 0 (0: the default), got {getattr(self, name)}")
    if self.gate_normalizer <= 0:
      _fail(f"{prefix}.gate_normalizer", f"must be positive, got {self.gate_normalizer}")

  def resolved_dims(self, d_model: int) -> tuple[int, int]:
    """(key_dim, value_dim) per head."""
    return self.key_dim or d_model // self.num_heads, self.value_dim or d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts MLPs (`seqjax.nn.moe`, docs/moe.md): num_experts > 0 replaces the MLP of every `every`-th
  block (blocks every-1, 2*every-1, ...; every=1: all) by J = num_experts experts, each token sent to its top_k."""

  num_experts: int = 0  # J; 0: no mixture of experts (plain MLPs).
  top_k: int = 2  # Experts per token (1: Switch, gate = the router probability; > 1: gates renormalised to sum 1).
  # Slots per expert and row = ceil(capacity_factor * T * top_k / J); assignments over it are dropped (the token
  # then passes through the residual). 0: dropless (sorted tokens, grouped matmuls; nothing dropped).
  capacity_factor: float = 1.25
  every: int = 1  # MoE in every `every`-th block (the others keep model.mlp).
  expert_dim: int = 0  # Hidden width F of each expert (0: model.mlp_dim).
  kind: Literal["mlp", "gated"] = "mlp"  # Expert MLP: act(x Wi) Wo, or gated (act(x Wg) * x Wi) Wo (SwiGLU w/ silu).
  load_balance_weight: float = 0.01  # Weight of the Switch load-balancing loss (summed over MoE layers).
  z_loss_weight: float = 0.001  # Weight of the router z-loss (summed over MoE layers).

  def _check(self, prefix: str) -> None:
    if self.num_experts < 0:
      _fail(f"{prefix}.num_experts", f"must be >= 0 (0: no experts), got {self.num_experts}")
    if self.num_experts and not 1 <= self.top_k <= self.num_experts:
      _fail(f"{prefix}.top_k", f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
    for name in ("capacity_factor", "load_balance_weight", "z_loss_weight", "expert_dim"):
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
    if self.every < 1:
      _fail(f"{prefix}.every", f"must be >= 1 (1: every block), got {self.every}")


LINEAR_ATTENTION_MIXERS = ("linear", "retnet", "gla", "deltanet", "performer", "gated_deltanet", "rwkv", "based")


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
  """The efficient softmax-attention mixers ("longformer", "bigbird", "linformer", "reformer";
  docs/sparse_attention.md). Heads, kernel and rope come from `model.attention`."""

  window: int = 64  # longformer / bigbird: each query sees itself and the window - 1 tokens before it.
  num_global: int = 1  # longformer / bigbird: the first num_global tokens of a document are global (0: none).
  random_blocks: int = 2  # bigbird: random key blocks per query block (drawn among earlier blocks, seeded).
  block_size: int = 16  # bigbird: the block size of the random attention.
  seed: int = 0  # bigbird: the draw of the random blocks; reformer: the draw of the hash rotations.
  projected_len: int = 64  # linformer: keys and values are projected along the length to this many rows.
  num_hashes: int = 2  # reformer: rounds of hashing (combined by logsumexp).
  num_buckets: int = 8  # reformer: hash buckets per round (even).
  chunk: int = 32  # reformer: a query sees the `chunk` most recent tokens of its bucket (itself included).

  def _check(self, prefix: str) -> None:
    for name in ("window", "block_size", "projected_len", "num_hashes", "num_buckets", "chunk"):
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
    for name in ("num_global", "random_blocks", "seed"):
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
    if self.num_buckets % 2:
      _fail(f"{prefix}.num_buckets", f"must be even (a bucket is an argmax over [xR, -xR]), got {self.num_buckets}")


SPARSE_ATTENTION_MIXERS = ("longformer", "bigbird", "linformer", "reformer")
BIDIRECTIONAL_MIXERS = ("linformer",)  # no causal form: encoders and classifiers only (refused by task "lm").
# Mixers whose state is a nonlinear step-by-step recurrence: they refuse a sequence-sharded mesh (mesh.seq > 1).
RECURRENT_MIXERS = ("lstm", "gru", "rnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only language model: embeddings, a stack of (mixer, MLP) blocks, an output head.

  Settings of one mixer family live in that family's section (`attention`, `recurrent`, `ssm`).
  """

  # Comma-separated mixer pattern repeated over the layers, e.g. "attention" or "mamba,mamba,attention".
  mixer: str = "attention"
  vocab_size: int = 0  # 0: the tokenizer's vocabulary size (set it only to pad the embedding table).
  d_model: int = 256
  num_layers: int = 4
  mlp_dim: int = 1024
  mlp: Literal["mlp", "gated", "none"] = "mlp"  # "none": mixer-only blocks (e.g. a classic stacked LSTM).
  activation: Literal["gelu", "relu", "silu"] = "gelu"
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  norm_position: Literal["pre", "post"] = "pre"
  positions: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "learned"
  max_len: int = 256  # Longest context (learned position table size, decoding cache length).
  dropout: float = 0.0
  tie_embeddings: bool = True
  scan_layers: bool = False  # nn.scan over layers (one compiled block; needs a homogeneous mixer pattern).
  remat: Literal["none", "full", "dots"] = "none"
  dtype: Literal["float32", "bfloat16"] = "float32"  # Compute dtype; parameters stay float32.
  attention: AttentionConfig = AttentionConfig()
  recurrent: RecurrentConfig = RecurrentConfig()
  ssm: SsmConfig = SsmConfig()
  # With mesh.seq > 1, how attention sees the whole sequence: K/V blocks passed around the ring of "seq" devices
  # ("ring"), or gathered once on every device ("all_gather", simpler for short contexts). See docs/parallelism.md.
  context_parallel: Literal["ring", "all_gather"] = "ring"
  # The order the "seq" devices hold the sequence in (the train step permutes each batch): "zigzag" and "striped"
  # balance causal work over the ring; models with non-attention mixers need "contiguous" (sequence order).
  context_parallel_layout: Literal["contiguous", "striped", "zigzag"] = "contiguous"
  linear: LinearAttentionConfig = LinearAttentionConfig()
  moe: MoeConfig = MoeConfig()  # Mixture-of-experts MLPs (off: num_experts=0).
  sparse: SparseAttentionConfig = SparseAttentionConfig()

  def _check(self, prefix: str) -> None:
    if self.d_model <= 0 or self.num_layers <= 0 or self.mlp_dim <= 0:
      _fail(f"{prefix}", "d_model, num_layers and mlp_dim must be positive")
    if self.vocab_size < 0:
      _fail(f"{prefix}.vocab_size", f"must be >= 0 (0: the tokenizer's), got {self.vocab_size}")
    a = self.attention
    if a.head_dim == 0 and self.d_model % a.num_heads:
      _fail(f"{prefix}.attention.num_heads", f"{a.num_heads} heads do not divide d_model={self.d_model}; choose "
            f"a divisor of d_model or set model.attention.head_dim explicitly")
    if self.positions == "rope" and self.resolved_head_dim % 2:
      _fail(f"{prefix}.positions", f"rope needs an even head_dim, got {self.resolved_head_dim}")
    if not 0.0 <= self.dropout < 1.0:
      _fail(f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}")
    pattern = self.mixer_pattern
    if not pattern or any(not m for m in pattern):
      _fail(f"{prefix}.mixer", f"expected a comma-separated list of mixer names, got {self.mixer!r}")
    if self.scan_layers and len(set(pattern)) > 1:
      _fail(f"{prefix}.scan_layers", f"nn.scan needs one mixer for every layer; pattern {self.mixer!r} mixes "
            f"several. Set scan_layers=False")
    if "mamba2" in pattern and (self.ssm.expand * self.d_model) % self.ssm.head_dim:
      _fail(f"{prefix}.ssm.head_dim", f"must divide the Mamba-2 inner width ssm.expand * d_model = "
            f"{self.ssm.expand * self.d_model}")
    if self.max_len <= 0:
      _fail(f"{prefix}.max_len", "must be positive")
    if self.ssm.mode:
      for mixer in dict.fromkeys(pattern):
        allowed = SSM_MODES.get(mixer)
        if allowed is not None and self.ssm.mode not in allowed:
          _fail(f"{prefix}.ssm.mode", f"{self.ssm.mode!r} is not a mode of the {mixer!r} mixer (its modes: "
                f"{', '.join(allowed)}); leave it empty for each block's default")
    lin = self.linear
    if set(pattern) & set(LINEAR_ATTENTION_MIXERS):
      for name in ("key_dim", "value_dim"):
        if getattr(lin, name) == 0 and self.d_model % lin.num_heads:
          _fail(f"{prefix}.linear.num_heads", f"{lin.num_heads} heads do not divide d_model={self.d_model}; choose "
                f"a divisor of d_model or set model.linear.{name} explicitly")
      if "performer" in pattern and lin.redraw_every and self.scan_layers:
        _fail(f"{prefix}.linear.redraw_every", "the Performer's redraw collection is not scanned over layers; set "
              "scan_layers=False or redraw_every=0")
      if "rwkv" in pattern and lin.rwkv_channel_mix and self.norm_position != "pre":
        _fail(f"{prefix}.norm_position", "rwkv with model.linear.rwkv_channel_mix=True is a whole pre-norm RWKV "
              "block (its own norms and residuals); set norm_position='pre' or model.linear.rwkv_channel_mix=False")
      if "retnet" in pattern and lin.rotary and lin.resolved_dims(self.d_model)[0] % 2:
        _fail(f"{prefix}.linear.key_dim", f"retnet's rotary positions need an even key_dim, got "
              f"{lin.resolved_dims(self.d_model)[0]}; change it or set model.linear.rotary=False")

    self._check_moe(prefix)

  def _check_moe(self, prefix: str) -> None:
    moe = self.moe
    if not moe.num_experts:
      return
    if moe.every > self.num_layers:
      _fail(f"{prefix}.moe.every", f"{moe.every} exceeds num_layers={self.num_layers}, so no block would get "
            f"experts; lower it (1: every block) or set moe.num_experts=0")
    if self.mlp == "none":
      _fail(f"{prefix}.mlp", "is 'none' (no MLP to replace), but moe.num_experts > 0; set model.mlp to 'mlp' or "
            "'gated', or moe.num_experts=0")
    if self.scan_layers and moe.every > 1:
      _fail(f"{prefix}.moe.every", f"nn.scan needs identical blocks, but every={moe.every} mixes MoE and dense "
            f"blocks; set moe.every=1 or scan_layers=False")

  def moe_layer(self, layer: int) -> bool:
    """Whether block `layer` (from 0) has a mixture of experts instead of its MLP."""
    return self.moe.num_experts > 0 and layer % self.moe.every == self.moe.every - 1

  @property
  def resolved_head_dim(self) -> int:
    return self.attention.resolved_head_dim(self.d_model)

  @property
  def resolved_num_kv_heads(self) -> int:
    return self.attention.resolved_num_kv_heads

  @property
  def mixer_pattern(self) -> tuple[str, ...]:
    return tuple(m.strip() for m in self.mixer.split(","))

  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer name of every layer: the pattern repeated to num_layers."""
    pattern = self.mixer_pattern
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str = "python_source"  # "python_source" (built locally) or any TFDS name, e.g. "lm1b".
  data_dir: str = ""  # "" : ~/tensorflow_datasets (or $TFDS_DATA_DIR).
  seq_len: int = 256
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  num_workers: int = 0  # grain worker processes (0: in the main process).
  # --mode=eval only: a comma list of splits (e.g. "validation,test_len512,test_len1024") each evaluated in one run,
  # written to WORKDIR/eval_<split>.json and together to WORKDIR/eval_splits.json ("": data.eval_split alone).
  eval_splits: str = ""

  @property
  def eval_split_list(self) -> tuple[str, ...]:
    """The splits --mode=eval evaluates: data.eval_splits, or data.eval_split alone."""
    return tuple(s.strip() for s in self.eval_splits.split(",")) if self.eval_splits.strip() else (self.eval_split,)

  def _check(self, prefix: str) -> None:
    if self.seq_len <= 1:
      _fail(f"{prefix}.seq_len", f"must be at least 2, got {self.seq_len}")
    splits = self.eval_split_list
    if not all(splits):
      _fail(f"{prefix}.eval_splits", f"{self.eval_splits!r} has an empty name; write split names separated by "
            f"commas, e.g. 'validation,test_len512'")
    if len(set(splits)) < len(splits):
      _fail(f"{prefix}.eval_splits", f"{self.eval_splits!r} names a split twice")
    if self.num_workers < 0:
      _fail(f"{prefix}.num_workers", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  end_lr_fraction: float = 0.1  # Cosine decays to learning_rate * end_lr_fraction at num_steps.
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0  # 0 disables clipping.

  def _check(self, prefix: str) -> None:
    if self.learning_rate <= 0:
      _fail(f"{prefix}.learning_rate", "must be positive")
    if self.warmup_steps < 0:
      _fail(f"{prefix}.warmup_steps", "must be >= 0")
    if not 0 <= self.end_lr_fraction <= 1:
      _fail(f"{prefix}.end_lr_fraction", "must be in [0, 1]")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      _fail(f"{prefix}.b1", "b1 and b2 must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes. -1 on one axis takes all remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  seq: int = 1

  def _check(self, prefix: str) -> None:
    sizes = dataclasses.asdict(self)
    if sum(1 for v in sizes.values() if v == -1) > 1:
      _fail(prefix, f"at most one axis may be -1, got {sizes}")
    for name, v in sizes.items():
      if v == 0 or v < -1:
        _fail(f"{prefix}.{name}", f"must be a positive size or -1, got {v}")

  def axis_names(self) -> tuple[str, ...]:
    return ("data", "fsdp", "tensor", "seq")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 1000
  batch_size: int = 32  # Global batch (rows of data.seq_len tokens) per optimizer step.
  grad_accum_steps: int = 1  # Micro-batches per step; batch_size must be divisible by it.
  eval_every: int = 200
  eval_batches: int = 16  # Validation batches per evaluation (0: the whole split).
  checkpoint_every: int = 200
  checkpoint_every_secs: float = 0.0  # Also save when this many seconds passed since the last save (0: off).
  keep_checkpoints: int = 3
  log_every: int = 20
  async_checkpointing: bool = True
  # Non-finite loss/gradients (the update is always dropped in the step): "stop" writes WORKDIR/nonfinite_report.json
  # and exits; "skip" goes on; "rollback" reloads the last checkpoint before that step and skips its batch.
  on_nan: Literal["stop", "skip", "rollback"] = "stop"
  max_rollbacks: int = 3  # on_nan="rollback": stop with the report after this many rollbacks without a new save.
  allow_config_change: bool = False  # Resume a workdir whose saved config differs from this one (docs/reliability.md).
  # Early stop: "METRIC>=VALUE" or "METRIC<=VALUE" (e.g. "answer_accuracy>=0.99"): after an evaluation that meets
  # it, save and finish (final_metrics.json has stopped_early=1). "": train all num_steps.
  stop_when: str = ""

  def stop_rule(self) -> tuple[str, str, float] | None:
    """(metric, ">=" or "<=", value) of `stop_when`, None when it is empty; ConfigError if it does not parse."""
    if not self.stop_when:
      return None
    for op in (">=", "<="):
      name, found, value = self.stop_when.partition(op)
      if found:
        name = name.strip()
        try:
          number = float(value)
        except ValueError:
          number = math.nan
        if name.isidentifier() and math.isfinite(number):
          return name, op, number
    _fail("train.stop_when", f"must read METRIC>=VALUE or METRIC<=VALUE (e.g. \"answer_accuracy>=0.99\", "
          f"\"loss<=1.5\"), got {self.stop_when!r}")

  def _check(self, prefix: str) -> None:
    self.stop_rule()
    for name in ("num_steps", "batch_size", "grad_accum_steps", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "log_every"):
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
    if self.batch_size % self.grad_accum_steps:
      _fail(f"{prefix}.grad_accum_steps", f"must divide train.batch_size={self.batch_size}, got "
            f"{self.grad_accum_steps}")
    if self.eval_batches < 0:
      _fail(f"{prefix}.eval_batches", "must be >= 0")
    if self.checkpoint_every_secs < 0:
      _fail(f"{prefix}.checkpoint_every_secs", f"must be >= 0 (0: off), got {self.checkpoint_every_secs}")
    if self.max_rollbacks < 1:
      _fail(f"{prefix}.max_rollbacks", f"must be >= 1, got {self.max_rollbacks}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  prompt: str = "def "
  num_tokens: int = 200
  temperature: float = 0.8
  top_k: int = 0  # 0: no top-k filtering.
  num_samples: int = 1
  # The rest of seqjax.decode.generate's options (docs/decoding.md; the filters apply temperature, top-k, top-p,
  # min-p in that order).
  top_p: float = 1.0  # 1: no nucleus filtering.
  min_p: float = 0.0  # 0: no min-p filtering.
  stop_tokens: str = ""  # Comma-separated token ids or "eos" (the tokenizer's), e.g. "eos,13"; "": none.
  num_beams: int = 1  # > 1: beam search (needs temperature=0).
  length_penalty: float = 1.0  # Beam search: log p / ((5 + n) / 6) ** length_penalty.
  quantize: bool = False  # Decode with int8 weight-only quantized parameters (seqjax.decode.quantize).

  def _check(self, prefix: str) -> None:
    if self.temperature < 0:
      _fail(f"{prefix}.temperature", "must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      _fail(f"{prefix}.top_k", "must be >= 0")
    if self.num_tokens <= 0 or self.num_samples <= 0:
      _fail(f"{prefix}.num_tokens", "num_tokens and num_samples must be positive")
    if not 0.0 < self.top_p <= 1.0:
      _fail(f"{prefix}.top_p", f"must be in (0, 1] (1 turns it off), got {self.top_p}")
    if not 0.0 <= self.min_p < 1.0:
      _fail(f"{prefix}.min_p", f"must be in [0, 1) (0 turns it off), got {self.min_p}")
    if self.num_beams < 1:
      _fail(f"{prefix}.num_beams", f"must be >= 1 (1: no beam search), got {self.num_beams}")
    if self.num_beams > 1 and self.temperature != 0:
      _fail(f"{prefix}.num_beams", f"beam search is deterministic: set {prefix}.temperature=0 (got "
                                   f"{self.temperature}) or num_beams=1")
    if not math.isfinite(self.length_penalty):
      _fail(f"{prefix}.length_penalty", f"must be a finite number, got {self.length_penalty}")
    self.stop_token_ids(eos_id=0)

  def stop_token_ids(self, eos_id: int) -> tuple[int, ...]:
    """The ids of `stop_tokens` ("eos" is `eos_id`); ConfigError for an entry that is neither an id nor "eos"."""
    ids = []
    for entry in (e.strip() for e in self.stop_tokens.split(",") if e.strip()):
      if entry.lower() == "eos":
        ids.append(eos_id)
      elif entry.isdigit():
        ids.append(int(entry))
      else:
        _fail("sample.stop_tokens", f"entries are token ids (integers >= 0) or 'eos', comma-separated; got "
                                    f"{entry!r} in {self.stop_tokens!r}")
    return tuple(ids)


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """An encoder-decoder: the LSTM with additive attention (`seqjax.models.seq2seq_lstm.Seq2SeqLSTM(cfg)`) or the
  Transformer (`seqjax.models.seq2seq_transformer.Seq2SeqTransformer(cfg)`), chosen by `arch`; each takes it as is
  (also the section `config.seq2seq`, whose task fields the models do not read). Validated here only."""

  src_vocab: int = 0  # 0: the tokenizer's vocabulary size (set it only to pad the embedding table).
  tgt_vocab: int = 0  # 0: the tokenizer's vocabulary size.
  embed_dim: int = 64
  hidden: int = 128
  encoder_layers: int = 1
  decoder_layers: int = 1
  bidirectional_encoder: bool = True
  attention_dim: int = 128
  dropout: float = 0.0
  # "lstm": the model above (docs/recurrent.md). "transformer": `seqjax.models.seq2seq_transformer` of width
  # `hidden`, `encoder_layers` / `decoder_layers` blocks and the fields below (embed_dim and attention_dim unused;
  # docs/decoding.md).
  arch: Literal["lstm", "transformer"] = "lstm"
  num_heads: int = 4
  mlp_dim: int = 0  # 0: 4 * hidden.
  norm_position: Literal["pre", "post"] = "pre"
  positions: Literal["sinusoidal", "learned"] = "sinusoidal"
  max_len: int = 128  # Longest source and target (tokens incl. BOS): position tables, the decoder's KV cache.
  attention_implementation: str = "blockwise"  # A name in seqjax.ops.attention's registry.

  def _check(self, prefix: str) -> None:
    for name in ("embed_dim", "hidden", "encoder_layers", "decoder_layers", "attention_dim", "num_heads",
                 "max_len"):
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
    if self.mlp_dim < 0:
      _fail(f"{prefix}.mlp_dim", f"must be >= 0 (0: 4 * hidden), got {self.mlp_dim}")
    if self.arch == "transformer" and self.hidden % self.num_heads:
      _fail(f"{prefix}.num_heads", f"{self.num_heads} must divide hidden={self.hidden} (the model width)")
    for name in ("src_vocab", "tgt_vocab"):
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", f"must be >= 0 (0: the tokenizer's), got {getattr(self, name)}")
    if not 0.0 <= self.dropout < 1.0:
      _fail(f"{prefix}.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class Seq2SeqTaskConfig(Seq2SeqConfig):
  """The seq2seq task (config.task="seq2seq"): the model's fields (`Seq2SeqConfig`), then how it is trained —
  scheduled sampling, length curriculum — and evaluated.

  Its data come from config.data (name "numbers_to_words/<builder config>", data_dir, splits); the optimizer,
  batch size, steps, mesh and checkpoints from the shared sections. See docs/recurrent.md.
  """

  max_digits: int = 0  # Keep only numbers of at most this many digits (0: all the dataset has).
  # Scheduled sampling: the probability of feeding the gold previous token, a function of the step
  # (seqjax.train.schedules). Each schedule reads only its own parameters below.
  teacher_forcing: Literal["constant", "linear", "exponential", "inverse_sigmoid"] = "inverse_sigmoid"
  teacher_forcing_prob: float = 1.0  # "constant": p.
  teacher_forcing_decay_steps: int = 1000  # "linear": steps from p=1 to the floor.
  teacher_forcing_base: float = 0.999  # "exponential": p = base ** step, 0 < base < 1.
  teacher_forcing_k: float = 300.0  # "inverse_sigmoid": p = k / (k + exp(step / k)), k >= 1.
  teacher_forcing_floor: float = 0.0  # Decaying schedules never go below this.
  # Length curriculum: the longest target (tokens incl. EOS) drawn at a step grows from start to end linearly
  # over warmup steps, in increments of `every` (each new length compiles the step once).
  curriculum_start: int = 16
  curriculum_end: int = 0  # 0: the longest training target.
  curriculum_warmup_steps: int = 0  # 0: no curriculum (end from the first step).
  curriculum_every: int = 8
  decode_max_len: int = 0  # Greedy decoding stops after this many tokens (0: the longest training target).
  log_examples: int = 3  # Validation translations printed (and written to examples.jsonl) per evaluation.
  num_beams: int = 1  # Evaluation and generation: 1 greedy, > 1 beam search (seqjax.decode.seq2seq).
  length_penalty: float = 0.6  # Beam search: hypotheses ranked by log p / ((5 + n) / 6) ** length_penalty.

  def _check(self, prefix: str) -> None:
    super()._check(prefix)
    for name in ("curriculum_start", "curriculum_every"):
      if getattr(self, name) <= 0:
        _fail(f"{prefix}.{name}", f"must be positive, got {getattr(self, name)}")
    for name in ("max_digits", "curriculum_end", "curriculum_warmup_steps", "decode_max_len", "log_examples"):
      if getattr(self, name) < 0:
        _fail(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
    if self.curriculum_end and self.curriculum_end < self.curriculum_start:
      _fail(f"{prefix}.curriculum_end", f"{self.curriculum_end} is below curriculum_start="
            f"{self.curriculum_start}; raise it, or set 0 for the longest training target")
    for name in ("teacher_forcing_prob", "teacher_forcing_floor"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        _fail(f"{prefix}.{name}", f"a probability in [0, 1], got {getattr(self, name)}")
    if self.teacher_forcing == "linear" and self.teacher_forcing_decay_steps <= 0:
      _fail(f"{prefix}.teacher_forcing_decay_steps", f"must be positive, got {self.teacher_forcing_decay_steps}")
    if self.teacher_forcing == "exponential" and not 0.0 < self.teacher_forcing_base < 1.0:
      _fail(f"{prefix}.teacher_forcing_base", f"must be in (0, 1) (e.g. 0.999), got {self.teacher_forcing_base}")
    if self.teacher_forcing == "inverse_sigmoid" and self.teacher_forcing_k < 1.0:
      _fail(f"{prefix}.teacher_forcing_k", f"must be >= 1 (e.g. 300), got {self.teacher_forcing_k}")
    if self.arch == "transformer" and (self.teacher_forcing != "constant" or self.teacher_forcing_prob != 1.0):
      _fail(f"{prefix}.teacher_forcing", "the transformer's decoder trains in parallel under teacher forcing "
            "(scheduled sampling is the LSTM's): set teacher_forcing='constant' and teacher_forcing_prob=1.0")
    if self.num_beams < 1:
      _fail(f"{prefix}.num_beams", f"must be >= 1 (1: greedy), got {self.num_beams}")
    if not math.isfinite(self.length_penalty):
      _fail(f"{prefix}.length_penalty", f"must be a finite number, got {self.length_penalty}")

  def teacher_forcing_kwargs(self) -> dict[str, float]:
    """The arguments of `seqjax.train.schedules.make_teacher_forcing_schedule(self.teacher_forcing, ...)`."""
    floor = {"floor": self.teacher_forcing_floor}
    return {"constant": {"p": self.teacher_forcing_prob},
            "linear": {"decay_steps": self.teacher_forcing_decay_steps, **floor},
            "exponential": {"k": self.teacher_forcing_base, **floor},
            "inverse_sigmoid": {"k": self.teacher_forcing_k, **floor}}[self.teacher_forcing]


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
  """The sequence-classification task (config.task="classify"): the model.* mixer stack, then a read-out of its
  final hidden states into one class per example (`seqjax.models.classifier`)."""

  # "mean": the average over the example's tokens (padding excluded); "last": its last token (what a causal or
  # recurrent stack has seen all of); "first": its first token (sees only itself in a causal stack).
  pooling: Literal["mean", "last", "first"] = "mean"

  def _check(self, prefix: str) -> None:
    del prefix  # The Literal is checked on conversion; the dataset is checked with the whole config.


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0
  # What is trained: a task of seqjax.train.tasks (the LM, or the LSTM encoder-decoder of `seq2seq`, for which
  # model.* is unused, or `classify`: model.* with a pooled read-out, on a synthetic classification dataset).
  # Adding one: the Task docstring in seqjax/train/task.py.
  task: Literal["lm", "seq2seq", "classify"] = "lm"
  # Native C++ CPU kernels: "auto" = where built and applicable; "off" = portable JAX everywhere; "on" = a kernel
  # that fails to build is an error. Applied by seqjax.main before anything is built (seqjax.ops.backend); configs
  # built from default_config_dict() take $SEQJAX_CPU_KERNELS as the default when it is set.
  cpu_kernels: Literal["auto", "on", "off"] = "auto"
  # Comma-separated Python modules imported before the model is built, e.g. "examples.sigmoid_attention": modules
  # that register a mixer or an attention kernel of your own (docs/new_mixer.md).
  imports: str = ""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  sample: SampleConfig = SampleConfig()
  seq2seq: Seq2SeqTaskConfig = Seq2SeqTaskConfig()
  classify: ClassifyConfig = ClassifyConfig()

  @property
  def import_modules(self) -> tuple[str, ...]:
    return tuple(m.strip() for m in self.imports.split(",") if m.strip())

  def _check(self, prefix: str) -> None:
    del prefix
    if self.task == "seq2seq":  # The LM cross-checks below concern model.* and data.seq_len, unused here.
      if self.data.name.split("/")[0] != "numbers_to_words":
        _fail("data.name", f"task 'seq2seq' trains on 'numbers_to_words[/standard|/small]', got "
              f"{self.data.name!r}")
      if self.mesh.seq > 1:
        _fail("mesh.seq", f"the seq2seq task does not split sequences over devices; set mesh.seq=1 (got "
              f"{self.mesh.seq}) and use the data axis")
      return
    if self.data.seq_len > self.model.max_len:
      _fail("data.seq_len", f"{self.data.seq_len} exceeds model.max_len={self.model.max_len}; raise "
            f"model.max_len or shorten data.seq_len")
    if self.sample.num_tokens > self.model.max_len:
      _fail("sample.num_tokens", f"{self.sample.num_tokens} exceeds model.max_len={self.model.max_len}")
    layout = self.model.context_parallel_layout
    if layout != "contiguous" and set(self.model.mixer_pattern) != {"attention"}:
      _fail("model.context_parallel_layout", f"{layout!r} deals the sequence out of order, which only attention "
            f"layers can take; the pattern {self.model.mixer!r} has other mixers: use 'contiguous'")
    if self.mesh.seq > 1 and self.data.seq_len % (self.mesh.seq * (2 if layout == "zigzag" else 1)):
      _fail("data.seq_len", f"{self.data.seq_len} must split evenly over mesh.seq={self.mesh.seq} devices"
            f"{' in two chunks each (zigzag)' if layout == 'zigzag' else ''}")
    if self.mesh.seq > 1 and self.model.positions == "alibi" and "attention" in self.model.mixer_pattern:
      _fail("model.positions", "alibi is not supported with a sequence-sharded mesh (mesh.seq > 1); use rope, "
            "learned or sinusoidal positions")
    bidirectional = [m for m in self.model.mixer_pattern if m in BIDIRECTIONAL_MIXERS]
    if self.task == "lm" and bidirectional:
      _fail("model.mixer", f"{bidirectional[0]!r} is bidirectional (every token sees the whole sequence): it cannot "
            f"train a causal language model. Use it with task='classify', or a causal mixer (e.g. 'longformer', "
            f"'bigbird', 'reformer') for the LM")
    recurrent = [m for m in dict.fromkeys(self.model.mixer_pattern) if m in RECURRENT_MIXERS]
    if self.mesh.seq > 1 and recurrent:
      _fail("mesh.seq", f"the recurrent mixer(s) {', '.join(recurrent)} in model.mixer={self.model.mixer!r} carry a "
            f"nonlinear state step by step, so a sequence cannot be split over devices; set mesh.seq=1 (got "
            f"{self.mesh.seq}) and use the data or fsdp axis, or use attention / SSM / linear mixers")
    self._check_synthetic()

  def _check_synthetic(self) -> None:
    """A synthetic dataset's name, its kind against the task, and data.seq_len against its training examples."""
    from seqjax.data import synthetic  # pylint: disable=import-outside-toplevel  (NumPy only)
    if not synthetic.is_synthetic(self.data.name):
      if self.task == "classify":
        _fail("data.name", f"task 'classify' trains on a classification dataset of seqjax.data.synthetic, e.g. "
              f"'listops/len100_500'; got {self.data.name!r}")
      return
    try:
      module, _, setting = synthetic.resolve(self.data.name)
    except ValueError as e:
      _fail("data.name", str(e))
    if module.KIND != self.task:
      _fail("task", f"{self.data.name!r} is a {module.KIND!r} dataset; set task={module.KIND!r}")
    lengths = module.split_lengths(setting)
    for split in ("train_split", "eval_split"):
      if getattr(self.data, split) not in lengths:
        _fail(f"data.{split}", f"{self.data.name!r} has no split {getattr(self.data, split)!r}; splits: "
              f"{', '.join(lengths)}")
    unknown = [s for s in self.data.eval_split_list if s not in lengths]
    if self.data.eval_splits and unknown:
      _fail("data.eval_splits", f"{self.data.name!r} has no split {', '.join(map(repr, unknown))}; splits: "
            f"{', '.join(lengths)}")
    if self.data.seq_len < lengths[self.data.train_split]:
      _fail("data.seq_len", f"{self.data.seq_len} is shorter than the {self.data.train_split!r} examples of "
            f"{self.data.name!r} ({lengths[self.data.train_split]} tokens); set data.seq_len="
            f"{lengths[self.data.train_split]}")


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
  if typing.get_origin(tp) is Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
  return getattr(tp, "__name__", str(tp))


def _coerce(field: str, value: Any, tp: Any) -> Any:
  """Checks `value` against the annotation `tp`; ints are accepted where floats are expected."""
  origin = typing.get_origin(tp)
  if origin is Literal:
    allowed = typing.get_args(tp)
    if value not in allowed:
      _fail(field, f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    return value
  if origin in (typing.Union, types.UnionType):
    for option in typing.get_args(tp):
      try:
        return _coerce(field, value, option)
      except ConfigError:
        pass
    _fail(field, f"got {value!r} of type {type(value).__name__}; expected {tp}")
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is type(None):
    if value is None:
      return None
    _fail(field, f"expected None, got {value!r}")
  if isinstance(tp, type) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
    _fail(field, f"got {value!r} of type {type(value).__name__}; expected {_type_name(tp)}")
  return value


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    path = f"{prefix}.{key}" if prefix else key
    if key not in fields:
      close = difflib.get_close_matches(key, fields, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      _fail(path, f"unknown field.{hint} Fields of config{'.' + prefix if prefix else ''}: "
            f"{', '.join(sorted(fields))}")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
      if not isinstance(value, Mapping):
        _fail(path, f"expected a section (ConfigDict), got {value!r}")
      kwargs[key] = _build(tp, value, path)
    else:
      kwargs[key] = _coerce(path, value, tp)
  instance = cls(**kwargs)
  instance._check(prefix)  # pylint: disable=protected-access
  return instance


def _to_plain(tree: Any) -> Any:
  if isinstance(tree, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    tree = tree.to_dict()
  if isinstance(tree, Mapping):
    return {k: _to_plain(v) for k, v in tree.items()}
  return tree


def from_config_dict(cfg: Any) -> Config:
  """Validates an `ml_collections.ConfigDict` (or a plain nested dict) into a frozen `Config`."""
  return _build(Config, _to_plain(cfg), "")


def with_vocab_size(config: Config, tokenizer_vocab_size: int) -> Config:
  """`config` with model.vocab_size taken from the tokenizer when it is 0 (the default).

  A vocab_size set by hand may pad the embedding table (e.g. to a multiple of 128) but never be smaller than the
  tokenizer's vocabulary; that raises ConfigError naming the field.
  """
  set_size = config.model.vocab_size
  if set_size == 0:
    return dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=tokenizer_vocab_size))
  if set_size < tokenizer_vocab_size:
    _fail("model.vocab_size", f"{set_size} is smaller than the tokenizer's vocabulary of {tokenizer_vocab_size} "
          f"tokens; leave it at 0 to use the tokenizer's size")
  return config


def with_seq2seq_vocab_sizes(config: Config, src_vocab_size: int, tgt_vocab_size: int) -> Config:
  """`config` with seq2seq.src_vocab / tgt_vocab taken from the source and target tokenizers where they are 0.

  As for model.vocab_size, a size set by hand may pad the table but never be smaller than the tokenizer's
  vocabulary (ConfigError naming the field).
  """
  sizes = {}
  for name, tokenizer_size in (("src_vocab", src_vocab_size), ("tgt_vocab", tgt_vocab_size)):
    set_size = getattr(config.seq2seq, name)
    if set_size and set_size < tokenizer_size:
      _fail(f"seq2seq.{name}", f"{set_size} is smaller than the tokenizer's vocabulary of {tokenizer_size} "
            f"tokens; leave it at 0 to use the tokenizer's size")
    sizes[name] = set_size or tokenizer_size
  return dataclasses.replace(config, seq2seq=dataclasses.replace(config.seq2seq, **sizes))


def override(section: Any, overrides: Mapping[str, Any], prefix: str = "model") -> Any:
  """A copy of the frozen config `section` (any dataclass of this module) with nested `overrides` applied, e.g.
  `override(model_cfg, {"attention": {"implementation": "reference"}, "dtype": "bfloat16"})`, then checked.

  Raises ConfigError for a field the section does not have, as the command line would; `prefix` is the section's
  place in the run config, for the messages."""
  changes = {}
  names = {f.name for f in dataclasses.fields(section)}
  for key, value in overrides.items():
    if key not in names:
      _fail(f"{prefix}.{key}", f"unknown field; fields of config.{prefix}: {', '.join(sorted(names))}")
    current = getattr(section, key)
    changes[key] = (override(current, value, f"{prefix}.{key}") if dataclasses.is_dataclass(current) else
                    _coerce(f"{prefix}.{key}", value, typing.get_type_hints(type(section))[key]))
  result = dataclasses.replace(section, **changes)
  result._check(prefix)  # pylint: disable=protected-access
  return result


def to_dict(config: Config) -> dict[str, Any]:
  """A JSON-serialisable dict of a validated config (written into the workdir of every run)."""
  return dataclasses.asdict(config)


CPU_KERNELS_ENV = "SEQJAX_CPU_KERNELS"  # = seqjax.ops.backend.ENV (not imported: validating a config stays light).


def default_config_dict() -> ml_collections.ConfigDict:
  """All fields at their defaults, as a ConfigDict that `configs/*.py` start from and override.

  `cpu_kernels` defaults to $SEQJAX_CPU_KERNELS when it is set (the switch's environment variable), else "auto".
  """
  values = to_dict(Config())
  env = os.environ.get(CPU_KERNELS_ENV)
  if env is not None:
    allowed = typing.get_args(typing.get_type_hints(Config)["cpu_kernels"])
    if env not in allowed:
      _fail("cpu_kernels", f"its default ${CPU_KERNELS_ENV}={env!r} is not one of {', '.join(allowed)}")
    values["cpu_kernels"] = env
  return ml_collections.ConfigDict(values)
