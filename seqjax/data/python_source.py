"""TFDS builder ``python_source``: the running interpreter's standard library as a text corpus.

Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages and dist-packages
excluded) is one example ``{"text": <file bytes>, "path": <relative posix path>}``. A file's split
is fixed by the sha256 of its relative path (90 % train, 5 % validation, 5 % test), so splits are
disjoint, deterministic and stable when files are added or removed. Building needs no network and
takes a few seconds (~1800 files, ~32 MB on CPython 3.11); it is written in ``array_record`` format,
so no TensorFlow is needed to build or read it.

Configs:
  * ``python_source/full`` (default) — the whole standard library.
  * ``python_source/small`` — a fixed, small subset (the first few files of each split in hash
    order, each at most 32 KiB), for tests and smoke runs; builds in about a second.

The corpus is whatever the running interpreter ships: a data dir built under Python 3.11 and read
under 3.12 keeps the 3.11 files (the Python version is recorded in the dataset description).

Usage::

    from seqjax.data import python_source
    builder = python_source.make_builder(data_dir="/tmp/tfds", config="small")
    builder.download_and_prepare()
    source = builder.as_data_source(split="train")   # random access, array_record
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import sysconfig

import tensorflow_datasets as tfds

# Split boundaries on the hash bucket in [0, 100): bucket < 90 -> train, < 95 -> validation, else test.
_SPLIT_BUCKETS = (("train", 0, 90), ("validation", 90, 95), ("test", 95, 100))
# Files per split in the `small` config, and its per-file size cap.
_SMALL_FILES = {"train": 48, "validation": 8, "test": 8}
_SMALL_MAX_BYTES = 32 * 1024
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_dir() -> pathlib.Path:
  """The standard-library directory of the running interpreter."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def path_hash(relpath: str) -> int:
  """A stable 64-bit hash of a relative path (sha256 prefix); the same on every machine."""
  return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")


def split_of(relpath: str) -> str:
  """The split ("train", "validation" or "test") that the file ``relpath`` belongs to."""
  bucket = path_hash(relpath) % 100
  for name, lo, hi in _SPLIT_BUCKETS:
    if lo <= bucket < hi:
      return name
  raise AssertionError(bucket)  # unreachable: buckets cover [0, 100)


def list_source_files(root: pathlib.Path | None = None) -> list[str]:
  """Sorted relative posix paths of every ``.py`` file under ``root`` (default: the stdlib).

  Skips site-packages, dist-packages and __pycache__ directories, and symlinks to files outside
  ``root``.
  """
  root = stdlib_dir() if root is None else pathlib.Path(root)
  if not root.is_dir():
    raise ValueError(f"python_source: the standard-library directory {root} does not exist.")
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for fname in filenames:
      if fname.endswith(".py"):
        full = pathlib.Path(dirpath) / fname
        if full.is_file():
          out.append(full.relative_to(root).as_posix())
  return sorted(out)


def files_by_split(config_name: str, root: pathlib.Path | None = None) -> dict[str, list[str]]:
  """Relative paths per split for a builder config ("full" or "small"), in a fixed order.

  "full" lists files in path order; "small" takes, per split, the first files in hash order
  whose size is at most 32 KiB.
  """
  root = stdlib_dir() if root is None else pathlib.Path(root)
  splits: dict[str, list[str]] = {name: [] for name, _, _ in _SPLIT_BUCKETS}
  for rel in list_source_files(root):
    splits[split_of(rel)].append(rel)
  if config_name == "full":
    return splits
  if config_name == "small":
    small = {}
    for name, rels in splits.items():
      chosen = []
      for rel in sorted(rels, key=lambda r: (path_hash(r), r)):
        if (root / rel).stat().st_size <= _SMALL_MAX_BYTES:
          chosen.append(rel)
          if len(chosen) == _SMALL_FILES[name]:
            break
      small[name] = sorted(chosen)
    return small
  raise ValueError(f"python_source: unknown config {config_name!r}; use 'full' or 'small'.")


class PythonSource(tfds.core.GeneratorBasedBuilder):
  """The .py files of the running interpreter's standard library (see the module docstring)."""

  BUILT_LOCALLY = True  # seqjax's loader builds it without probing the network
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="full", description="Every .py file of the stdlib."),
      tfds.core.BuilderConfig(
          name="small", description="A fixed small subset (48/8/8 files of <= 32 KiB)."),
  ]
  DEFAULT_CONFIG_NAME = "full"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Python source files of the standard library of the interpreter that built the "
            f"dataset (Python {platform.python_version()}, {platform.python_implementation()}). "
            "Split by sha256 of the relative path: 90% train, 5% validation, 5% test."),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(doc="The file's raw bytes (usually UTF-8)."),
            "path": tfds.features.Text(doc="Path relative to the stdlib directory."),
        }),
        disable_shuffling=True,  # examples are written in sorted path order
        homepage="https://docs.python.org/3/library/",
        license="PSF-2.0 (Python Software Foundation License)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    root = stdlib_dir()
    splits = files_by_split(self.builder_config.name, root)
    return {name: self._generate_examples(root, rels) for name, rels in splits.items()}

  def _generate_examples(self, root: pathlib.Path, rels: list[str]):
    for rel in rels:
      yield rel, {"text": (root / rel).read_bytes(), "path": rel}


def make_builder(data_dir: str | os.PathLike | None = None, config: str = "full") -> PythonSource:
  """A ``PythonSource`` builder in array_record format (``data_dir`` None -> TFDS default)."""
  if config not in {c.name for c in PythonSource.BUILDER_CONFIGS}:
    raise ValueError(f"python_source: unknown config {config!r}; use 'full' or 'small'.")
  return PythonSource(config=config, data_dir=None if data_dir is None else os.fspath(data_dir),
                      file_format="array_record")
