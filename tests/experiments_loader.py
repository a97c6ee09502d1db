"""Loads a script from experiments/ as a module for a test, and removes the absl flags it defined afterwards
(several experiment scripts define flags such as --config; in one test process they would otherwise clash)."""

import contextlib
import importlib.util
import pathlib
import sys

from absl import flags

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


@contextlib.contextmanager
def load_experiment(name: str):
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the class is built.
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.modules.pop(name, None)
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
