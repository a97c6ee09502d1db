"""The linear-attention variants over the shared decayed recurrence (`recurrence.py`): what each puts in q, k, v, g.

- "linear"  (Katharopoulos et al., 2020): features phi(q), phi(k) with phi = elu + 1 (positive), no decay, and the
            normaliser o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps) with z_t = sum_{s<=t} phi(k_s). The normaliser
            rides along as one more value column of ones: the state is [B, N, P, H + 1], its last column z.
- "retnet"  (Sun et al., 2023, multi-scale retention): a fixed decay gamma_n = 1 - 2^(-5 - n) per head n;
            q, k are used as they come (the module rotates them and scales k). `retnet_log_decay`.
- "performer" (Choromanski et al., 2021, FAVOR+): linear attention whose features are positive orthogonal random
            features approximating the softmax kernel, `favor_features` with `orthogonal_random_features`; the
            caller passes them to `linear_attention(..., feature_map_name="identity")` (normalised: a causal,
            prefix-sum estimate of softmax attention).
- "gla"     (Yang et al., 2023, gated linear attention): a data-dependent decay per head, token and key feature,
            alpha = sigmoid(gate)^(1 / tau) from a low-rank projection of the input; `gla_log_decay`.

Every function takes the three forms of `decayed_linear_attention` through `mode` ("parallel", "recurrent",
"chunked"), `segment_ids` resets, an initial state and returns the final state on request; the `*_step`
functions are the decoding step. Legend as in `recurrence.py` (B, T, N, P key feature dim, H value dim).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from seqjax.ops.linear.context_parallel import decayed_linear_attention_context_parallel
from seqjax.ops.linear.recurrence import decayed_linear_attention, decayed_step
from seqjax.ops.ssm._common import as_arrays

def taylor_features(x: jax.Array) -> jax.Array:
  """Based's 2nd-order Taylor feature map (Arora et al. 2024): [1, x', vec(x' x'^T) / sqrt(2)] with x' = x P^-1/4,
  [..., 1 + P + P^2], so that phi(q) . phi(k) = 1 + z + z^2 / 2 with z = q . k / sqrt(P): the Taylor expansion of
  exp(z), positive (>= 1/2), so the normaliser is > 0."""
  x = jnp.asarray(x) * x.shape[-1] ** -0.25
  outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (x.shape[-1] ** 2,)) * 0.5 ** 0.5
  return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x, outer], axis=-1)


FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {  # "linear"; Performer's is `favor_features`
    "elu1": lambda x: jax.nn.elu(x) + 1.0,  # Katharopoulos et al.: positive, so the normaliser is > 0
    "relu": jax.nn.relu,
    "identity": lambda x: x,
    "taylor": taylor_features,  # Based: P -> 1 + P + P^2 features
}
DEFAULT_EPS = 1e-6


def feature_map(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in FEATURE_MAPS:
    raise ValueError(f"linear attention: feature_map={name!r} is not one of {tuple(FEATURE_MAPS)}")
  return FEATURE_MAPS[name]


def _with_ones(v):
  """v [..., H] with a column of ones appended [..., H + 1]: the normaliser's sum of keys becomes a value column."""
  return jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)


def _normalised(o_aug, eps):
  return o_aug[..., :-1] / (o_aug[..., -1:] + eps)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, feature_map_name: str = "elu1",
                     normalize: bool = True, eps: float = DEFAULT_EPS, mode: str = "chunked",
                     chunk_size: int | None = None, initial_state: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, return_final_state: bool = False,
                     context_parallel_axis: str | None = None):
  """Causal linear attention (Katharopoulos et al.): o [B, T, N, H] in v's dtype (and the final state, float32).

  q, k [B, T, N, P] are mapped by the feature map (`FEATURE_MAPS`); with `normalize` the output is divided by
  phi(q_t) . sum_{s<=t} phi(k_s) + eps and the state is [B, N, P, H + 1] (its last column the key sum), else the
  state is [B, N, P, H].
  """
  q, k, v = as_arrays(q, k, v)
  phi = feature_map(feature_map_name)
  q_BTNP, k_BTNP = phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32))
  out = _core(context_parallel_axis)(q_BTNP, k_BTNP, _with_ones(v) if normalize else v, mode=mode,
                                     chunk_size=chunk_size, initial_state=initial_state, segment_ids=segment_ids,
                                     return_final_state=True, name="linear_attention")
  o_BTNH, s_BNPH = out
  if normalize:
    o_BTNH = _normalised(o_BTNH, eps)
  o_BTNH = o_BTNH.astype(v.dtype)
  return (o_BTNH, s_BNPH) if return_final_state else o_BTNH


