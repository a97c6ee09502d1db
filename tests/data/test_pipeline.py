"""Tests for the packed LM pipeline: batch format, packing, resume, sharding, eval, errors."""
import collections
import json
import time

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from seqjax.data import pipeline
from seqjax.data import python_source
from seqjax.data.tokenizer import ByteTokenizer

SMALL = "python_source/small"
T = 48  # deliberately not a power of two


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  python_source.make_builder(d, "small").download_and_prepare()
  return str(d)


def make(data_dir, **kw):
  args = dict(name=SMALL, data_dir=data_dir, seq_len=T, batch_size=4, seed=0, process_index=0,
              process_count=1)
  args.update(kw)
  return pipeline.make_lm_data(**args)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def docs_of_split(data_dir, split):
  src = python_source.make_builder(data_dir, "small").as_data_source(split=split)
  return [src[i]["text"] for i in range(len(src))]


def token_stream(batches):
  """Concatenates the real (weight 1) inputs and targets of rows in order."""
  ins, tgts = [], []
  for b in batches:
    for row in range(b["inputs"].shape[0]):
      real = b["weights"][row] > 0
      ins.append(b["inputs"][row][real])
      tgts.append(b["targets"][row][real])
  return np.concatenate(ins), np.concatenate(tgts)


def check_row_invariants(batch, tokenizer):
  seg_BT, pos_BT = batch["segment_ids"], batch["positions"]
  in_BT, tgt_BT = batch["inputs"], batch["targets"]
  for row in range(seg_BT.shape[0]):
    seg, pos = seg_BT[row], pos_BT[row]
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[:n]])) != 0)
    np.testing.assert_array_equal(seg[starts], np.arange(1, len(starts) + 1))  # 1, 2, 3 ...
    expected_pos = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    np.testing.assert_array_equal(pos[:n], expected_pos)  # restart at every segment start
    same_segment = seg[:-1] == seg[1:]
    same_segment &= real[:-1]
    # Inside a segment, the target at t is the input at t + 1.
    np.testing.assert_array_equal(tgt_BT[row, :-1][same_segment], in_BT[row, 1:][same_segment])
    # A BOS input only ever opens a segment; an EOS target only ever closes one.
    bos = np.flatnonzero(in_BT[row, :n] == tokenizer.bos_id)
    assert set(bos) <= set(starts)
    eos = np.flatnonzero(tgt_BT[row, :n] == tokenizer.eos_id)
    assert all(t == n - 1 or seg[t + 1] != seg[t] for t in eos), "EOS must end its segment"
    assert not (in_BT[row, :n] == tokenizer.eos_id).any() and not (tgt_BT[row, :n] == tokenizer.bos_id).any()
  np.testing.assert_array_equal(batch["weights"], (seg_BT > 0).astype(np.float32))
  np.testing.assert_array_equal(batch["target_bytes"], ((seg_BT > 0) & (tgt_BT >= 3)).astype(np.int32))
  np.testing.assert_array_equal(in_BT[seg_BT == 0], 0)
  np.testing.assert_array_equal(tgt_BT[seg_BT == 0], 0)


def test_batch_format(data_dir):
  data = make(data_dir, batch_size=6, process_count=2, process_index=1)
  assert data.vocab_size == 259 and isinstance(data.tokenizer, ByteTokenizer)
  assert data.local_batch_size == 3
  for batch in [next(data.train_iterator()), next(iter(data.eval_batches()))]:
    assert set(batch) == set(pipeline.BATCH_KEYS)
    for key, value in batch.items():
      assert value.shape == (3, T), key
      assert value.dtype == (np.float32 if key == "weights" else np.int32), key


def test_packing_invariants_on_train_rows(data_dir):
  data = make(data_dir)
  batches = take(data.train_iterator(), 300)
  for b in batches:
    check_row_invariants(b, data.tokenizer)
  # Training rows are always full (concat-then-split), several documents get packed in one row.
  assert all(b["weights"].all() for b in batches)
  assert max(int(b["segment_ids"].max()) for b in batches) >= 2


def test_eval_stream_reproduces_every_document_exactly(data_dir):
  data = make(data_dir, batch_size=3)
  batches = list(data.eval_batches())
  for b in batches:
    check_row_invariants(b, data.tokenizer)
  ins, tgts = token_stream(batches)
  tok = data.tokenizer
  docs = [tok.encode(d, add_bos=True, add_eos=True) for d in docs_of_split(data_dir, "validation")]
  order = list(grain.MapDataset.range(len(docs)).shuffle(seed=pipeline.EVAL_ORDER_SEED))
  assert sorted(order) == list(range(len(docs))) and order != sorted(order)  # every document, shuffled
  docs = [docs[i] for i in order]
  np.testing.assert_array_equal(ins, np.concatenate([d[:-1] for d in docs]))
  np.testing.assert_array_equal(tgts, np.concatenate([d[1:] for d in docs]))
  total_bytes = sum(b["target_bytes"].sum() for b in batches)
  assert total_bytes == sum(len(d) for d in docs_of_split(data_dir, "validation"))


