r"""Command-line entry: train, evaluate or sample from a config.

  python -m seqjax.main --config=configs/lm_pysrc.py[:smoke] --workdir=DIR [--mode=train|eval|generate] \
      [--config.train.num_steps=100 ...] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Every field of the config can be overridden with --config.SECTION.FIELD=VALUE. The config is validated before
anything is built; user errors (a bad config or override, a workdir holding another config's run, missing or
unusable data, no readable checkpoint) print one message naming the problem and exit with status 2, without a
traceback. A run stopped by a non-finite loss (train.on_nan="stop") exits with status 3 after writing
WORKDIR/nonfinite_report.json. SIGTERM/SIGINT save a checkpoint and exit 0; rerunning the command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from seqjax.config import ConfigError, from_config_dict
from seqjax.train import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file, optionally :variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots (resumed if it "
                               "holds a run).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate"], "What to do.")
# Multi-host: one process per host (see seqjax/train/distributed.py).
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run, detecting the cluster "
                                 "(Cloud TPU VMs, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process run: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index.")


EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3


def _user_error(message: str, status: int = EXIT_USER_ERROR) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _without_traceback(message: str) -> str:
  """A flag error whose text embeds a traceback (an error raised in a config file's get_config): its first line
  and the error's own message."""
  head, sep, trace = message.partition("Traceback (most recent call last):")
  if not sep:
    return message
  last = [line for line in trace.splitlines() if line.strip()][-1]
  kind, colon, text = last.partition(": ")
  return f"{head.strip()} {text if colon and kind.replace('.', '').isidentifier() else last}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose user errors (unknown config field, bad value, missing file) end in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _user_error(f"{_without_traceback(str(e))}\nFields exist as in the config file; see `python -m seqjax.main "
                f"--helpfull`.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _user_error(f"bad --config override: {e}. Check the field's spelling and type against the config file.")
  return []


def run(mode: str, cfg_dict, workdir: str,
        multiprocess: distributed.DistributedSpec = distributed.DistributedSpec()) -> dict | list[str]:
  """Validates the config, joins the other processes of a multi-process run (if any), then runs `mode`.
  Importable (tests and notebooks call it)."""
  config = from_config_dict(cfg_dict)  # config errors first, before joining (and waiting for) other processes
  distributed.initialize(multiprocess)
  apply_cpu_kernels(config.cpu_kernels)
  import_extensions(config)
  # Heavy imports only after validation. One loop for every task (config.task).
  from seqjax.train import loop  # pylint: disable=import-outside-toplevel
  if mode == "train":
    return loop.train(config, workdir)
  if mode == "eval":
    return loop.evaluate_checkpoint(config, workdir)
  return loop.generate(config, workdir)


def import_extensions(config) -> None:
  """Imports `config.imports` (modules registering mixers or attention kernels of the user's own), then checks that
  every mixer named in `config.model.mixer` is registered: a ConfigError naming the field, before any data are read
  or anything is compiled."""
  import importlib  # pylint: disable=import-outside-toplevel
  for module in config.import_modules:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f"config.imports: cannot import {module!r} ({e}); name a module importable from the working "
                        f"directory or installed in the environment") from e
  if config.task != "seq2seq":  # the tasks whose model is a stack of model.mixer
    from seqjax.nn.mixers import available_mixers  # pylint: disable=import-outside-toplevel
    unknown = [m for m in dict.fromkeys(config.model.mixer_pattern) if m not in available_mixers()]
    if unknown:
      raise ConfigError(f"config.model.mixer: unknown mixer {', '.join(map(repr, unknown))}; registered: "
                        f"{', '.join(available_mixers())}. A mixer of your own is registered by a module named in "
                        f"config.imports (docs/new_mixer.md)")


def apply_cpu_kernels(mode: str) -> None:
  """Sets config.cpu_kernels ("auto" | "on" | "off") for every op built or traced afterwards."""
  from seqjax.ops.backend import set_cpu_kernels  # pylint: disable=import-outside-toplevel
  set_cpu_kernels(mode)


def _exit_status(error: Exception) -> int | None:
  """The exit status of an error that is the user's to fix (no traceback), or None for a bug (traceback)."""
  if isinstance(error, (ConfigError, FileNotFoundError, distributed.DistributedConfigError)):
    return EXIT_USER_ERROR
  # Heavy modules are imported only here: a config error above must not wait for them.
  from seqjax.data.pipeline import DataUnavailableError  # pylint: disable=import-outside-toplevel
  from seqjax.train.checkpoint import CheckpointRestoreError  # pylint: disable=import-outside-toplevel
  from seqjax.train.nonfinite import NonFiniteError  # pylint: disable=import-outside-toplevel
  if isinstance(error, (DataUnavailableError, CheckpointRestoreError)):
    return EXIT_USER_ERROR
  if type(error).__name__ == "CpuKernelBuildError":  # cpu_kernels="on" without a working C++ toolchain.
    return EXIT_USER_ERROR
  if isinstance(error, NonFiniteError):
    return EXIT_NONFINITE
  return None


def main(argv: list[str]) -> None:
  del argv
  if _CONFIG.value is None or _WORKDIR.value is None:
    _user_error("both --config=configs/NAME.py[:variant] and --workdir=DIR are required")
  for noisy in ("jax._src.xla_bridge", "absl"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger("seqjax").setLevel(logging.INFO)
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    multiprocess = distributed.make_spec(auto=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                                         num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    result = run(_MODE.value, _CONFIG.value, workdir, multiprocess)
  except Exception as e:  # pylint: disable=broad-except
    status = _exit_status(e)
    if status is None:
      raise
    _user_error(str(e), status)
  if _MODE.value == "generate":
    for i, text in enumerate(result):
      print(f"--- sample {i} ---\n{text}")
  else:
    print(json.dumps(result, indent=2, sort_keys=True))
  if _MODE.value == "train" and "preempted" not in result:
    print(f"workdir: {workdir}\n  final metrics: {os.path.join(workdir, 'final_metrics.json')}\n"
          f"  curves:        {os.path.join(workdir, 'curves.png')}\n"
          f"  tensorboard:   tensorboard --logdir {os.path.join(workdir, 'tensorboard')}\n"
          f"  checkpoints:   {os.path.join(workdir, 'checkpoints')}")


def entry() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
