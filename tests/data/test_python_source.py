"""Tests for the `python_source` TFDS builder: determinism, split disjointness, content."""
import hashlib
import pathlib

import pytest

from seqjax.data import python_source

SPLITS = ("train", "validation", "test")


def read_split(data_dir, config, split):
  src = python_source.make_builder(data_dir, config).as_data_source(split=split)
  return [(src[i]["path"].decode(), src[i]["text"]) for i in range(len(src))]


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("full")
  python_source.make_builder(d, "full").download_and_prepare()
  return d


def test_split_assignment_is_a_stable_hash_of_the_path():
  # Fixed expectations: changing the hash or the bucket boundaries changes every dataset.
  assert python_source.path_hash("os.py") == int.from_bytes(
      __import__("hashlib").sha256(b"os.py").digest()[:8], "big")
  counts = {s: 0 for s in SPLITS}
  for i in range(4000):
    counts[python_source.split_of(f"pkg/module_{i}.py")] += 1
  assert 0.87 < counts["train"] / 4000 < 0.93
  assert 0.03 < counts["validation"] / 4000 < 0.07
  assert 0.03 < counts["test"] / 4000 < 0.07


def test_listing_excludes_site_packages(tmp_path):
  for rel in ["a.py", "pkg/b.py", "site-packages/c.py", "dist-packages/d.py",
              "pkg/__pycache__/e.py", "pkg/notes.txt"]:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x = 1\n")
  assert python_source.list_source_files(tmp_path) == ["a.py", "pkg/b.py"]


def test_full_build_covers_the_stdlib_with_disjoint_splits(full_dir):
  root = python_source.stdlib_dir()
  expected = python_source.list_source_files(root)
  assert len(expected) > 500
  assert not any("site-packages" in p for p in expected)
  seen = {}
  for split in SPLITS:
    rows = read_split(full_dir, "full", split)
    assert rows, split
    for path, text in rows:
      assert python_source.split_of(path) == split
      assert path not in seen, f"{path} is in {seen.get(path)} and {split}"
      seen[path] = split
  assert sorted(seen) == expected
  # Content is the file's raw bytes, including files that are not valid UTF-8.
  for path, text in read_split(full_dir, "full", "validation")[:20]:
    assert text == (root / path).read_bytes()


@pytest.mark.parametrize("config", ["small", "full"])
def test_builds_are_deterministic(full_dir, tmp_path, config):
  dirs = []
  for name in ["a", "b"]:
    if config == "full" and name == "a":
      dirs.append(full_dir)  # already built by the fixture
      continue
    python_source.make_builder(tmp_path / name, config).download_and_prepare()
    dirs.append(tmp_path / name)
  for split in SPLITS:
    assert read_split(dirs[0], config, split) == read_split(dirs[1], config, split)
  files = [sorted(pathlib.Path(python_source.make_builder(d, config).data_dir).glob("*.array_record*"))
           for d in dirs]
  assert len(files[0]) == len(files[1]) >= 3
  for f0, f1 in zip(*files):
    assert f0.name == f1.name and f0.read_bytes() == f1.read_bytes()


def test_small_config_is_a_fixed_small_subset(tmp_path):
  python_source.make_builder(tmp_path, "small").download_and_prepare()
  full = python_source.files_by_split("full")
  sizes = {"train": 48, "validation": 8, "test": 8}
  for split in SPLITS:
    rows = read_split(tmp_path, "small", split)
    assert len(rows) == sizes[split]
    for path, text in rows:
      assert path in full[split] and len(text) <= 32 * 1024
  # The subset by its definition, written here with python_source's file listing only: per split (sha256 bucket of
  # the path), the first files in (hash, path) order that are at most 32 KiB, listed sorted by path. (Catches, when
  # planted in files_by_split: the files taken in path order, a 320 KiB cap; the self-comparison it replaces did not.)
  root = python_source.stdlib_dir()
  listing = python_source.list_source_files(root)
  key = lambda rel: (int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big"), rel)  # noqa: E731
  bounds = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}
  small = python_source.files_by_split("small")
  for split, (lo, hi) in bounds.items():
    eligible = sorted((rel for rel in listing
                       if lo <= key(rel)[0] % 100 < hi and (root / rel).stat().st_size <= 32 * 1024), key=key)
    assert small[split] == sorted(eligible[:sizes[split]]), split
    assert sorted(path for path, _ in read_split(tmp_path, "small", split)) == small[split], split


def test_unknown_config_raises():
  with pytest.raises(ValueError, match="'huge'"):
    python_source.make_builder(None, "huge")
