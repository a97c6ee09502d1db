"""The synthetic tasks' TFDS builders: deterministic by seed, answers recomputed by each task's independent checker,
split sizes and lengths as configured, the paper's parameters, and the sampling helper against exact probabilities.
"""

import collections
import dataclasses
import json
import itertools

import numpy as np
import pytest

from seqjax.data import synthetic
from seqjax.data.synthetic import base, builders, induction_heads, listops, mqar, selective_copying

SMALL = {"num_train": 48, "num_validation": 12, "num_test": 8}
# One setting per task, small enough to build in about a second.
CASES = {
    "mqar": ("mqar/len64_pairs4", {}),
    "selective_copying": ("selective_copying/len256", {}),
    "induction_heads": ("induction_heads/len64", {}),
    "listops": ("listops/len20_100", {}),
}


def read_all(builder):
  out = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    out[split] = source.__getitems__(list(range(len(source))))
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """{task: (builder, {split: examples})} for every case, built once."""
  out = {}
  for task, (name, extra) in CASES.items():
    builder = builders.make_builder(name, tmp_path_factory.mktemp(task), **SMALL, **extra)
    builder.download_and_prepare()
    out[task] = (builder, read_all(builder))
  return out


def assert_splits_equal(a, b):
  assert a.keys() == b.keys()
  for split in a:
    assert len(a[split]) == len(b[split])
    for x, y in zip(a[split], b[split]):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=f"{split}/{k}")


@pytest.mark.parametrize("task", list(CASES))
def test_deterministic_by_seed(task, built, tmp_path):
  """Catches: unseeded draws (two builds differ) and a seed that is ignored (another seed gives the same data)."""
  name, extra = CASES[task]
  again = builders.make_builder(name, tmp_path / "again", **SMALL, **extra)
  again.download_and_prepare()
  assert_splits_equal(built[task][1], read_all(again))
  other = builders.make_builder(name, tmp_path / "other", **SMALL, **extra, seed=1)
  other.download_and_prepare()
  first, moved = built[task][1]["train"][0], read_all(other)["train"][0]
  assert any(not np.array_equal(first[k], moved[k]) for k in first)


@pytest.mark.parametrize("task", list(CASES))
def test_split_sizes_and_lengths(task, built):
  """Catches: a split of the wrong size, an extra split missing, an example of the wrong length."""
  builder, splits = built[task]
  module = synthetic.TASKS[task]
  lengths = module.split_lengths(builder.setting)
  assert set(splits) == set(lengths)
  for split, examples in splits.items():
    assert len(examples) == builder.setting.count(split), split
    for ex in examples:
      assert ex["inputs"].ndim == 1 and len(ex["inputs"]) <= lengths[split]
      if getattr(module, "EXACT_LENGTHS", False):  # What lets rows of that length go without segment_ids.
        assert len(ex["inputs"]) == lengths[split]
      if module.KIND == "lm":
        assert ex["inputs"].shape == ex["targets"].shape == ex["loss_mask"].shape


@pytest.mark.parametrize("task", ["mqar", "selective_copying", "induction_heads"])
def test_answers_recomputed_from_inputs(task, built):
  """The checker (which reads only the inputs and where answers are asked) gives exactly the stored targets, and
  nothing but answer positions is scored. Catches: a value written at the wrong place, a target off by one, a mask
  covering non-answer positions, an `answers_per_example` (what the trainer reads out) that is not the count."""
  builder, splits = built[task]
  module = synthetic.TASKS[task]
  per_example = {"mqar": builder.setting.num_pairs if task == "mqar" else None,
                 "selective_copying": 16, "induction_heads": 1}[task]
  for split, examples in splits.items():
    for ex in examples:
      answers = module.check(builder.setting, ex)
      assert set(np.flatnonzero(ex["loss_mask"])) == set(answers), split
      assert len(answers) == per_example == module.answers_per_example(builder.setting)
      for t, a in answers.items():
        assert ex["targets"][t] == a
      off = ex["loss_mask"] == 0
      assert not ex["targets"][off].any()
      assert set(np.unique(ex["loss_mask"])) <= {0, 1}


