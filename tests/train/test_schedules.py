"""Teacher-forcing schedules and the length curriculum."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.train import schedules as sch


def test_linear_schedule():
  f = sch.linear_teacher_forcing(100, floor=0.2)
  np.testing.assert_allclose([f(0), f(50), f(100), f(1000)], [1.0, 0.6, 0.2, 0.2], rtol=1e-6)


def test_exponential_schedule():
  f = sch.exponential_teacher_forcing(0.9, floor=0.1)
  np.testing.assert_allclose([f(0), f(1), f(2), f(1000)], [1.0, 0.9, 0.81, 0.1], rtol=1e-6)


def test_inverse_sigmoid_schedule():
  k = 10.0
  f = sch.inverse_sigmoid_teacher_forcing(k)
  for s in (0, 5, 30, 100):
    np.testing.assert_allclose(f(s), k / (k + np.exp(s / k)), rtol=1e-5)
  assert float(f(10 ** 6)) == 0.0  # no overflow to nan


@pytest.mark.parametrize("name, kw", [("linear", dict(decay_steps=50)),
                                      ("exponential", dict(k=0.97)),
                                      ("inverse_sigmoid", dict(k=20.0))])
def test_schedules_are_monotone_in_unit_interval_and_jittable(name, kw):
  f = sch.make_teacher_forcing_schedule(name, **kw)
  steps = jnp.arange(0, 400, 7)
  p = jax.jit(jax.vmap(f))(steps)
  assert np.all(np.diff(np.asarray(p)) <= 1e-7)
  assert np.all((p >= 0) & (p <= 1))


def test_bad_schedule_options_raise():
  with pytest.raises(ValueError, match="unknown"):
    sch.make_teacher_forcing_schedule("cosine")
  with pytest.raises(ValueError, match="k must be in"):
    sch.exponential_teacher_forcing(1.5)
  with pytest.raises(ValueError, match="decay_steps"):
    sch.linear_teacher_forcing(0)


def test_length_curriculum_grows_from_start_to_end():
  c = sch.LengthCurriculum(start=8, end=40, warmup_steps=100, every=8)
  values = [c(s) for s in range(0, 150)]
  assert values[0] == 8 and values[-1] == 40 and c(100) == 40
  assert all(b >= a for a, b in zip(values, values[1:]))
  assert all(v == 40 or (v - 8) % 8 == 0 for v in values)
  assert c(50) == 24  # 8 + 32 * 0.5 = 24
  with pytest.raises(ValueError, match="start <= end"):
    sch.LengthCurriculum(start=10, end=5, warmup_steps=10)
