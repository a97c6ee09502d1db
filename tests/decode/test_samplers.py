"""The samplers on fixed logits: top-k / top-p / min-p keep exactly the sets a plain NumPy oracle (float64 sorting)
keeps, composed in the documented order; sampled frequencies match the filtered distribution; greedy is the
argmax; draws are seeded and per row; bad settings are clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax.decode.samplers import Sampler

V = 12


def _logits(seed, batch=4, vocab=V):
  return np.random.default_rng(seed).normal(0.0, 2.0, size=(batch, vocab)).astype(np.float32)


def _softmax64(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x[np.isfinite(x)].max())
  return e / e.sum()


def _oracle_keep(row, temperature, top_k, top_p, min_p):
  """The kept token set of one row, in float64 with plain sorting, filters in the documented order."""
  x = np.asarray(row, np.float64) / temperature
  keep = np.ones(x.shape, bool)
  order = np.argsort(-x, kind="stable")
  if top_k:
    keep[:] = False
    keep[order[:top_k]] = True
  if top_p < 1.0:
    p = _softmax64(np.where(keep, x, -np.inf))
    ranked = order[keep[order]]
    total, nucleus = 0.0, []
    for token in ranked:
      nucleus.append(token)
      total += p[token]
      if total >= top_p:
        break
    keep[:] = False
    keep[nucleus] = True
  if min_p > 0.0:
    p = _softmax64(np.where(keep, x, -np.inf))
    keep &= p >= min_p * p.max()
  return keep


def _margins_ok(row, temperature, top_k, top_p, min_p):
  """False when a threshold falls within float32 rounding of a cumulative sum or a ratio (an ambiguous set)."""
  x = np.asarray(row, np.float64) / temperature
  keep = _oracle_keep(row, temperature, top_k, 1.0, 0.0)
  p = _softmax64(np.where(keep, x, -np.inf))
  cums = np.cumsum(np.sort(p)[::-1])
  if top_p < 1.0 and np.min(np.abs(cums - top_p)) < 1e-4:
    return False
  keep = _oracle_keep(row, temperature, top_k, top_p, 0.0)
  p = _softmax64(np.where(keep, x, -np.inf))
  return not (min_p > 0 and np.min(np.abs(p[keep] / p.max() - min_p)) < 1e-4)


SETTINGS = {
    "top_k_1": (1.0, 1, 1.0, 0.0),
    "top_k_3": (1.0, 3, 1.0, 0.0),
    "top_k_all": (0.7, V, 1.0, 0.0),
    "top_p_0.3": (1.0, 0, 0.3, 0.0),
    "top_p_0.9": (1.0, 0, 0.9, 0.0),
    "top_p_tiny": (1.0, 0, 1e-3, 0.0),
    "min_p_0.1": (1.0, 0, 1.0, 0.1),
    "min_p_0.5_hot": (2.5, 0, 1.0, 0.5),
    "temperature_top_k_top_p": (0.6, 5, 0.8, 0.0),
    "all_four": (1.3, 6, 0.85, 0.05),
    "top_p_after_top_k": (1.0, 4, 0.7, 0.0),
}


class FilterTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name, *values) for name, values in SETTINGS.items()])
  def test_filters_keep_exactly_the_oracle_set(self, temperature, top_k, top_p, min_p):
    sampler = Sampler(temperature, top_k, top_p, min_p)
    checked = 0
    for seed in range(6):
      logits = _logits(seed)
      filtered = np.asarray(jax.jit(sampler.filter)(jnp.asarray(logits)))
      for row, out in zip(logits, filtered):
        if not _margins_ok(row, temperature, top_k, top_p, min_p):
          continue
        keep = _oracle_keep(row, temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(out), keep, err_msg=f"row {row}")
        np.testing.assert_allclose(out[keep], row[keep] / temperature, rtol=1e-6)
        checked += 1
    assert checked >= 12, "too few unambiguous rows to check"

  def test_top_p_keeps_the_smallest_nucleus_by_hand(self):
    probs = np.asarray([0.5, 0.25, 0.15, 0.1])
    logits = jnp.asarray(np.log(probs)[None], jnp.float32)
    for top_p, kept in ((0.4, 1), (0.6, 2), (0.74, 2), (0.8, 3), (0.95, 4)):
      out = np.asarray(Sampler(1.0, 0, top_p, 0.0).filter(logits))[0]
      assert np.isfinite(out).sum() == kept, (top_p, out)

  def test_ties_at_the_boundary_are_kept(self):
    logits = jnp.asarray([[3.0, 1.0, 1.0, 0.0]])
    assert np.isfinite(np.asarray(Sampler(1.0, 2).filter(logits))).sum() == 3
    # The nucleus of mass 0.8 ends on one of the two tied tokens: both are kept.
    assert np.isfinite(np.asarray(Sampler(1.0, 0, 0.8).filter(logits))).sum() == 3


@pytest.mark.parametrize("name", ["top_k_3", "top_p_0.9", "min_p_0.1", "all_four"])
def test_sampled_frequencies_match_the_filtered_distribution(name):
  temperature, top_k, top_p, min_p = SETTINGS[name]
  row = _logits(7, batch=1)[0]
  n = 40_000
  logits = jnp.broadcast_to(jnp.asarray(row), (n, V))
  draws = np.asarray(jax.jit(Sampler(temperature, top_k, top_p, min_p).__call__)(logits, jax.random.key(0)))
  counts = np.bincount(draws, minlength=V)
  keep = _oracle_keep(row, temperature, top_k, top_p, min_p)
  expected = _softmax64(np.where(keep, row / temperature, -np.inf))
  assert np.all(counts[~keep] == 0), "a filtered-out token was drawn"
  sigma = np.sqrt(expected * (1 - expected) / n)
  np.testing.assert_array_less(np.abs(counts / n - expected), 5 * sigma + 1e-9)


def test_greedy_is_the_argmax_and_draws_are_seeded_per_row():
  logits = jnp.asarray(_logits(3, batch=64))
  np.testing.assert_array_equal(Sampler()(logits, None), np.argmax(np.asarray(logits), -1))
  s = Sampler(1.0)
  a, b, c = s(logits, jax.random.key(1)), s(logits, jax.random.key(1)), s(logits, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Identical rows draw independently.
  same = s(jnp.broadcast_to(logits[0], (64, V)), jax.random.key(1))
  assert len(set(np.asarray(same).tolist())) > 1


@pytest.mark.parametrize("sampler, message", [
    (Sampler(1.0, top_p=0.0), "top_p must be in"),
    (Sampler(1.0, top_p=1.01), "top_p must be in"),
    (Sampler(1.0, top_k=-2), "top_k must be"),
    (Sampler(1.0, top_k=V + 1), "larger than the vocabulary"),
    (Sampler(1.0, min_p=-0.1), "min_p must be in"),
    (Sampler(float("nan")), "temperature must be"),
])
def test_bad_settings_are_clear_errors(sampler, message):
  with pytest.raises(ValueError, match=message):
    sampler.check(V)
