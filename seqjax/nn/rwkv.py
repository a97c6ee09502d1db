"""The "rwkv" mixer (linen): RWKV-6's time mix and channel mix (Peng et al. 2024, "Eagle and Finch"), thin over
`seqjax.ops.linear.rwkv`.

Time mix, on its input x [B, T, D] (x_prev: the previous token's x in the same document, 0 at its start):

    dx = x_prev - x,   xx = x + dx * mu_x
    (m_w, m_k, m_v, m_r, m_g) = tanh(xx A) B                     (ddlerp: a rank-`mix_rank` LoRA per target)
    x_c = x + dx * (mu_c + m_c)                                   for c in w, k, v, r, g
    r, k, v = x_r W_r, x_k W_k, x_v W_v;   gate = silu(x_g W_g)
    log w_t = -exp(w0 + tanh(x_w A_w) B_w)                         (data-dependent decay per channel, rank `decay_rank`)
    y = W_o (gate * GroupNorm_heads(wkv(r, k, v, w, u)))           (u: the bonus of the current token)

Channel mix, on its input z (z_prev likewise):  dz = z_prev - z,  k = relu((z + dz mu_k) W_k)^2,
    y = sigmoid((z + dz mu_r) W_r) * (k W_v)                      (hidden width F = model.mlp_dim)

How it fits the LM's block (`seqjax.models.lm.Block`, `x + mixer(norm(x))` then `x + mlp(norm(x))`): RWKV's channel
mix has a token shift, so it needs a decode state the block's MLP does not have. With `channel_mix=True` (the
default, `model.linear.rwkv_channel_mix`) the mixer *is* the whole RWKV block,

    h = x + TimeMix(LN_1(x)),    y = h + ChannelMix(LN_2(h))

with its own norms and residuals, and declares `owns_block = True`: the LM's block then passes the residual stream
straight through it and adds no norm, residual or MLP of its own. With `channel_mix=False` the mixer is the time mix
alone (y = TimeMix(x)) inside an ordinary block with the configured MLP (e.g. for hybrid patterns).

Decode state: {"kv": float32 [B, N, P, H] (RWKV's S_{t-1}), "shift": [B, D] the time mix's last input,
"channel_shift": [B, D] the channel mix's last input (zeros without the channel mix)} in the compute dtype; every
token shift is zero at a document start (segment resets), so packed documents stay apart.

Legend: B batch, T length, D model width, N heads, P key width, H value width, F channel-mix width, R LoRA rank.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import contract, layers
from seqjax.nn.ssm import _dense, _param
from seqjax.ops import linear as linear_ops
from seqjax.ops.linear import rwkv as rwkv_ops

Dtype = Any
_TARGETS = 5  # ddlerp's targets: w, k, v, r, g
_GROUP_NORM_EPS = 64e-5  # RWKV-6's ln_x eps (1e-5 * head_size_divisor ** 2)


def _decay_init(key, shape, dtype=jnp.float32):
  """w0: RWKV-6's decay speeds, -6 + 5 (i / (C - 1))^0.7 over the channels (slow to fast forgetting)."""
  del key
  c = shape[0]
  return (-6.0 + 5.0 * (jnp.arange(c, dtype=jnp.float32) / max(c - 1, 1)) ** 0.7).astype(dtype)


def _bonus_init(key, shape, dtype=jnp.float32):
  """u: RWKV-6's time_faaaa at ratio 0, ((i + 1) % 3 - 1) / 10 per key channel, then split by head."""
  del key
  n, p = shape
  return ((jnp.arange(n * p) + 1) % 3 - 1).astype(dtype).reshape(n, p) * 0.1