def test_mqar_layout(built):
  """Keys from the lower half, values from the upper half, distinct within an example, pairs first, each key asked
  once after the pairs at an even offset (the paper's layout)."""
  builder, splits = built["mqar"]
  s = builder.setting
  v, p = s.vocab_size, s.num_pairs
  for ex in splits["train"]:
    x = ex["inputs"]
    keys, values = x[0:2 * p:2], x[1:2 * p:2]
    assert ((1 <= keys) & (keys < v // 2)).all() and ((v // 2 <= values) & (values < v)).all()
    assert len(set(keys)) == p and len(set(values)) == p
    asked = np.flatnonzero(ex["loss_mask"])
    assert (asked >= 2 * p).all() and ((asked - 2 * p) % 2 == 0).all()
    assert sorted(x[asked]) == sorted(keys)


def test_mqar_gaps_follow_the_power_law():
  """The queries' gaps: most queries come right after the pairs. At T = 24 with P = 4 there are 8 gaps g, drawn with
  weights (g + 1)^-0.99; the probability that gap 0 is among the 4 drawn is computed exactly by enumerating the
  ordered draws (about 0.91; a uniform placement gives 0.5)."""
  s = synthetic.with_overrides(mqar.SETTINGS["len64_pairs4"], seq_len=24, num_train=1)
  examples = mqar.generate(s, "train", np.random.default_rng(0), 4000)
  has_gap0 = np.array([ex["loss_mask"][8] == 1 for ex in examples])
  w = np.arange(1, 9, dtype=np.float64) ** -0.99
  p_in = 0.0
  for order in itertools.permutations(range(8), 4):
    if 0 in order:
      prob, left = 1.0, w.sum()
      for g in order:
        prob *= w[g] / left
        left -= w[g]
      p_in += prob
  assert abs(has_gap0.mean() - p_in) < 0.03, (has_gap0.mean(), p_in)


def test_sampling_without_replacement_matches_exact_probabilities():
  """The Gumbel top-k helper against the probabilities of successive draws, computed by hand: ordered pairs of 4
  items with weights 1, 2, 3, 4. Catches: sampling with replacement, the wrong order, ignoring the weights."""
  w = np.array([1.0, 2.0, 3.0, 4.0])
  draws = base.sample_without_replacement(np.random.default_rng(0), 200_000, 2, np.log(w), chunk_rows=4096)
  assert (draws[:, 0] != draws[:, 1]).all()
  counts = collections.Counter(map(tuple, draws.tolist()))
  for i, j in itertools.permutations(range(4), 2):
    exact = w[i] / w.sum() * w[j] / (w.sum() - w[i])
    assert abs(counts[(i, j)] / len(draws) - exact) < 0.004, (i, j)
  # Uniform weights with few collisions take the rejection path: every ordered pair 1/12.
  draws = base.sample_without_replacement(np.random.default_rng(1), 120_000, 2, np.zeros(4))
  assert (draws[:, 0] != draws[:, 1]).all()
  counts = collections.Counter(map(tuple, draws.tolist()))
  assert len(counts) == 12 and all(abs(c / len(draws) - 1 / 12) < 0.004 for c in counts.values())


def test_selective_copying_layout(built):
  builder, splits = built["selective_copying"]
  s = builder.setting
  for ex in splits["train"]:
    x = ex["inputs"]
    region = x[:s.seq_len - s.num_tokens]
    assert (x[s.seq_len - s.num_tokens:] == s.marker).all()
    assert np.count_nonzero(region) == s.num_tokens and (region < s.marker).all()


def test_induction_heads_extra_lengths(built):
  builder, splits = built["induction_heads"]
  assert {k: len(v[0]["inputs"]) for k, v in splits.items()} == {
      "train": 64, "validation": 64, "test": 64, "test_len128": 128, "test_len256": 256, "test_len512": 512,
      "test_len1024": 1024}


def _depth_and_args(tokens):
  depth = max_depth = 0
  args, widest = [], 0
  for tok in tokens:
    if tok in listops.OPERATORS:
      if args:
        args[-1] += 1
      args.append(0)
      depth += 1
      max_depth = max(max_depth, depth)
    elif tok == listops.END:
      widest = max(widest, args.pop())
      depth -= 1
    elif args:
      args[-1] += 1
  return max_depth, widest, min(args, default=None)


def test_listops_labels_lengths_and_shape(built):
  """Every label is the value of its expression (the stack evaluator), lengths within the strict bounds, depth <=
  10 (a digit leaf at depth 10 sits inside at most 9 operators), 2..10 arguments, splits disjoint."""
  builder, splits = built["listops"]
  s = builder.setting
  seen = {}
  for split, examples in splits.items():
    for ex in examples:
      assert listops.check(s, ex) == ex["label"]
      assert s.min_length < len(ex["inputs"]) < s.max_length
      depth, widest, _ = _depth_and_args(ex["inputs"].tolist())
      assert 1 <= depth < s.max_depth and widest <= s.max_args
      key = tuple(ex["inputs"].tolist())
      assert key not in seen, f"{split} repeats an example of {seen.get(key)}"
      seen[key] = split
  labels = [int(ex["label"]) for ex in splits["train"]]
  assert len(set(labels)) >= 5


def test_listops_checker_by_hand():
  enc = {"[MIN": listops.MIN, "[MAX": listops.MAX, "[MED": listops.MED, "[SM": listops.SM, "]": listops.END}
  for text, value in [("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]", 5), ("[SM 9 8 [MED 1 4 ] ]", 9),
                      ("[MED 1 2 3 8 ]", 2), ("[MIN [MAX 0 7 ] 8 ]", 7)]:
    tokens = [enc.get(w, listops.DIGIT0 + int(w) if w.isdigit() else -1) for w in text.split()]
    assert listops.check(None, {"inputs": np.array(tokens)}) == value
    assert listops.to_text(tokens) == text


def test_published_settings():
  """The settings are the papers': MQAR (64, 4), (128, 8), (256, 16) at V = 8192 with Zoology's 100k / 3k split
  sizes; selective copying V = 16 with 16 tokens; induction heads V = 16 evaluated up to 16x; ListOps LRA's."""
  published = lambda module: [s for name, s in module.SETTINGS.items()  # noqa: E731
                               if name != "small" and not name.endswith("_v512")]
  assert {(s.seq_len, s.num_pairs, s.vocab_size) for s in published(mqar)} == {
      (64, 4, 8192), (128, 8, 8192), (256, 16, 8192)}
  # The CPU-scale reproduction's settings: the same lengths and pairs with 512 tokens, nothing else changed.
  reduced = {name: s for name, s in mqar.SETTINGS.items() if name.endswith("_v512")}
  assert reduced == {
      f"{n}_v512": dataclasses.replace(s, vocab_size=512) for n, s in mqar.SETTINGS.items()
      if n != "small" and not n.endswith("_v512")}
  assert all(s.num_train == 100_000 and s.num_test == 3_000 for s in published(mqar))
  assert all(s.vocab_size == 16 and s.num_tokens == 16 for s in published(selective_copying))
  for s in published(induction_heads):
    assert s.vocab_size == 16 and max(s.eval_lengths) == 16 * s.seq_len
  lra = listops.SETTINGS["len500_2000"]
  assert (lra.min_length, lra.max_length, lra.max_depth, lra.max_args, lra.num_train) == (500, 2000, 10, 10, 96_000)
  for name in synthetic.dataset_names():
    module, _, setting = synthetic.resolve(name)
    setting.check()
    if module.KIND == "lm":  # Two examples of every standard setting have its split lengths.
      for split, length in module.split_lengths(setting).items():
        examples = module.generate(setting, split, np.random.default_rng(0), 2)
        assert all(ex["inputs"].shape == (length,) for ex in examples), (name, split)


def test_names_and_bad_settings_are_clear_errors():
  assert synthetic.resolve("mqar")[1] == "len64_pairs4"
  assert synthetic.is_synthetic("listops/len20_100") and not synthetic.is_synthetic("python_source")
  with pytest.raises(ValueError, match=r"unknown setting 'len64' of synthetic task 'mqar'; settings: len64_pairs4"):
    synthetic.resolve("mqar/len64")
  with pytest.raises(ValueError, match="unknown synthetic task 'mqqar'"):
    synthetic.resolve("mqqar/len64_pairs4")
  with pytest.raises(ValueError, match="even seq_len >= 4 \\* num_pairs"):
    builders.make_builder("mqar/len64_pairs4", num_pairs=20)
  with pytest.raises(ValueError, match="num_train must be >= 1"):
    synthetic.with_overrides(listops.SETTINGS["len20_100"], num_train=0)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("small_tfds"))


def _data(small_dir, name="mqar/small", **kw):
  from seqjax.data.synthetic.pipeline import make_synthetic_data  # pylint: disable=import-outside-toplevel
  args = dict(name=name, data_dir=small_dir, seq_len=64, batch_size=8, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return make_synthetic_data(**args)


def test_batches_resume_exactly_and_split_over_processes(small_dir):
  """The training stream after a JSON round trip of its state continues with the same batches; two processes'
  rows, concatenated, are the one-process batch. Catches: a stream that restarts on resume, processes reading the
  same rows."""
  data = _data(small_dir)
  it = data.train_iterator()
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  again = data.train_iterator()
  again.set_state(state)
  for a, b in zip(want, [next(again) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  halves = [next(_data(small_dir, process_index=p, process_count=2).train_iterator()) for p in (0, 1)]
  first = next(data.train_iterator())
  for k in first:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), first[k], err_msg=k)
  assert first["inputs"].shape == (8, 64) and first["weights"].sum() == 8 * 4


def test_batch_format_padding_and_eval_rows(small_dir):
  """Rows padded to data.seq_len with segment id 0 and weight 0; the last evaluation batch padded with rows of
  weight 0; every evaluation example once; a longer evaluation split read at its own length."""
  data = _data(small_dir, seq_len=80, batch_size=96)
  batches = list(data.eval_batches())
  assert len(batches) == 3 and sum(b["weights"].sum() for b in batches) == 256 * 4  # 96 + 96 + 64 real rows.
  assert (batches[-1]["segment_ids"][64:] == 0).all() and (batches[-1]["weights"][64:] == 0).all()
  b = batches[0]
  assert b["inputs"].shape == (96, 80) and (b["segment_ids"][:, 64:] == 0).all() and (b["weights"][:, 64:] == 0).all()
  np.testing.assert_array_equal(b["positions"][0, :64], np.arange(64))
  ih = _data(small_dir, name="induction_heads/small", seq_len=32, eval_split="test_len128")
  assert next(ih.eval_batches())["inputs"].shape == (8, 128) and next(ih.train_iterator())["inputs"].shape == (8, 32)
  # Rows that no example can leave short carry no segment_ids (the mixers' unsegmented forms); padded ones do.
  assert "segment_ids" not in next(ih.eval_batches()) and "segment_ids" not in next(ih.train_iterator())
  exact = _data(small_dir, seq_len=64)
  assert "segment_ids" not in next(exact.train_iterator()) and "segment_ids" not in next(exact.eval_batches())
  assert data.train_segments and data.eval_segments and not (exact.train_segments or exact.eval_segments)
  lo = _data(small_dir, name="listops/small", seq_len=64)
  row = next(lo.train_iterator())
  assert row["label"].shape == (8,) and row["weights"].tolist() == [1.0] * 8
  real = row["segment_ids"] > 0
  assert all(listops.check(None, {"inputs": row["inputs"][i][real[i]]}) == row["label"][i] for i in range(8))
  with pytest.raises(ValueError, match=r"data.seq_len=32 is shorter than the 'train' examples of mqar/small"):
    _data(small_dir, seq_len=32)
  with pytest.raises(ValueError, match=r"mqar/small has no split 'test_len128'"):
    _data(small_dir, eval_split="test_len128")


def _padded_example(example, length):
  """The oracle row of one example: its features zero-padded to `length`, written out per example."""
  n = len(example["inputs"])
  out = {}
  for key in ("inputs", "targets", "loss_mask"):
    out[key] = np.zeros(length, np.int64)
    out[key][:n] = example[key]
  return out


def test_training_epoch_is_a_permutation_of_the_split_read_from_columns(small_dir):
  """One epoch of training rows is every example of the split exactly once, each row the example itself (compared
  with the TFDS source read one example at a time); the next epoch is another order. Catches: columns misaligned
  with the examples, an epoch drawn with replacement, the same order every epoch."""
  from seqjax.data.pipeline import load_builder  # pylint: disable=import-outside-toplevel
  data = _data(small_dir, seq_len=80)
  source = load_builder("mqar/small", small_dir).as_data_source(split="train")
  want = {}
  for i in range(len(source)):
    row = _padded_example(source[i], 80)
    want[row["inputs"].tobytes()] = (i, row)
  assert len(want) == len(source)  # every example is distinct, so rows identify examples
  it = data.train_iterator()
  per_epoch = len(source) // 8
  seen = []
  for _ in range(per_epoch):
    batch = next(it)
    for r in range(8):
      i, row = want[batch["inputs"][r].astype(np.int64).tobytes()]
      np.testing.assert_array_equal(batch["targets"][r], row["targets"])
      np.testing.assert_array_equal(batch["weights"][r], row["loss_mask"])
      np.testing.assert_array_equal(batch["segment_ids"][r], (np.arange(80) < 64).astype(np.int32))
      seen.append(i)
  assert sorted(seen) == list(range(len(source)))
  second = [want[next(it)["inputs"][0].astype(np.int64).tobytes()][0] for _ in range(4)]
  assert second != seen[0:4 * 8:8]


def test_evaluation_rows_are_the_split_in_file_order(small_dir):
  """Evaluation batches hold examples 0, 1, ... of the split as the TFDS source reads them. Catches: a shuffled or
  misaligned evaluation split."""
  from seqjax.data.pipeline import load_builder  # pylint: disable=import-outside-toplevel
  data = _data(small_dir, batch_size=32)
  source = load_builder("mqar/small", small_dir).as_data_source(split="validation")
  rows = np.concatenate([b["inputs"] for b in data.eval_batches()])
  for i in range(len(source)):
    np.testing.assert_array_equal(rows[i], _padded_example(source[i], 64)["inputs"])


def test_columns_are_written_once_and_rewritten_when_stale(small_dir, tmp_path):
  """The column cache is reused (not rewritten) by a second reader, rebuilt when its row count disagrees with the
  split, and a leftover temporary directory of a killed build is ignored. Catches: a cache rewritten by every
  process, a stale cache served after the TFDS files changed."""
  import os  # pylint: disable=import-outside-toplevel
  import contextlib  # pylint: disable=import-outside-toplevel
  from seqjax.data.synthetic import columns  # pylint: disable=import-outside-toplevel
  builder = builders.make_builder("selective_copying/small", str(tmp_path), **SMALL)
  builder.download_and_prepare()
  source = builder.as_data_source(split="train")
  calls = []

  @contextlib.contextmanager
  def lock():
    calls.append(1)
    yield

  first = columns.split_columns(builder, source, "train", 72, lock)  # a bound above the examples' 64 tokens
  assert len(calls) == 1 and first["inputs"].shape == (48, 72) and first["length"].tolist() == [64] * 48
  np.testing.assert_array_equal(first["targets"][5], np.pad(source[5]["targets"], (0, 8)))
  path = os.path.join(builder.data_dir, columns.DIRNAME, "train")
  os.makedirs(os.path.join(os.path.dirname(path), ".train-leftover"))
  columns.split_columns(builder, source, "train", 72, lock)
  assert len(calls) == 1  # valid: read, not rewritten
  np.save(os.path.join(path, "length.npy"), np.zeros(47, np.int32))  # as if the split had changed
  again = columns.split_columns(builder, source, "train", 72, lock)
  assert len(calls) == 2 and again["length"].shape == (48,)
