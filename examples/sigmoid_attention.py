"""Sigmoid attention (Ramapuram et al., 2024) as a seqjax mixer: the worked example of docs/new_mixer.md."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn import contract
from seqjax.nn.mixers import register_mixer


class SigmoidAttention(nn.Module):
  """Causal attention with sigmoid(q.k / sqrt(H) - log(max_len)) weights in place of a softmax over keys."""
  d_model: int
  num_heads: int
  max_len: int  # the decoding cache holds this many tokens
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.qkv = nn.DenseGeneral((3, self.num_heads, self.d_model // self.num_heads), dtype=self.dtype)
    self.out = nn.DenseGeneral(self.d_model, axis=(-2, -1), dtype=self.dtype)

  def _attend(self, x_BTD, k_BSNH, v_BSNH, visible_BTS):
    q_BTNH = self.qkv(x_BTD)[:, :, 0]
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH).astype(jnp.float32)
    weights = jax.nn.sigmoid(scores_BNTS / jnp.sqrt(q_BTNH.shape[-1]) - jnp.log(self.max_len))
    weights = jnp.where(visible_BTS[:, None], weights, 0.0).astype(self.dtype)
    return self.out(jnp.einsum("bnts,bsnh->btnh", weights, v_BSNH))

  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True, return_state=False):
    b, t, _ = x_BTD.shape
    seg_BT = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    same_doc_BTS = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, None, :] != 0)
    _, k_BTNH, v_BTNH = jnp.unstack(self.qkv(x_BTD), axis=2)
    y_BTD = self._attend(x_BTD, k_BTNH, v_BTNH, same_doc_BTS & jnp.tril(jnp.ones((t, t), bool)))
    if not return_state:
      return y_BTD
    length_B = contract.last_token_lengths(segment_ids, b, t)  # the state after each row's last real token
    last_doc_B = seg_BT[jnp.arange(b), jnp.maximum(length_B - 1, 0)]
    pad = [(0, 0), (0, self.max_len - t), (0, 0), (0, 0)]
    return y_BTD, {"k": jnp.pad(k_BTNH, pad), "v": jnp.pad(v_BTNH, pad), "length": length_B,
                   "valid": jnp.pad((seg_BT == last_doc_B[:, None]) & (seg_BT != 0), [(0, 0), (0, self.max_len - t)])}

  def init_state(self, batch_size, max_len, dtype=None):
    h = self.d_model // self.num_heads
    kv = jnp.zeros((batch_size, self.max_len, self.num_heads, h), dtype or self.dtype)
    return {"k": kv, "v": kv, "length": jnp.zeros((batch_size,), jnp.int32),
            "valid": jnp.zeros((batch_size, self.max_len), bool)}

  def step(self, x_BD, state, *, deterministic=True):
    _, k_BNH, v_BNH = jnp.unstack(self.qkv(x_BD), axis=1)
    new_BS = jnp.arange(self.max_len) == state["length"][:, None]  # the slot of this token
    k = jnp.where(new_BS[:, :, None, None], k_BNH[:, None].astype(state["k"].dtype), state["k"])
    v = jnp.where(new_BS[:, :, None, None], v_BNH[:, None].astype(state["v"].dtype), state["v"])
    valid_BS = state["valid"] | new_BS
    y_B1D = self._attend(x_BD[:, None], k, v, valid_BS[:, None])
    return y_B1D[:, 0], {"k": k, "v": v, "length": state["length"] + 1, "valid": valid_BS}


@register_mixer("sigmoid_attention")
def _make(cfg):
  return SigmoidAttention(cfg.d_model, cfg.attention.num_heads, cfg.max_len, jnp.dtype(cfg.dtype))
