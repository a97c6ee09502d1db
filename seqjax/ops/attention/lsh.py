"""Reformer LSH attention: shared query/key vectors hashed by random rotations, sorted by bucket, attended in chunks.

Legend: B batch, T length, N heads, H head dim, R hashing rounds, U buckets per round, C chunk, M = ceil(T / C)
chunks, J keys a chunk of queries looks at (2C causal, 3C not).

Hash (Kitaev et al. 2020, angular LSH): with a fixed random matrix W [H, U/2] per head and round,
`bucket(x) = argmax([x W, -x W])`. Rotations are drawn once from a seed (`lsh_rotations`) and are not trained.

Shared QK: a token's key is its query divided by its norm, so q.k is largest on the token itself; the token's own
score is therefore lowered by 1e5 (it attends to itself only when it sees nothing else).

Which keys a query sees. In round r the tokens are sorted by (bucket, position); let sigma_r(i) be token i's place
in that order. Query i sees key j in round r when both fall in the same bucket and

    causal:      0 <= sigma_r(i) - sigma_r(j) < C   (the C most recent tokens of i's bucket, i included)
    not causal:  |sigma_r(i) - sigma_r(j)| < C      (C - 1 either side within the bucket)

and, with `segment_ids`, both are in the same document (id 0 = padding sees nothing). Within a bucket the order is
the position order, so the causal rule looks only at the past: the output at t does not depend on tokens after t,
and a step of decoding can reproduce it from a cache (`lsh_attention_step`). Because the tokens of a bucket are
contiguous after the sort, chunks of C sorted tokens that look at the previous chunk (and the next one when not
causal) hold every pair the rule allows: the work is O(T C R), not O(T^2).

Rounds combined. Query i attends, over all rounds, to the union U_i of the keys it sees in any round:

    out_i = sum_{j in U_i} softmax_j(s_ij) v_j

computed per round r with the scores lowered by log(number of rounds in which (i, j) is seen) — so a pair seen in
several rounds counts once — and the rounds' outputs combined with weights softmax_r(logsumexp_r): the exact union
softmax. With one bucket and C >= T (causal) this is full causal attention (self excluded unless alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SELF_PENALTY = 1e5


def lsh_rotations(key: jax.Array, num_heads: int, num_hashes: int, head_dim: int, num_buckets: int) -> jax.Array:
  """The fixed random rotations float32 [N, R, H, U/2] (standard normal; the hash is scale-invariant)."""
  if num_buckets < 2 or num_buckets % 2:
    raise ValueError(f"lsh_rotations: num_buckets must be an even number >= 2, got {num_buckets}")
  return jax.random.normal(key, (num_heads, num_hashes, head_dim, num_buckets // 2), jnp.float32)


def lsh_hash(x_BTNH: jax.Array, rotations_NRHU: jax.Array) -> jax.Array:
  """Buckets int32 [B, N, R, T]: argmax of [x W, -x W] per head and round (computed in float32)."""
  xw_BNRTU = jnp.einsum("btnh,nrhu->bnrtu", x_BTNH.astype(jnp.float32), rotations_NRHU,
                        precision=jax.lax.Precision.HIGHEST)
  return jnp.argmax(jnp.concatenate([xw_BNRTU, -xw_BNRTU], axis=-1), axis=-1).astype(jnp.int32)


def _check(name, qk, v, rotations, chunk):
  if qk.ndim != 4 or v.shape[:3] != qk.shape[:3]:
    raise ValueError(f"{name}: expected qk [B, T, N, H] and v [B, T, N, H'] with the same B, T, N, got {qk.shape} "
                     f"and {v.shape}")
  if rotations.ndim != 4 or rotations.shape[0] != qk.shape[2] or rotations.shape[2] != qk.shape[3]:
    raise ValueError(f"{name}: expected rotations [N, R, H, U/2] = [{qk.shape[2]}, R, {qk.shape[3]}, U/2] "
                     f"(lsh_rotations), got {rotations.shape}")
  if not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"{name}: chunk must be a positive int, got {chunk!r}")


def _normalize(x, axis=-1):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


def _take(x, idx, axis):
  """take_along_axis with idx broadcast over x's trailing axes."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - idx.ndim))
  return jnp.take_along_axis(x, idx, axis=axis)


