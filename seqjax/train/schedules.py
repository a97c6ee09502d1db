"""Schedules for seq2seq training: the teacher-forcing probability and the length curriculum.

All are pure functions of the (integer) training step, usable on Python ints or traced jnp scalars
inside a jitted train step.

Teacher-forcing probability p(step) (scheduled sampling, Bengio et al. 2015), decaying from 1:
  * linear:            p = max(floor, 1 - (1 - floor) * step / decay_steps)
  * exponential:       p = max(floor, k ** step),  0 < k < 1
  * inverse sigmoid:   p = k / (k + exp(step / k)), k >= 1 (slow start, then fast decay)

Length curriculum: the largest target length allowed at a step, growing from `start` to `end`
linearly over `warmup_steps` in increments of `every` tokens (start short, grow).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

Schedule = Callable[[object], object]


def _check_floor(floor: float):
  if not 0.0 <= floor <= 1.0:
    raise ValueError(f"floor must be in [0, 1], got {floor}.")


def linear_teacher_forcing(decay_steps: int, floor: float = 0.0) -> Schedule:
  """p falls linearly from 1 at step 0 to `floor` at `decay_steps`, then stays."""
  if decay_steps <= 0:
    raise ValueError(f"decay_steps must be > 0, got {decay_steps}.")
  _check_floor(floor)

  def schedule(step):
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)
    return 1.0 - (1.0 - floor) * frac

  return schedule


def exponential_teacher_forcing(k: float, floor: float = 0.0) -> Schedule:
  """p = max(floor, k ** step) with 0 < k < 1 (e.g. 0.999)."""
  if not 0.0 < k < 1.0:
    raise ValueError(f"exponential decay base k must be in (0, 1), got {k}.")
  _check_floor(floor)

  def schedule(step):
    return jnp.maximum(floor, jnp.power(k, jnp.asarray(step, jnp.float32)))

  return schedule


def inverse_sigmoid_teacher_forcing(k: float, floor: float = 0.0) -> Schedule:
  """p = max(floor, k / (k + exp(step / k))) with k >= 1; p(0) = k / (k + 1)."""
  if k < 1.0:
    raise ValueError(f"inverse-sigmoid k must be >= 1, got {k}.")
  _check_floor(floor)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    # k / (k + exp(s / k)) == sigmoid(log k - s / k), written to avoid overflow for large s.
    p = 1.0 / (1.0 + jnp.exp(s / k - jnp.log(k)))
    return jnp.maximum(floor, p)

  return schedule


def constant_teacher_forcing(p: float = 1.0) -> Schedule:
  """Always `p` (1.0 = plain teacher forcing)."""
  _check_floor(p)
  return lambda step: jnp.asarray(p, jnp.float32)


TEACHER_FORCING_SCHEDULES = {
    "constant": constant_teacher_forcing,
    "linear": linear_teacher_forcing,
    "exponential": exponential_teacher_forcing,
    "inverse_sigmoid": inverse_sigmoid_teacher_forcing,
}


def make_teacher_forcing_schedule(name: str, **kwargs) -> Schedule:
  """Look up a schedule by name ("constant", "linear", "exponential", "inverse_sigmoid")."""
  if name not in TEACHER_FORCING_SCHEDULES:
    raise ValueError(f"unknown teacher-forcing schedule {name!r}; choose one of "
                     f"{sorted(TEACHER_FORCING_SCHEDULES)}.")
  return TEACHER_FORCING_SCHEDULES[name](**kwargs)


@dataclasses.dataclass(frozen=True)
class LengthCurriculum:
  """Max allowed target length as a function of step: `start` at step 0, `end` from
  `warmup_steps` on, growing linearly, rounded down to multiples of `every` above `start`."""

  start: int
  end: int
  warmup_steps: int
  every: int = 1

  def __post_init__(self):
    if not 1 <= self.start <= self.end:
      raise ValueError(f"need 1 <= start <= end, got start={self.start}, end={self.end}.")
    if self.warmup_steps < 0 or self.every < 1:
      raise ValueError(f"need warmup_steps >= 0 and every >= 1, got {self.warmup_steps}, "
                       f"{self.every}.")

  def __call__(self, step: int) -> int:
    """Python int in, Python int out (the data pipeline filters on it)."""
    if self.warmup_steps == 0 or step >= self.warmup_steps:
      return self.end
    grown = (self.end - self.start) * max(step, 0) / self.warmup_steps
    return min(self.end, self.start + int(grown) // self.every * self.every)
