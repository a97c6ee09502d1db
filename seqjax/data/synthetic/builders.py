"""The synthetic tasks as TFDS builders (array_record: no TensorFlow needed), one per task, a config per setting.

    from seqjax.data.synthetic import builders
    builder = builders.make_builder("mqar/len64_pairs4", data_dir="/tmp/tfds")    # or num_train=..., seed=...
    builder.download_and_prepare()                                                # generated locally, seeded
    source = builder.as_data_source(split="train")                                # random access

Importing this module registers the builders with TFDS under the task names (`tfds.builder("mqar/len64_pairs4",
file_format="array_record")` then works, and so does `seqjax.data.pipeline.load_builder`, which builds them on first
use because they are BUILT_LOCALLY). Features: "lm" tasks {"inputs", "targets", "loss_mask"} (int32 [T]);
"classify" tasks {"inputs" int32 [T] (each its own length), "label" (10 classes)}. Splits: train, validation, test,
and a task's extra ones (induction_heads: test_len{L}). What is generated: `seqjax.data.synthetic` and the task's
module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from seqjax.data import synthetic
from seqjax.data.synthetic import base


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  setting: Any = None  # The task's Setting (a frozen dataclass of seqjax.data.synthetic).


class SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A task of `seqjax.data.synthetic` as a TFDS builder; subclasses name the task (`TASK`)."""

  TASK: ClassVar[str]
  BUILT_LOCALLY = True  # seqjax's loader builds it on first use, without probing the network.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init_subclass__(cls, **kwargs):
    module = synthetic.TASKS[cls.TASK]
    cls.BUILDER_CONFIGS = [SyntheticConfig(name=name, description=repr(setting), setting=setting)
                           for name, setting in module.SETTINGS.items()]
    cls.DEFAULT_CONFIG_NAME = module.DEFAULT
    super().__init_subclass__(**kwargs)

  @property
  def task(self):
    return synthetic.TASKS[self.TASK]

  @property
  def setting(self) -> base.Setting:
    return self.builder_config.setting

  def _info(self) -> tfds.core.DatasetInfo:
    tokens = lambda doc: tfds.features.Tensor(shape=(None,), dtype=np.int32, doc=doc)  # noqa: E731
    if self.task.KIND == "lm":
      features = {"inputs": tokens("Input tokens."),
                  "targets": tokens("The answer at each position whose loss_mask is 1, else 0."),
                  "loss_mask": tokens("1 on answer positions (the only ones scored), else 0.")}
    else:
      features = {"inputs": tokens("Input tokens (each example its own length)."),
                  "label": tfds.features.ClassLabel(num_classes=self.task.NUM_CLASSES)}
    return tfds.core.DatasetInfo(
        builder=self, description=f"{(self.task.__doc__ or '').strip()}\n\nSetting: {self.setting!r}",
        features=tfds.features.FeaturesDict(features), disable_shuffling=True,
        homepage="https://github.com/seqjax")

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated locally.
    return {split: self._generate_examples(split) for split in self.task.split_lengths(self.setting)}

  def _generate_examples(self, split: str):
    setting = self.setting
    rng = base.split_rng(setting.seed, self.TASK, split)
    for i, example in enumerate(self.task.generate(setting, split, rng, setting.count(split))):
      yield i, example


class Mqar(SyntheticBuilder):
  """Multi-query associative recall (Zoology). See seqjax.data.synthetic.mqar."""
  TASK = "mqar"


class SelectiveCopying(SyntheticBuilder):
  """Selective copying (Mamba). See seqjax.data.synthetic.selective_copying."""
  TASK = "selective_copying"


class InductionHeads(SyntheticBuilder):
  """Induction heads with longer test lengths (Mamba). See seqjax.data.synthetic.induction_heads."""
  TASK = "induction_heads"


class Listops(SyntheticBuilder):
  """ListOps (LRA), 10-way classification. See seqjax.data.synthetic.listops."""
  TASK = "listops"


BUILDERS: dict[str, type[SyntheticBuilder]] = {cls.TASK: cls for cls in (Mqar, SelectiveCopying, InductionHeads,
                                                                           Listops)}


def make_builder(name: str, data_dir: str | os.PathLike | None = None, **overrides) -> SyntheticBuilder:
  """The builder of "TASK[/SETTING]" in array_record format (`data_dir` None: the TFDS default).

  `overrides` replace fields of the setting (e.g. num_train=64, seed=1); such a builder gets a config name of its
  own (the setting's name, "_custom_" and a hash of the fields), so it never reuses the standard one's files.
  """
  module, setting_name, setting = synthetic.resolve(name)
  setting.check()
  config: str | SyntheticConfig = setting_name
  if overrides:
    setting = synthetic.with_overrides(setting, **overrides)
    digest = hashlib.sha1(repr(setting).encode()).hexdigest()[:10]
    config = SyntheticConfig(name=f"{setting_name}_custom_{digest}", description=repr(setting), setting=setting)
  return BUILDERS[module.NAME](config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
                               file_format="array_record")