def lsh_attention(qk_BTNH: jax.Array, v_BTNH: jax.Array, rotations_NRHU: jax.Array, *, chunk: int,
                  causal: bool = True, segment_ids: jax.Array | None = None, scale: float | None = None) -> jax.Array:
  """LSH self-attention with shared queries and keys (see the module docstring for exactly what it computes).

  Args:
    qk_BTNH: the shared query/key vectors [B, T, N, H] (keys are their normalised copies).
    v_BTNH: values [B, T, N, H'].
    rotations_NRHU: the hash rotations [N, R, H, U/2] (`lsh_rotations`).
    chunk: C, the tokens of a bucket a query sees on each side (its own included on the past side).
    causal: see only the past (the C most recent tokens of the bucket).
    segment_ids: int [B, T] packed documents (0 = padding: its rows come out 0), or None.
    scale: score scale, default 1 / sqrt(H).

  Returns:
    [B, T, N, H'] in qk's dtype (scores, softmax and the rounds' combination in float32).
  """
  _check("lsh_attention", qk_BTNH, v_BTNH, rotations_NRHU, chunk)
  B, T, N, H = qk_BTNH.shape
  R = rotations_NRHU.shape[1]
  C = int(chunk)
  M = -(-T // C)
  scale = H ** -0.5 if scale is None else scale
  if segment_ids is None:
    segment_ids = jnp.ones((B, T), jnp.int32)
  key_BTNH = _normalize(qk_BTNH)
  buckets_BNRT = lsh_hash(key_BTNH, rotations_NRHU)
  t_T = jnp.arange(T, dtype=jnp.int32)
  order_BNRT = jnp.argsort(buckets_BNRT * T + t_T, axis=-1).astype(jnp.int32)  # sorted place -> token
  sigma_BNRT = jnp.argsort(order_BNRT, axis=-1).astype(jnp.int32)  # token -> sorted place
  pad = M * C - T

  def sorted_chunks(x_BNTX, fill):
    """[B, N, T, X...] gathered into each round's sorted order, padded, as [B, N, R, M, C, X...]."""
    x = jax.vmap(lambda o: _take(x_BNTX, o, axis=2), in_axes=2, out_axes=2)(order_BNRT)  # [B, N, R, T, X...]
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (x.ndim - 4), constant_values=fill)
    return x.reshape(B, N, R, M, C, *x.shape[4:])

  def with_neighbours(x):
    """[B, N, R, M, C, ...] -> the keys of each chunk [B, N, R, M, J, ...]: previous (, own, next) chunks."""
    fill = jnp.zeros_like(x[:, :, :, :1])
    prev = jnp.concatenate([fill, x[:, :, :, :-1]], axis=3)
    parts = [prev, x] if causal else [prev, x, jnp.concatenate([x[:, :, :, 1:], fill], axis=3)]
    return jnp.concatenate(parts, axis=4)

  # Per token: everything the visibility rule needs, about every round (for the duplicate counts).
  q_BNTH = jnp.swapaxes(qk_BTNH, 1, 2).astype(jnp.float32)
  k_BNTH = jnp.swapaxes(key_BTNH, 1, 2)
  v_BNTH = jnp.swapaxes(v_BTNH, 1, 2)
  seg_BNT = jnp.broadcast_to(segment_ids.astype(jnp.int32)[:, None], (B, N, T))
  tok_BNT = jnp.broadcast_to(t_T, (B, N, T))
  hashes_BNTR = jnp.swapaxes(buckets_BNRT, 2, 3)
  places_BNTR = jnp.swapaxes(sigma_BNRT, 2, 3)

  # Two gathers per round (floats, ints) instead of one per quantity: fewer ops to compile and dispatch.
  Hv = v_BNTH.shape[-1]
  floats = sorted_chunks(jnp.concatenate([q_BNTH, k_BNTH, v_BNTH.astype(jnp.float32)], axis=-1), 0.0)
  ints = sorted_chunks(jnp.concatenate([tok_BNT[..., None], seg_BNT[..., None], hashes_BNTR, places_BNTR], -1), -1)
  ints = ints.at[..., 1].set(jnp.maximum(ints[..., 1], 0))  # padding's segment -1 -> 0 (hidden)
  q_c = floats[..., :H]
  kv_j = with_neighbours(floats[..., H:])
  k_j, v_j = kv_j[..., :H], kv_j[..., H:H + Hv]
  ints_j = with_neighbours(ints)
  qtok, qseg, qhash, qplace = ints[..., 0], ints[..., 1], ints[..., 2:2 + R], ints[..., 2 + R:]
  ktok, kseg, khash, kplace = ints_j[..., 0], ints_j[..., 1], ints_j[..., 2:2 + R], ints_j[..., 2 + R:]

  # Visibility in every round r' of each (query, key) pair a round's chunk holds: [B, N, R, M, C, J, R'].
  same = qhash[..., :, None, :] == khash[..., None, :, :]
  gap = qplace[..., :, None, :] - kplace[..., None, :, :]
  near = (gap >= 0) & (gap < C) if causal else jnp.abs(gap) < C
  valid = ((qseg[..., :, None] == kseg[..., None, :]) & (qseg[..., :, None] != 0)
           & (qtok[..., :, None] >= 0) & (ktok[..., None, :] >= 0))
  seen = same & near & valid[..., None]
  count = jnp.sum(seen, axis=-1).astype(jnp.float32)  # rounds that see the pair: [B, N, R, M, C, J]
  own = jnp.any(seen & jnp.eye(R, dtype=bool)[:, None, None, None, :], axis=-1)  # seen in this chunk's round
  s = jnp.einsum("bnrmch,bnrmjh->bnrmcj", q_c, k_j, preferred_element_type=jnp.float32) * scale
  s = s - SELF_PENALTY * (qtok[..., :, None] == ktok[..., None, :])
  s = jnp.where(own, s - jnp.log(jnp.maximum(count, 1.0)), -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1)
  out_c = jnp.einsum("bnrmcj,bnrmjh->bnrmch", p, v_j.astype(jnp.float32)) / jnp.where(l > 0, l, 1.0)[..., None]
  lse_c = jnp.where(l > 0, m[..., 0] + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)

  # Back to token order, then the rounds combined by their log-sum-exps.
  out_BNRT = out_c.reshape(B, N, R, M * C, -1)[:, :, :, :T]
  lse_BNRT = lse_c.reshape(B, N, R, M * C)[:, :, :, :T]
  out_BNRT = _take(out_BNRT, sigma_BNRT, axis=3)
  lse_BNRT = _take(lse_BNRT, sigma_BNRT, axis=3)
  top = jax.lax.stop_gradient(jnp.max(lse_BNRT, axis=2, keepdims=True))
  w_BNRT = jnp.exp(lse_BNRT - jnp.where(jnp.isfinite(top), top, 0.0))
  w_BNRT = w_BNRT / jnp.maximum(jnp.sum(w_BNRT, axis=2, keepdims=True), 1e-30)
  out_BNTH = jnp.sum(w_BNRT[..., None] * out_BNRT, axis=2)
  return jnp.swapaxes(out_BNTH, 1, 2).astype(qk_BTNH.dtype)


