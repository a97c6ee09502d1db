"""The task registry and interface: every registered task implements the whole `Task` interface; names and data
positions that are not a task's are refused with a message naming what to do."""

import inspect

import pytest

from seqjax.config import Config, ConfigError
from seqjax.train.task import Task
from seqjax.train.tasks import TASKS, get_task
from seqjax.train.tasks.seq2seq import Seq2SeqTask


def test_every_config_task_is_registered_and_complete():
  names = Config.__dataclass_fields__["task"].type  # The Literal of config.task (a string under __future__).
  for name in TASKS:
    assert repr(name) in names
    cls = get_task(name)
    assert issubclass(cls, Task) and cls.name == name
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves abstract methods unimplemented"


def test_unknown_task_names_the_field():
  with pytest.raises(ConfigError, match=r"config\.task: unknown task 'translate'; registered: classify, lm, seq2seq"):
    get_task("translate")


def test_seq2seq_refuses_a_data_position_that_is_not_its_batch_index():
  task = Seq2SeqTask.__new__(Seq2SeqTask)  # The check comes before any data is touched.
  with pytest.raises(ConfigError, match=r"holds data position \{'position': 7\}, not this task's batch index"):
    task.train_stream(4, {"position": 7})
  with pytest.raises(ConfigError, match="another task"):
    task.train_stream(4, {"next_batch": 3})