def test_eval_is_deterministic_and_padded(data_dir):
  data = make(data_dir, batch_size=5)
  first, second = list(data.eval_batches()), list(data.eval_batches())
  assert_batches_equal(first, second)
  last = first[-1]
  assert (last["weights"] == 0).any(), "the final batch is padded, not dropped"
  padded_rows = ~last["weights"].any(axis=1)
  np.testing.assert_array_equal(last["segment_ids"][padded_rows], 0)
  assert_batches_equal(list(data.eval_batches(max_batches=2)), first[:2])
  with pytest.raises(ValueError, match="max_batches"):
    list(data.eval_batches(max_batches=0))


def test_train_epochs_are_permutations_reshuffled_per_epoch_and_seed(data_dir):
  train_docs = docs_of_split(data_dir, "train")
  tokens_per_epoch = sum(len(d) + 1 for d in train_docs)
  data = make(data_dir, batch_size=8, seq_len=512)
  n = 2 * tokens_per_epoch // (8 * 512) + 2
  ins, _ = token_stream(take(data.train_iterator(), n))
  # Bytes map to ids >= 3, so BOS (1) splits the input stream back into documents.
  bos = np.flatnonzero(ins == data.tokenizer.bos_id)
  docs = [data.tokenizer.decode_bytes(ins[s:e]) for s, e in zip(bos, list(bos[1:]) + [len(ins)])]
  k = len(train_docs)
  epoch1, epoch2 = docs[:k], docs[k:2 * k]
  assert collections.Counter(epoch1) == collections.Counter(train_docs)
  assert collections.Counter(epoch2) == collections.Counter(train_docs)
  assert epoch1 != epoch2, "each epoch is reshuffled"
  assert epoch1 != train_docs
  other, _ = token_stream(take(make(data_dir, batch_size=8, seq_len=512, seed=1).train_iterator(), 3))
  assert not np.array_equal(other[:1000], ins[:1000]), "another seed gives another order"


@pytest.mark.parametrize("n", [0, 1, 7, 40])
def test_train_iterator_resumes_exactly(data_dir, n):
  data = make(data_dir)
  it = data.train_iterator()
  take(it, n)
  state = it.get_state()
  saved = json.loads(json.dumps(state))  # what grain's orbax handler writes and reads
  expected = take(it, 25)
  fresh = make(data_dir).train_iterator()  # a new process would rebuild everything
  fresh.set_state(saved)
  assert_batches_equal(take(fresh, 25), expected)
  # Restoring into an iterator that already advanced also works.
  used = data.train_iterator()
  take(used, 13)
  used.set_state(state)
  assert_batches_equal(take(used, 25), expected)