def linear_attention_step(q_BNP: jax.Array, k_BNP: jax.Array, v_BNH: jax.Array, state: jax.Array, *,
                          feature_map_name: str = "elu1", normalize: bool = True, eps: float = DEFAULT_EPS):
  """One decoding step of `linear_attention`: (o [B, N, H] in v's dtype, new state float32)."""
  q_BNP, k_BNP, v_BNH = as_arrays(q_BNP, k_BNP, v_BNH)
  phi = feature_map(feature_map_name)
  o_BNH, state = decayed_step(phi(q_BNP.astype(jnp.float32)), phi(k_BNP.astype(jnp.float32)),
                              _with_ones(v_BNH) if normalize else v_BNH, None, state)
  if normalize:
    o_BNH = _normalised(o_BNH, eps)
  return o_BNH.astype(v_BNH.dtype), state


def orthogonal_random_features(key: jax.Array, num_features: int, dim: int) -> jax.Array:
  """[M, P] float32 projection for FAVOR+ (Choromanski et al. 2021): blocks of P orthogonal rows (QR of a Gaussian),
  each row rescaled to the norm of a Gaussian vector (chi distributed), so every row is marginally N(0, I_P) and
  rows within a block are exactly orthogonal. Redraw by calling again with a new key."""
  if num_features < 1 or dim < 1:
    raise ValueError(f"orthogonal_random_features: num_features and dim must be positive, got {num_features}, {dim}")
  blocks = -(-num_features // dim)
  key_q, key_norms = jax.random.split(key)
  # Q of each Gaussian block's QR with R's diagonal made positive: Haar-distributed orthogonal rows (one batched QR).
  q_blocks, r_blocks = jnp.linalg.qr(jax.random.normal(key_q, (blocks, dim, dim), jnp.float32))
  q_blocks = q_blocks * jnp.sign(jnp.diagonal(r_blocks, axis1=1, axis2=2))[:, None, :]
  w_MP = jnp.swapaxes(q_blocks, 1, 2).reshape(blocks * dim, dim)[:num_features]
  norms_M = jnp.linalg.norm(jax.random.normal(key_norms, (num_features, dim), jnp.float32), axis=-1)
  return w_MP * norms_M[:, None]


def feature_draw_key(seed: int, step: jax.Array | int, every: int) -> jax.Array:
  """The key of draw number step // every of the seed's random features: redraw every `every` steps, reproducibly
  (a resumed run gets the same features at the same step); step may be traced."""
  if every < 1:
    raise ValueError(f"feature_draw_key: every must be a positive number of steps, got {every}")
  return jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.int32) // every)


def favor_features(x_BTNP: jax.Array, w_MP: jax.Array, *, is_query: bool) -> jax.Array:
  """FAVOR+ positive random features [B, T, N, M] of x (already scaled by P^-1/4), float32:
  phi(x) = exp(w_m . x - |x|^2 / 2 - c) / sqrt(M), so that E[phi(q) . phi(k)] = exp(q . k) (up to exp(-c) factors).

  Queries subtract their own max over features (c per query: it cancels between the normalised output's numerator
  and denominator); keys subtract nothing data-dependent (a per-key constant would not cancel, and a max over all
  keys would look into the future), only |k|^2 / 2.
  """
  x = jnp.asarray(x_BTNP).astype(jnp.float32)
  proj_BTNM = jnp.einsum("btnp,mp->btnm", x, jnp.asarray(w_MP, jnp.float32))
  logits = proj_BTNM - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if is_query:
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  return jnp.exp(logits) / jnp.sqrt(jnp.float32(w_MP.shape[0]))


