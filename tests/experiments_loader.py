"""Loads a script from experiments/ as a module for a test, and removes the absl flags it defined afterwards
(several experiment scripts define flags such as --config; in one test process they would otherwise clash). Flags
of the same names defined by modules imported earlier in the process (e.g. `seqjax.main`'s --config) are set aside
while the script is loaded and put back afterwards."""

import contextlib
import importlib.util
import pathlib
import re
import sys

from absl import flags

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


@contextlib.contextmanager
def load_experiment(name: str):
  path = EXPERIMENTS / f"{name}.py"
  defined = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", path.read_text()))
  set_aside = {flag: flags.FLAGS[flag] for flag in defined if flag in flags.FLAGS}
  for flag in set_aside:
    delattr(flags.FLAGS, flag)
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the class is built.
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.modules.pop(name, None)
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
    for flag, value in set_aside.items():
      flags.FLAGS[flag] = value