class Rwkv6(nn.Module):
  """RWKV-6 time mix (+ channel mix when `channel_mix`); the mixer contract (module docstring)."""

  d_model: int
  num_heads: int = 4
  key_dim: int = 16
  value_dim: int = 16
  mix_rank: int = 32
  decay_rank: int = 64
  channel_mix: bool = True
  ffn_dim: int = 64
  norm: str = "layernorm"
  mode: str = "chunked"
  chunk_size: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def owns_block(self) -> bool:
    """True: the LM's block adds no norm, residual or MLP around this mixer (it is the whole RWKV block)."""
    return self.channel_mix

  def setup(self):
    if self.mode not in linear_ops.MODES:
      raise ValueError(f"Rwkv6: mode={self.mode!r} is not one of {linear_ops.MODES}")
    d, n, p, h = self.d_model, self.num_heads, self.key_dim, self.value_dim
    half = lambda name, shape: _param(self, name, nn.initializers.constant(0.5), shape,  # noqa: E731
                                      (None,) * (len(shape) - 1) + ("embed",), self.param_dtype)
    self.mu_x = half("mu_x", (d,))
    self.mu = half("mu", (_TARGETS, d))  # w, k, v, r, g
    small = nn.initializers.uniform(1e-4)
    self.mix_a = _param(self, "mix_a", small, (d, _TARGETS * self.mix_rank), ("embed", None), self.param_dtype)
    self.mix_b = _param(self, "mix_b", nn.initializers.zeros, (_TARGETS, self.mix_rank, d), (None, None, "embed"),
                        self.param_dtype)
    self.decay_a = _param(self, "decay_a", small, (d, self.decay_rank), ("embed", None), self.param_dtype)
    self.decay_b = _param(self, "decay_b", nn.initializers.zeros, (self.decay_rank, n * p), (None, "heads"),
                          self.param_dtype)
    self.w0 = _param(self, "w0", _decay_init, (n * p,), ("heads",), jnp.float32)
    self.bonus = _param(self, "bonus", _bonus_init, (n, p), ("heads", None), jnp.float32)
    proj = lambda features, name, axes=("embed", "heads"): _dense(  # noqa: E731
        features, axes, self.dtype, self.param_dtype, name)
    self.r_proj, self.k_proj = proj(n * p, "r_proj"), proj(n * p, "k_proj")
    self.v_proj, self.g_proj = proj(n * h, "v_proj"), proj(n * h, "g_proj")
    self.norm_scale = _param(self, "norm_scale", nn.initializers.ones, (n * h,), ("heads",), self.param_dtype)
    self.norm_bias = _param(self, "norm_bias", nn.initializers.zeros, (n * h,), ("heads",), self.param_dtype)
    self.out_proj = proj(d, "out_proj", ("heads", "embed"))
    if self.channel_mix:
      self.ln_time = layers.make_norm(self.norm, self.dtype, "ln_time")
      self.ln_channel = layers.make_norm(self.norm, self.dtype, "ln_channel")
      self.cmu_k, self.cmu_r = half("cmu_k", (d,)), half("cmu_r", (d,))
      self.ck_proj = proj(self.ffn_dim, "ck_proj", ("embed", "mlp"))
      self.cv_proj = proj(d, "cv_proj", ("mlp", "embed"))
      self.cr_proj = proj(d, "cr_proj", ("embed", None))

  # -- time mix ----------------------------------------------------------------------------------------------------

  def _time_inputs(self, x_BTD, prev_BTD):
    """r, k [B, T, N, P], v [B, T, N, H], log w [B, T, N, P] float32, the output gate [B, T, N*H] (ddlerp)."""
    b, t, _ = x_BTD.shape
    n, p, h = self.num_heads, self.key_dim, self.value_dim
    f32 = jnp.float32
    x, dx = x_BTD.astype(f32), (prev_BTD - x_BTD).astype(f32)
    xx = x + dx * self.mu_x.astype(f32)
    lora_BTXR = jnp.tanh(xx @ self.mix_a.astype(f32)).reshape(b, t, _TARGETS, self.mix_rank)
    m_XBTD = jnp.einsum("btxr,xrd->xbtd", lora_BTXR, self.mix_b.astype(f32))
    x_w, x_k, x_v, x_r, x_g = (x + dx * (self.mu[i].astype(f32) + m_XBTD[i]) for i in range(_TARGETS))
    cast = lambda a: a.astype(self.dtype)  # noqa: E731
    r = self.r_proj(cast(x_r)).reshape(b, t, n, p)
    k = self.k_proj(cast(x_k)).reshape(b, t, n, p)
    v = self.v_proj(cast(x_v)).reshape(b, t, n, h)
    gate = nn.silu(self.g_proj(cast(x_g)).astype(f32))
    log_w = -jnp.exp(self.w0 + jnp.tanh(x_w @ self.decay_a.astype(f32)) @ self.decay_b.astype(f32))
    return r, k, v, log_w.reshape(b, t, n, p), gate

  def _time_output(self, y_BTNH, gate_BTX):
    b, t, n, h = y_BTNH.shape
    y = y_BTNH.astype(jnp.float32)
    y = y - jnp.mean(y, axis=-1, keepdims=True)  # GroupNorm, one group per head
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + _GROUP_NORM_EPS)
    y = y.reshape(b, t, n * h) * self.norm_scale.astype(jnp.float32) + self.norm_bias.astype(jnp.float32)
    return self.out_proj((y * gate_BTX).astype(self.dtype))

  # -- channel mix -------------------------------------------------------------------------------------------------

  def _channel(self, z_BTD, prev_BTD):
    f32 = jnp.float32
    z, dz = z_BTD.astype(f32), (prev_BTD - z_BTD).astype(f32)
    z_k = (z + dz * self.cmu_k.astype(f32)).astype(self.dtype)
    z_r = (z + dz * self.cmu_r.astype(f32)).astype(self.dtype)
    hidden = jnp.square(nn.relu(self.ck_proj(z_k)))
    return nn.sigmoid(self.cr_proj(z_r)) * self.cv_proj(hidden)

  # -- the contract ------------------------------------------------------------------------------------------------

  def _block(self, x_BTD, segment_ids, state):
    """(y, the new state): over a sequence from the start (`state` None; shifts and the wkv state reset at document
    starts), or one token [B, 1, D] from `state` (decoding)."""
    shift = None if state is None else state["shift"]
    a_BTD = self.ln_time(x_BTD) if self.channel_mix else x_BTD
    r, k, v, log_w, gate = self._time_inputs(a_BTD, rwkv_ops.token_shift(a_BTD, segment_ids, shift))
    if state is None:
      y_BTNH, kv = rwkv_ops.rwkv6_wkv(r, k, v, log_w, self.bonus, mode=self.mode, chunk_size=self.chunk_size,
                                      segment_ids=segment_ids, return_final_state=True)
    else:
      y_BNH, kv = rwkv_ops.rwkv6_wkv_step(r[:, 0], k[:, 0], v[:, 0], log_w[:, 0], self.bonus, state["kv"])
      y_BTNH = y_BNH[:, None]
    y_BTD = self._time_output(y_BTNH, gate)
    new_state = {"kv": kv, "shift": a_BTD[:, -1].astype(self.dtype),
                 "channel_shift": jnp.zeros((x_BTD.shape[0], self.d_model), self.dtype)}
    if not self.channel_mix:
      return y_BTD, new_state
    h_BTD = x_BTD + y_BTD.astype(x_BTD.dtype)
    c_BTD = self.ln_channel(h_BTD)
    prev = None if state is None else state["channel_shift"]
    y_BTD = h_BTD + self._channel(c_BTD, rwkv_ops.token_shift(c_BTD, segment_ids, prev)).astype(h_BTD.dtype)
    new_state["channel_shift"] = c_BTD[:, -1].astype(self.dtype)
    return y_BTD, new_state

  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True, return_state: bool = False):
    del positions, deterministic  # no positions inside RWKV (the token shift and decays order the tokens)
    b, t = x_BTD.shape[:2]
    if segment_ids is not None and segment_ids.shape != (b, t):
      raise ValueError(f"Rwkv6: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    x_BTD = x_BTD.astype(self.dtype)
    if not return_state:
      return self._block(x_BTD, segment_ids, None)[0]
    x_BTD, aligned_ids, lengths_B = contract.right_align(x_BTD, segment_ids)
    y_BTD, state = self._block(x_BTD, aligned_ids, None)
    return contract.restore(y_BTD, lengths_B), contract.where_rows(lengths_B > 0, state, self.init_state(b))

  def init_state(self, batch_size: int, max_len: int = 0, dtype: Dtype = None):
    del max_len  # the state does not grow with the context
    dtype = dtype or self.dtype
    return {"kv": jnp.zeros((batch_size, self.num_heads, self.key_dim, self.value_dim), jnp.float32),
            "shift": jnp.zeros((batch_size, self.d_model), dtype),
            "channel_shift": jnp.zeros((batch_size, self.d_model), dtype)}

  def step(self, x_BD: jax.Array, state, *, deterministic: bool = True):
    del deterministic
    state = dict(state, shift=state["shift"].astype(self.dtype),
                 channel_shift=state["channel_shift"].astype(self.dtype))
    y_B1D, new_state = self._block(x_BD[:, None].astype(self.dtype), None, state)
    return y_B1D[:, 0], jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
