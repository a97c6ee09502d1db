"""The tasks the training loop can run, by `config.task` name (the interface: `seqjax.train.task.Task`).

Each is imported only when asked for, so that choosing one does not import the others' data and models.
"""

from __future__ import annotations

import importlib

from seqjax.config import ConfigError
from seqjax.train.task import Task

TASKS = {
    "lm": "seqjax.train.tasks.lm:LMTask",
    "seq2seq": "seqjax.train.tasks.seq2seq:Seq2SeqTask",
    "classify": "seqjax.train.tasks.classify:ClassifyTask",
}


def get_task(name: str) -> type[Task]:
  """The Task class registered as `name` (ConfigError naming config.task if there is none)."""
  if name not in TASKS:
    raise ConfigError(f"config.task: unknown task {name!r}; registered: {', '.join(sorted(TASKS))}")
  module, _, cls = TASKS[name].partition(":")
  return getattr(importlib.import_module(module), cls)
