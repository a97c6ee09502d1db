"""Synthetic tasks generated locally and deterministically from a seed, as TFDS builders.

    mqar/len64_pairs4 | len128_pairs8 | len256_pairs16      Zoology's multi-query associative recall (V = 8192)
    selective_copying/len256 | len1024 | len4096            Mamba's selective copying (V = 16, 16 tokens)
    induction_heads/len256 | len64                          Mamba's induction heads, with longer test_len{L} splits
    listops/len500_2000 | len100_500 | len20_100            LRA's ListOps (10-way classification)

and TASK/small for each: a few thousand short examples, for tests and smoke runs (builds in about a second).

A dataset name is "TASK/SETTING" (a bare "TASK" is its default setting) — what `config.data.name` takes. This package
is NumPy only (configs validate names without importing TFDS); `builders.py` holds the TFDS builders and
`pipeline.py` the batches the trainer reads. The generators, their settings and exact parameters: each task's
module and docs/research.md.
"""

from __future__ import annotations

import dataclasses
import types

from seqjax.data.synthetic import induction_heads, listops, mqar, selective_copying
from seqjax.data.synthetic.base import Setting

TASKS: dict[str, types.ModuleType] = {m.NAME: m for m in (mqar, selective_copying, induction_heads, listops)}


def is_synthetic(name: str) -> bool:
  """Whether a dataset name ("mqar/len64_pairs4", "listops", ...) names a synthetic task."""
  return name.split("/")[0] in TASKS


def dataset_names() -> list[str]:
  """Every "TASK/SETTING" name."""
  return [f"{task}/{setting}" for task, module in TASKS.items() for setting in module.SETTINGS]


def resolve(name: str) -> tuple[types.ModuleType, str, Setting]:
  """"TASK[/SETTING]" -> (the task's module, the setting's name, the setting). ValueError lists the valid names."""
  task, _, setting_name = name.partition("/")
  if task not in TASKS:
    raise ValueError(f"unknown synthetic task {task!r}; tasks: {', '.join(TASKS)}")
  module = TASKS[task]
  setting_name = setting_name or module.DEFAULT
  if setting_name not in module.SETTINGS:
    raise ValueError(f"unknown setting {setting_name!r} of synthetic task {task!r}; settings: "
                     f"{', '.join(module.SETTINGS)} (e.g. {task}/{module.DEFAULT})")
  return module, setting_name, module.SETTINGS[setting_name]


def with_overrides(setting: Setting, **overrides) -> Setting:
  """A setting with some fields replaced (e.g. smaller splits, another seed), checked."""
  out = dataclasses.replace(setting, **overrides)
  out.check()
  return out


__all__ = ["TASKS", "Setting", "dataset_names", "is_synthetic", "resolve", "with_overrides"]