def retnet_log_decay(num_heads: int) -> jax.Array:
  """[N] float32: log gamma_n with gamma_n = 1 - 2^(-5 - n), the per-head decays of multi-scale retention
  (head 0 forgets fastest, gamma = 0.969, an effective span of ~32 tokens; each next head doubles the span)."""
  if num_heads < 1:
    raise ValueError(f"retnet_log_decay: num_heads must be positive, got {num_heads}")
  return jnp.log1p(-jnp.exp2(-5.0 - jnp.arange(num_heads, dtype=jnp.float32)))


def retention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay_N: jax.Array, *, mode: str = "chunked",
              chunk_size: int | None = None, initial_state: jax.Array | None = None,
              segment_ids: jax.Array | None = None, return_final_state: bool = False,
              context_parallel_axis: str | None = None):
  """Retention: o_t = sum_{s<=t} gamma_n^(t-s) (q_t . k_s) v_s per head, in v's dtype (and the final state)."""
  return _decayed(q, k, v, jnp.asarray(log_decay_N), "retention", mode=mode, chunk_size=chunk_size,
                  initial_state=initial_state, segment_ids=segment_ids, return_final_state=return_final_state,
                  context_parallel_axis=context_parallel_axis)


def gla_log_decay(gate_logits: jax.Array, normalizer: float = 16.0) -> jax.Array:
  """log alpha = log(sigmoid(gate) ^ (1 / normalizer)) (GLA's gate; float32, <= 0). A large normalizer keeps the
  decay close to 1 at initialisation (the paper's tau = 16)."""
  return jax.nn.log_sigmoid(jnp.asarray(gate_logits).astype(jnp.float32)) / normalizer


def gated_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_decay_BTNP: jax.Array, *,
                           mode: str = "chunked", chunk_size: int | None = None,
                           initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                           return_final_state: bool = False, context_parallel_axis: str | None = None):
  """GLA: S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t with log alpha [B, T, N, P]; in v's dtype."""
  return _decayed(q, k, v, log_decay_BTNP, "gated_linear_attention", mode=mode, chunk_size=chunk_size,
                  initial_state=initial_state, segment_ids=segment_ids, return_final_state=return_final_state,
                  context_parallel_axis=context_parallel_axis)


def _core(context_parallel_axis: str | None):
  """The recurrence over a whole sequence, or over the local shard of one split along a mesh axis (inside
  `shard_map`; `seqjax.ops.linear.context_parallel`)."""
  if context_parallel_axis is None:
    return decayed_linear_attention
  return functools.partial(decayed_linear_attention_context_parallel, axis_name=context_parallel_axis)


def _decayed(q, k, v, log_decay, name, *, return_final_state, context_parallel_axis=None, **kwargs):
  """`decayed_linear_attention` (or its context-parallel form) with the output cast to v's dtype."""
  v = jnp.asarray(v)
  o_BTNH, s_BNPH = _core(context_parallel_axis)(q, k, v, log_decay, return_final_state=True, name=name, **kwargs)
  o_BTNH = o_BTNH.astype(v.dtype)
  return (o_BTNH, s_BNPH) if return_final_state else o_BTNH


def decayed_attention_step(q_BNP: jax.Array, k_BNP: jax.Array, v_BNH: jax.Array, log_decay: jax.Array,
                           state: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One decoding step of `retention` (log_decay [N]) or `gated_linear_attention` (log_decay [B, N, P]):
  (o [B, N, H] in v's dtype, new state [B, N, P, H] float32)."""
  v_BNH = jnp.asarray(v_BNH)
  o_BNH, state = decayed_step(q_BNP, k_BNP, v_BNH, log_decay, state)
  return o_BNH.astype(v_BNH.dtype), state
