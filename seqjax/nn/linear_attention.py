"""Linear-attention mixers (linen), thin wrappers over `seqjax.ops.linear`: "linear", "retnet", "gla", "deltanet".

Each implements the mixer contract of `seqjax.nn.contract` (see docs/linear_attention.md for the math):

    y_BTD = mixer(x_BTD, *, segment_ids=None, positions=None, deterministic=True)    # training (model.linear.mode)
    y_BTD, state = mixer(x_BTD, segment_ids=..., return_state=True)                  # prefill
    state = mixer.init_state(batch_size, max_len, dtype=None)                        # zeros
    y_BD, state = mixer.step(x_BD, state)                                            # one decoding step

- "linear" (Katharopoulos et al. 2020): q, k, v projections, phi = elu + 1 on q and k, the causal normalised
  linear attention, out-projection. With `normalize=False` the normaliser is replaced by a per-head RMSNorm.
- "retnet" (Sun et al. 2023, multi-scale retention): q, k (scaled by P^-1/2), v, a swish output gate; q and k
  rotated by their positions (RoPE, `rotary`); retention with the fixed decays gamma_n = 1 - 2^(-5 - n); a per-head
  GroupNorm; out(swish(x W_g) * GroupNorm(retention)).
- "gla" (Yang et al. 2023): q (scaled by P^-1/2), k, v, a swish output gate and a data-dependent decay per head and
  key feature, alpha = sigmoid(x W_1 W_2 + b)^(1 / tau) through a rank-`gate_rank` projection; a per-head RMSNorm;
  out(swish(x W_g) * RMSNorm(o)).
- "performer" (Choromanski et al. 2021, FAVOR+): q, k (scaled by P^-1/4) mapped to `num_features` positive
  orthogonal random features drawn from `feature_seed` (redraw: another seed; the draw is a function of the seed,
  not a parameter, so the optimizer never touches it), then the normalised causal linear attention (prefix sums).
- "deltanet" (Schlag et al. 2021; Yang et al. 2024): q and k through SiLU and L2-normalised (q also scaled by
  P^-1/2), v, a write strength beta = sigmoid(x W_beta) per head; the delta rule; a per-head RMSNorm; out(o).
- "gated_deltanet" (Yang et al. 2024, Gated DeltaNet): DeltaNet's q, k, v, beta plus a gate per head and token,
  log a_t = -exp(A_log) softplus(x W_a + dt_bias) (Mamba-2's parametrisation), the gated delta rule
  S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; a per-head RMSNorm; out(swish(x W_g) * RMSNorm(o)).

Decode state: {"kv": float32 [B, N, P, H] (H + 1 for normalised "linear" and "performer": the last column is the key
sum; the Performer's P is its number of random features),
"position": int32 [B]} (the position is what RetNet's rotation needs at the next step). `positions` restart at 0
per document (None: 0, 1, 2, ...); `deterministic` is unused (no dropout). With `return_state`, rows are rotated so
that each one's last real token comes last (`contract.right_align`; the padding, moved to the front, is a document
of its own that the first real token resets), so the final state is each row's own whatever its padding.

Legend: B batch, T length, D model width, N heads, P key feature width, H value head width, R gate rank.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import contract, sequence_parallel
from seqjax.nn.ssm import _dense, _dt_bias_init, _param
from seqjax.ops import linear as linear_ops
from seqjax.ops.linear import context_parallel as linear_cp
from seqjax.ops.attention import positions as positions_ops

Dtype = Any
VARIANTS = ("linear", "retnet", "gla", "deltanet", "performer", "gated_deltanet")
FEATURE_DRAW_COLLECTION = "performer"  # the non-trainable collection holding each Performer's draw number


def set_feature_draw(variables: dict, step: jax.Array | int, every: int) -> dict:
  """The Performer's feature-redraw hook: `variables` with every Performer's draw set to step // every, so that
  `model.apply(set_feature_draw(variables, step, N), ...)` uses features redrawn every N steps (draw d is
  `fold_in(key(feature_seed), d)`, reproducible from the step; jittable with a traced step). `variables` must hold
  the "performer" collection that `model.init` returned (each Performer's int32 draw; created when
  `model.linear.redraw_every` > 0); without it the draw is 0."""
  if every < 1:
    raise ValueError(f"set_feature_draw: every must be a positive number of steps, got {every}")
  if FEATURE_DRAW_COLLECTION not in variables:
    raise ValueError(f"set_feature_draw: variables hold no {FEATURE_DRAW_COLLECTION!r} collection (collections: "
                     f"{sorted(variables)}); pass the variables model.init returned, or the collection from it")
  draw = jnp.asarray(step, jnp.int32) // every
  draws = jax.tree.map(lambda d: jnp.full_like(d, draw), variables[FEATURE_DRAW_COLLECTION])
  return {**variables, FEATURE_DRAW_COLLECTION: draws}


class LinearAttention(nn.Module):
  """One linear-attention mixer; `variant` is "linear", "retnet" or "gla" (module docstring)."""

  d_model: int
  variant: str = "linear"
  num_heads: int = 4
  key_dim: int = 16
  value_dim: int = 16
  mode: str = "chunked"
  chunk_size: int | None = None
  feature_map: str = "elu1"
  normalize: bool = True
  rotary: bool = True
  rope_base: float = 10000.0
  gate_rank: int = 16
  gate_normalizer: float = 16.0
  num_features: int = 64
  feature_seed: int = 0
  redraw_every: int = 0  # "performer": > 0 keeps a draw number in the "performer" collection (`set_feature_draw`)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def _state_value_dim(self) -> int:
    return self.value_dim + (1 if self.variant == "performer" or (self.variant == "linear" and self.normalize) else 0)

  @property
  def _state_key_dim(self) -> int:
    if self.variant == "linear" and self.feature_map == "taylor":  # Based's 1 + P + P^2 Taylor features
      return 1 + self.key_dim + self.key_dim ** 2
    return self.num_features if self.variant == "performer" else self.key_dim

  @property
  def _gated(self) -> bool:
    return self.variant in ("retnet", "gla", "gated_deltanet")

  @property
  def _normed(self) -> bool:
    return self._gated or self._delta or (self.variant == "linear" and not self.normalize)

  @property
  def _delta(self) -> bool:
    return self.variant in ("deltanet", "gated_deltanet")

  def setup(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"LinearAttention: variant={self.variant!r} is not one of {VARIANTS}")
    if self.mode not in linear_ops.MODES:
      raise ValueError(f"LinearAttention: mode={self.mode!r} is not one of {linear_ops.MODES}")
    if self.variant == "retnet" and self.rotary and self.key_dim % 2:
      raise ValueError(f"LinearAttention(retnet): rotary positions need an even key_dim, got {self.key_dim}")
    linear_ops.feature_map(self.feature_map)  # a clear error for an unknown name
    n, p, h = self.num_heads, self.key_dim, self.value_dim
    proj = lambda features, name, bias=False: _dense(  # noqa: E731
        features, ("embed", "heads"), self.dtype, self.param_dtype, name, use_bias=bias)
    self.q_proj, self.k_proj, self.v_proj = proj(n * p, "q_proj"), proj(n * p, "k_proj"), proj(n * h, "v_proj")
    if self._gated:
      self.g_proj = proj(n * h, "g_proj")
    if self.variant == "gla":
      self.gate_down = _dense(self.gate_rank, ("embed", None), self.dtype, self.param_dtype, "gate_down")
      self.gate_up = _dense(n * p, (None, "heads"), self.dtype, self.param_dtype, "gate_up", use_bias=True)
    if self._delta:
      self.beta_proj = _dense(n, ("embed", "heads"), self.dtype, self.param_dtype, "beta_proj", use_bias=True)
    if self.variant == "gated_deltanet":  # Mamba-2's decay parametrisation: A in [1, 16], softplus(dt_bias) ~ 1e-3..0.1
      self.a_proj = _dense(n, ("embed", "heads"), self.dtype, self.param_dtype, "a_proj")
      self.dt_bias = _param(self, "dt_bias", _dt_bias_init(1e-3, 1e-1), (n,), ("heads",), jnp.float32)
      a_init = lambda key, shape, dtype: jnp.log(jax.random.uniform(key, shape, dtype, 1, 16))  # noqa: E731
      self.A_log = _param(self, "A_log", a_init, (n,), ("heads",), jnp.float32)
    if self._normed:
      self.norm_scale = _param(self, "norm_scale", nn.initializers.ones, (n * h,), ("heads",), self.param_dtype)
    if self.variant == "retnet":
      self.norm_bias = _param(self, "norm_bias", nn.initializers.zeros, (n * h,), ("heads",), self.param_dtype)
    self.out_proj = _dense(self.d_model, ("heads", "embed"), self.dtype, self.param_dtype, "out_proj")
    self._has_draw = self.variant == "performer" and self.redraw_every > 0 and (
        self.is_initializing() or self.has_variable(FEATURE_DRAW_COLLECTION, "draw"))
    if self._has_draw:
      self.feature_draw = self.variable(FEATURE_DRAW_COLLECTION, "draw", lambda: jnp.zeros((), jnp.int32))

  def _project(self, x_BTD, positions_BT):
    """q, k [B, T, N, P], v [B, T, N, H] and the variant's fourth input: the log-decay (None, [N] or [B, T, N, P]),
    DeltaNet's beta [B, T, N], or Gated DeltaNet's (beta, log-decay), each [B, T, N]."""
    b, t = x_BTD.shape[:2]
    n, p, h = self.num_heads, self.key_dim, self.value_dim
    x_BTD = x_BTD.astype(self.dtype)
    q_BTNP = self.q_proj(x_BTD).reshape(b, t, n, p)
    k_BTNP = self.k_proj(x_BTD).reshape(b, t, n, p)
    v_BTNH = self.v_proj(x_BTD).reshape(b, t, n, h)
    log_decay = None
    if self.variant == "retnet":
      if self.rotary:
        q_BTNP = positions_ops.apply_rope(q_BTNP, positions_BT, base=self.rope_base)
        k_BTNP = positions_ops.apply_rope(k_BTNP, positions_BT, base=self.rope_base)
      k_BTNP = k_BTNP * p ** -0.5
      log_decay = linear_ops.retnet_log_decay(n)
    elif self.variant == "gla":
      q_BTNP = q_BTNP * p ** -0.5
      log_decay = linear_ops.gla_log_decay(self.gate_up(self.gate_down(x_BTD)).reshape(b, t, n, p),
                                           self.gate_normalizer)
    elif self.variant == "performer":
      w_MP = linear_ops.orthogonal_random_features(self._feature_key(), self.num_features, p)
      q_BTNP = linear_ops.favor_features(q_BTNP.astype(jnp.float32) * p ** -0.25, w_MP, is_query=True)
      k_BTNP = linear_ops.favor_features(k_BTNP.astype(jnp.float32) * p ** -0.25, w_MP, is_query=False)
    elif self._delta:
      unit = lambda a: a * jax.lax.rsqrt(jnp.sum(a * a, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
      q_BTNP = unit(nn.silu(q_BTNP.astype(jnp.float32))) * p ** -0.5
      k_BTNP = unit(nn.silu(k_BTNP.astype(jnp.float32)))
      log_decay = jax.nn.sigmoid(self.beta_proj(x_BTD).astype(jnp.float32))  # beta [B, T, N]
      if self.variant == "gated_deltanet":
        dt_BTN = jax.nn.softplus(self.a_proj(x_BTD).astype(jnp.float32) + self.dt_bias)
        log_decay = (log_decay, -jnp.exp(self.A_log) * dt_BTN)
    return q_BTNP, k_BTNP, v_BTNH, log_decay

  def _feature_key(self):
    """The Performer's projection key: key(feature_seed) without redraws; with `redraw_every` > 0,
    fold_in(key(feature_seed), draw) with the "draw" variable of the "performer" collection (0 when the caller does
    not pass the collection), which `set_feature_draw` sets to step // redraw_every (the redraw hook)."""
    if not self.redraw_every:
      return jax.random.key(self.feature_seed)
    draw = self.feature_draw.value if self._has_draw else 0
    return jax.random.fold_in(jax.random.key(self.feature_seed), draw)

  def _output(self, o_BTNH, x_BTD):
    """out_proj of the heads' outputs, through the per-head norm and swish gate where the variant has them."""
    b, t, n, h = o_BTNH.shape
    if self._normed:
      o = o_BTNH.astype(jnp.float32)
      if self.variant == "retnet":  # GroupNorm with one group per head
        o = o - jnp.mean(o, axis=-1, keepdims=True)
      o = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6)
      o = o.reshape(b, t, n * h) * self.norm_scale.astype(jnp.float32)
      if self.variant == "retnet":
        o = o + self.norm_bias.astype(jnp.float32)
      if self._gated:
        o = o * nn.silu(self.g_proj(x_BTD.astype(self.dtype)).astype(jnp.float32))
      o_BTX = o.astype(self.dtype)
    else:
      o_BTX = o_BTNH.reshape(b, t, n * h).astype(self.dtype)
    return self.out_proj(o_BTX)

  def _mix(self, q, k, v, log_decay, **kwargs):
    """The variant's op over a sequence (kwargs: mode, chunk_size, segment_ids, return_final_state)."""
    if self.variant in ("linear", "performer"):
      performer = self.variant == "performer"  # its q, k are already features; always normalised
      return linear_ops.linear_attention(q, k, v, feature_map_name="identity" if performer else self.feature_map,
                                         normalize=performer or self.normalize, **kwargs)
    if self.variant == "retnet":
      return linear_ops.retention(q, k, v, log_decay, **kwargs)
    if self.variant == "deltanet":
      return linear_ops.delta_rule(q, k, v, log_decay, **kwargs)
    if self.variant == "gated_deltanet":
      return linear_ops.delta_rule(q, k, v, log_decay[0], log_decay=log_decay[1], **kwargs)
    return linear_ops.gated_linear_attention(q, k, v, log_decay, **kwargs)

  def _mix_sequence_parallel(self, q, k, v, log_decay, segment_ids):
    """`_mix` on a sequence-sharded mesh: the local shards in `shard_map` over "seq", the states passed across
    them (`seqjax.ops.linear.context_parallel`). A per-head decay [N] enters replicated."""
    if self._delta:  # the delta rule's matrix state maps (DeltaNet; Gated DeltaNet's beta and log-decay)
      beta, g = (log_decay, None) if self.variant == "deltanet" else log_decay
      return sequence_parallel.shard_sequence(
          lambda q, k, v, beta, g, segment_ids: linear_cp.delta_rule_context_parallel(
              q, k, v, beta, log_decay=g, axis_name=sequence_parallel.AXIS, mode=self.mode,
              chunk_size=self.chunk_size, segment_ids=segment_ids), (q, k, v, beta, g, segment_ids))
    per_head = log_decay is not None and log_decay.ndim == 1

    def local(q, k, v, log_decay, segment_ids, *replicated):
      return self._mix(q, k, v, replicated[0] if replicated else log_decay, mode=self.mode,
                       chunk_size=self.chunk_size, segment_ids=segment_ids,
                       context_parallel_axis=sequence_parallel.AXIS)

    return sequence_parallel.shard_sequence(local, (q, k, v, None if per_head else log_decay, segment_ids),
                                            (log_decay,) if per_head else ())

  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True, return_state: bool = False):
    del deterministic
    b, t = x_BTD.shape[:2]
    if segment_ids is not None and segment_ids.shape != (b, t):
      raise ValueError(f"LinearAttention: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    given_positions = positions
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if return_state:
      x_BTD, aligned_ids, lengths_B = contract.right_align(x_BTD, segment_ids)
      positions = contract.roll_rows(positions, t - lengths_B)
    else:
      aligned_ids = segment_ids
    q, k, v, log_decay = self._project(x_BTD, positions)
    if not return_state and sequence_parallel.active():
      out = self._mix_sequence_parallel(q, k, v, log_decay, segment_ids)
    else:
      out = self._mix(q, k, v, log_decay, mode=self.mode, chunk_size=self.chunk_size, segment_ids=aligned_ids,
                      return_final_state=return_state)
    if not return_state:
      return self._output(out, x_BTD)
    o_BTNH, kv_BNPH = out
    y_BTD = contract.restore(self._output(o_BTNH, x_BTD), lengths_B)
    state = {"kv": kv_BNPH, "position": contract.next_positions(given_positions, lengths_B)}
    return y_BTD, contract.where_rows(lengths_B > 0, state, self.init_state(b))

  def init_state(self, batch_size: int, max_len: int = 0, dtype: Dtype = None):
    del max_len, dtype  # the state is float32 and does not grow with the context
    return {"kv": jnp.zeros((batch_size, self.num_heads, self._state_key_dim, self._state_value_dim), jnp.float32),
            "position": jnp.zeros((batch_size,), jnp.int32)}

  def step(self, x_BD: jax.Array, state, *, deterministic: bool = True):
    del deterministic
    x_B1D = x_BD[:, None]
    q, k, v, log_decay = self._project(x_B1D, state["position"][:, None])
    if self.variant in ("linear", "performer"):
      performer = self.variant == "performer"
      o_BNH, kv = linear_ops.linear_attention_step(
          q[:, 0], k[:, 0], v[:, 0], state["kv"], feature_map_name="identity" if performer else self.feature_map,
          normalize=performer or self.normalize)
    elif self.variant == "deltanet":
      o_BNH, kv = linear_ops.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], state["kv"])
    elif self.variant == "gated_deltanet":
      beta_BTN, g_BTN = log_decay
      o_BNH, kv = linear_ops.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta_BTN[:, 0], state["kv"], g_BTN[:, 0])
    else:
      step_decay = log_decay if log_decay.ndim == 1 else log_decay[:, 0]
      o_BNH, kv = linear_ops.decayed_attention_step(q[:, 0], k[:, 0], v[:, 0], step_decay, state["kv"])
    y_B1D = self._output(o_BNH[:, None], x_B1D)
    return y_B1D[:, 0], {"kv": kv, "position": state["position"] + 1}
