"""`seqjax.load(workdir, step=None)`: a trained run's model, parameters, config and tokenizer, in one call.

    model, params, config, tokenizer = seqjax.load("runs/lm")
    out = seqjax.decode.generate(model, params, tokenizer.encode("def ", add_bos=True)[None], max_new_tokens=64)

A run directory (written by `python -m seqjax.main --mode=train`, see seqjax/train/workdir.py) holds config.json
and checkpoints/<step>/state (orbax). Only the parameters are read (not the optimizer state or the data position),
onto the default device, and no data is loaded: the tokenizer is the task's fixed one (the byte tokenizer for
task "lm", None for a synthetic task's token ids, the numbers vocabulary for "seq2seq"; other tasks are refused).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from seqjax import config as config_lib
from seqjax.config import Config, ConfigError
from seqjax.train.checkpoint import TMP_MARKER, CheckpointRestoreError, describe_shape_mismatch
from seqjax.train.checkpoint import _shapes  # pylint: disable=protected-access


def _read_config(workdir: str) -> Config:
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"seqjax.load: {workdir} is not a directory; give the --workdir of a training run")
  if not os.path.exists(path):
    raise FileNotFoundError(f"seqjax.load: {workdir} holds no config.json, so it is not the workdir of a training "
                            f"run (python -m seqjax.main --workdir=DIR writes one)")
  try:
    with open(path, encoding="utf-8") as f:
      return config_lib.from_config_dict(json.load(f))
  except (OSError, ValueError) as e:  # ConfigError is a ValueError.
    raise ConfigError(f"seqjax.load: {path} cannot be read as a config ({e}); repair it, or load another run"
                      ) from e


def _model_and_tokenizer(config: Config) -> tuple[nn.Module, Any, Config, Any]:
  """(model, example inputs for init, the config with vocabulary sizes resolved, tokenizer) of the run's task."""
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  if config.task == "lm":
    from seqjax.data import synthetic
    from seqjax.data.tokenizer import ByteTokenizer
    from seqjax.models.lm import DecoderLM
    if synthetic.is_synthetic(config.data.name):  # Token ids of a synthetic task: no tokenizer.
      from seqjax.data.synthetic.pipeline import vocab_size_of
      tokenizer, vocab_size = None, vocab_size_of(*synthetic.resolve(config.data.name)[::2])
    else:
      tokenizer = ByteTokenizer()
      vocab_size = tokenizer.vocab_size
    config = config_lib.with_vocab_size(config, vocab_size)
    return DecoderLM(config.model), (jnp.zeros((1, config.data.seq_len), jnp.int32),), config, tokenizer
  if config.task == "seq2seq":
    from seqjax.data import numbers
    from seqjax.models.seq2seq_lstm import Seq2SeqLSTM
    config = config_lib.with_seq2seq_vocab_sizes(config, numbers.VOCAB.size, numbers.VOCAB.size)
    example = (jnp.zeros((1, 4), jnp.int32), jnp.full((1,), 4, jnp.int32), jnp.zeros((1, 1), jnp.int32))
    return Seq2SeqLSTM(config.seq2seq), example, config, numbers.VOCAB
  raise ConfigError(f"seqjax.load: the run's task {config.task!r} is not one load knows (lm, seq2seq)")


def _steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit() and TMP_MARKER not in name)


def load(workdir: str, step: int | None = None) -> tuple[nn.Module, Any, Config, Any]:
  """Loads a training run: (model, params, config, tokenizer).

  Args:
    workdir: the run's directory (the --workdir it was trained with).
    step: the checkpoint to read; None: the newest one.

  Raises:
    FileNotFoundError: no such directory, no config.json, no checkpoint (or not the one asked for).
    ConfigError: an unreadable config.json.
    CheckpointRestoreError: the checkpoint cannot be read or does not match the run's config.
  """
  workdir = os.path.expanduser(workdir)
  config = _read_config(workdir)
  model, example, config, tokenizer = _model_and_tokenizer(config)
  directory = os.path.join(workdir, "checkpoints")
  steps = _steps(directory)
  if not steps:
    raise FileNotFoundError(f"seqjax.load: no checkpoint in {directory}; train first (python -m seqjax.main "
                            f"--mode=train --workdir={workdir} ...)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"seqjax.load: no checkpoint at step {step} in {directory}; it holds steps "
                            f"{', '.join(map(str, steps))}")
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *example)["params"]))
  path = os.path.join(directory, str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      stored = checkpointer.metadata(path)
      stored_params = getattr(stored, "item_metadata", stored)
      stored_params = getattr(stored_params, "tree", stored_params)["params"]
      mismatch = describe_shape_mismatch(_shapes(stored_params), _shapes(abstract))
      if mismatch:
        raise ValueError(f"its parameters do not match the run's config.json: {mismatch}")
      target = {"params": abstract}
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          target, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target),
          partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds for a damaged checkpoint)
    first = (str(e).strip().splitlines() or [""])[0][:400]
    raise CheckpointRestoreError(f"seqjax.load: the checkpoint at step {step} in {directory} cannot be read "
                                 f"({type(e).__name__}: {first}); pass step= to load another one") from e
  return model, restored["params"], config, tokenizer