def lsh_attention_step(qk_BNH: jax.Array, keys_BDNH: jax.Array, values_BDNH: jax.Array, visible_BD: jax.Array,
                       rotations_NRHU: jax.Array, *, chunk: int, scale: float | None = None) -> jax.Array:
  """One causal decoding step of `lsh_attention`, from a cache ordered by distance (D: 0 = the new token).

  `keys_BDNH` are the cached normalised keys (the new token's first), `visible_BD` the slots of this document.
  In each round the new token sees the cached tokens of its bucket whose count of same-bucket tokens from them to
  the new one is at most C; it attends to the union over rounds. The work is O(D) per step (a full cache).
  Returns [B, N, H'] in qk's dtype.
  """
  _check("lsh_attention_step", qk_BNH[:, None], values_BDNH[:, :1], rotations_NRHU, chunk)
  H = qk_BNH.shape[-1]
  scale = H ** -0.5 if scale is None else scale
  new_BNR = lsh_hash(_normalize(qk_BNH)[:, None], rotations_NRHU)[..., 0]
  cached_BNRD = lsh_hash(keys_BDNH, rotations_NRHU)
  same_BNRD = (cached_BNRD == new_BNR[..., None]) & visible_BD[:, None, None, :]
  seen_BND = jnp.any(same_BNRD & (jnp.cumsum(same_BNRD, axis=-1) <= chunk), axis=2)
  s_BND = jnp.einsum("bnh,bdnh->bnd", qk_BNH.astype(jnp.float32), keys_BDNH.astype(jnp.float32),
                     preferred_element_type=jnp.float32) * scale
  s_BND = s_BND.at[:, :, 0].add(-SELF_PENALTY)
  s_BND = jnp.where(seen_BND, s_BND, -jnp.inf)
  p_BND = jax.nn.softmax(s_BND, axis=-1)
  return jnp.einsum("bnd,bdnh->bnh", p_BND, values_BDNH.astype(jnp.float32)).astype(qk_BNH.dtype)