def test_resume_from_every_state_in_a_window(data_dir):
  # States at consecutive steps cover rows that end inside, and exactly at, a document.
  data = make(data_dir, batch_size=1, seq_len=7)
  it = data.train_iterator()
  states, batches = [], []
  for _ in range(60):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  for i in range(0, 60, 3):
    fresh = data.train_iterator()
    fresh.set_state(states[i])
    assert_batches_equal(take(fresh, 60 - i), batches[i:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_slices_of_the_global_batch(data_dir, process_count):
  global_batches = take(make(data_dir, batch_size=8).train_iterator(), 5)
  global_eval = list(make(data_dir, batch_size=8).eval_batches())
  local_train, local_eval = [], []
  for p in range(process_count):
    data = make(data_dir, batch_size=8, process_index=p, process_count=process_count)
    assert data.local_batch_size == 8 // process_count
    local_train.append(take(data.train_iterator(), 5))
    local_eval.append(list(data.eval_batches()))
  for step in range(5):
    for key in pipeline.BATCH_KEYS:
      joined = np.concatenate([local_train[p][step][key] for p in range(process_count)])
      np.testing.assert_array_equal(joined, global_batches[step][key])
  rows = [tuple(r) for p in range(process_count) for r in local_train[p][0]["inputs"]]
  assert len(set(rows)) == len(rows), "no row is given to two processes"
  assert all(len(local_eval[p]) == len(global_eval) for p in range(process_count))
  for step, gb in enumerate(global_eval):
    for key in pipeline.BATCH_KEYS:
      joined = np.concatenate([local_eval[p][step][key] for p in range(process_count)])
      np.testing.assert_array_equal(joined, gb[key])


def test_bad_arguments_raise_value_errors(data_dir):
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    make(data_dir, batch_size=8, process_count=3)
  with pytest.raises(ValueError, match="seq_len"):
    make(data_dir, seq_len=0)
  with pytest.raises(ValueError, match="process_index"):
    make(data_dir, process_index=2, process_count=2, batch_size=4)
  with pytest.raises(ValueError, match="seed"):
    make(data_dir, seed=-1)
  with pytest.raises(ValueError, match="'nope'"):
    make(data_dir, eval_split="nope")
  with pytest.raises(ValueError, match="'body'"):
    make(data_dir, text_key="body")
  with pytest.raises(ValueError, match="Unknown TFDS dataset name"):
    make(data_dir, name="surely_not_a_tfds_dataset_xyz")


def test_empty_or_too_small_split(data_dir):
  with pytest.raises(ValueError, match=r"Split 'train\[:1\]' is too small"):
    make(data_dir, train_split="train[:1]", batch_size=64, seq_len=4096)
  builder = python_source.make_builder(data_dir, "small")
  with pytest.raises(ValueError, match="'validation' .* is empty"):
    pipeline._split_source(_EmptySplitBuilder(builder), "validation", "text")


class _EmptySplitBuilder:
  """Wraps a builder so every split's data source is empty."""

  def __init__(self, builder):
    self.info = builder.info

  def as_data_source(self, split):
    return []


def test_network_probe_fails_fast_for_unreachable_hosts():
  start = time.time()
  assert not pipeline.network_available((("seqjax-offline-test.invalid", 443),), timeout_s=3.0)
  assert time.time() - start < 5.0


def test_offline_remote_name_fails_fast_with_clear_message(tmp_path, monkeypatch):
  monkeypatch.delenv(pipeline.SKIP_NETWORK_CHECK_ENV, raising=False)
  monkeypatch.setattr(pipeline, "NETWORK_PROBE_HOSTS", (("seqjax-offline-test.invalid", 443),))
  monkeypatch.setattr(pipeline, "NETWORK_PROBE_TIMEOUT_S", 3.0)

  def no_download(*args, **kwargs):
    raise AssertionError("download_and_prepare must not run when offline")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  start = time.time()
  with pytest.raises(pipeline.DataUnavailableError) as info:
    pipeline.make_lm_data(name="lm1b", data_dir=str(tmp_path), seq_len=T, batch_size=4, seed=0,
                          process_index=0, process_count=1)
  assert time.time() - start < 30.0
  message = str(info.value)
  for fragment in ["'lm1b'", "offline", "array_record", "data_dir", str(tmp_path), "python_source"]:
    assert fragment in message


class SeqjaxFakeRemoteCorpus(tfds.core.GeneratorBasedBuilder):
  """A tiny builder without BUILT_LOCALLY: seqjax treats it like a downloaded dataset."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 40), "validation": self._generate_examples(40, 45)}

  def _generate_examples(self, lo, hi):
    for i in range(lo, hi):
      yield i, {"body": f"document {i}\n" * (i % 7 + 1)}


def test_prepared_remote_dataset_works_offline(tmp_path, monkeypatch):
  SeqjaxFakeRemoteCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

  def offline(*args, **kwargs):
    raise AssertionError("a prepared dataset must not probe the network")

  monkeypatch.setattr(pipeline, "network_available", offline)
  data = pipeline.make_lm_data(name="seqjax_fake_remote_corpus", data_dir=str(tmp_path), seq_len=16,
                               batch_size=2, seed=0, text_key="body", process_index=0,
                               process_count=1)
  check_row_invariants(next(data.train_iterator()), data.tokenizer)
  ins, _ = token_stream(list(data.eval_batches()))
  lines = data.tokenizer.decode(ins).splitlines()
  assert collections.Counter(lines) == {f"document {i}": i % 7 + 1 for i in range(40, 45)}


def test_unprepared_remote_dataset_offline_fails(tmp_path, monkeypatch):
  monkeypatch.delenv(pipeline.SKIP_NETWORK_CHECK_ENV, raising=False)
  monkeypatch.setattr(pipeline, "network_available", lambda: False)
  with pytest.raises(pipeline.DataUnavailableError, match="seems offline"):
    pipeline.make_lm_data(name="seqjax_fake_remote_corpus", data_dir=str(tmp_path), seq_len=16,
                          batch_size=2, seed=0, text_key="body", process_index=0, process_count=1)


def test_python_source_is_built_on_first_use_then_reused(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, "network_available", lambda: False)  # never needed for it
  make(str(tmp_path))
  assert (tmp_path / "python_source" / "small" / "1.0.0").is_dir()
  calls = []
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: calls.append(1))
  make(str(tmp_path))
  assert not calls


def test_multiprocess_workers_resume_exactly(data_dir):
  from absl import flags  # grain workers read absl flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  data = make(data_dir, num_workers=2)
  it = data.train_iterator()
  try:
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 6)
  finally:
    it.close()
  fresh = data.train_iterator()
  try:
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 6), expected)
  finally:
    fresh.close()
  for b in expected:
    check_row_invariants(b, data.tokenizer)


def test_orbax_checkpoint_round_trip(data_dir, tmp_path):
  import orbax.checkpoint as ocp  # the trainer's checkpoint path: grain's orbax handler (JSON)
  data = make(data_dir)
  it = data.train_iterator()
  take(it, 9)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = take(it, 8)
    fresh = data.train_iterator()
    mngr.restore(9, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(fresh, 8), expected)
