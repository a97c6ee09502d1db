"""Sinusoidal tables, RoPE (and its scalings), ALiBi slopes and the per-tile ALiBi bias."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops.attention import positions


def test_sinusoidal_values():
  pos = jnp.array([[0, 1, 5]])
  table = positions.sinusoidal(pos, 8)
  assert table.shape == (1, 3, 8)
  inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  want = np.concatenate([np.sin(5 * inv), np.cos(5 * inv)])
  np.testing.assert_allclose(table[0, 2], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(table[0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
  with pytest.raises(ValueError, match="even"):
    positions.sinusoidal(pos, 7)


def _rope_numpy(x, pos, base):
  """Rotate pairs (h, h + H/2) by pos * base^(-2h/H)."""
  h = x.shape[-1] // 2
  inv = base ** (-np.arange(0, 2 * h, 2) / (2 * h))
  ang = pos[..., None, None] * inv
  x1, x2 = x[..., :h], x[..., h:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


class RopeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_rope_matches_numpy_and_preserves_norm(self):
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 3, 8)))
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    got = self.variant(functools.partial(positions.apply_rope, base=500.0))(jnp.asarray(x), jnp.asarray(pos))
    chex.assert_shape(got, x.shape)
    chex.assert_trees_all_close(got, _rope_numpy(x, pos, 500.0).astype(np.float32), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))

  def score(m, n):
    return jnp.sum(positions.apply_rope(q, jnp.array([[m]])) * positions.apply_rope(k, jnp.array([[n]])))

  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)
  assert abs(float(score(7, 3)) - float(score(7, 4))) > 1e-4


def test_rope_scaling():
  x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  pos = jnp.arange(4)[None] * 4
  linear = positions.apply_rope(x, pos, scaling=("linear", 4.0))
  np.testing.assert_allclose(linear, positions.apply_rope(x, pos // 4), rtol=1e-5, atol=1e-6)
  ntk = positions.apply_rope(x, pos, base=10000.0, scaling=("ntk", 2.0))
  np.testing.assert_allclose(ntk, positions.apply_rope(x, pos, base=10000.0 * 2.0 ** (8 / 6)), rtol=1e-5,
                             atol=1e-6)
  for bad in [("cubic", 2.0), ("linear", 0.5), 3.0]:
    with pytest.raises(ValueError, match="scaling"):
      positions.apply_rope(x, pos, scaling=bad)
  with pytest.raises(ValueError, match="positions"):
    positions.apply_rope(x, jnp.arange(5)[None])


def test_rope_keeps_dtype():
  x = jnp.ones((1, 3, 1, 4), jnp.bfloat16)
  assert positions.apply_rope(x, jnp.arange(3)[None]).dtype == jnp.bfloat16


def test_alibi_slopes():
  np.testing.assert_allclose(positions.alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-6)
  # 6 heads: the 4-head slopes then every other 8-head slope.
  np.testing.assert_allclose(positions.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3],
                             rtol=1e-6)
  with pytest.raises(ValueError):
    positions.alibi_slopes(0)


def test_alibi_bias_block_and_shift():
  slopes = jnp.array([0.5, 0.25])
  bias = positions.AlibiBias(slopes)
  full = bias.block(jnp.arange(4), jnp.arange(6))
  assert full.shape == (1, 2, 4, 6)
  want = -np.array([0.5, 0.25])[:, None, None] * np.abs(np.arange(4)[:, None] - np.arange(6)[None])
  np.testing.assert_allclose(full[0], want)
  shifted = bias.shift(q_offset=2).block(jnp.arange(2), jnp.arange(6))
  np.testing.assert_allclose(shifted, full[:, :, 2:4])
  tile = bias.block(jnp.arange(1, 3), jnp.arange(3, 6))
  np.testing.assert_allclose(tile, full[:, :, 1:3, 3:6])
