"""The conformance harness (seqjax.conformance): every registered mixer passes it, and it catches broken mixers.

`test_registered_mixer_conforms` is the CI entry (`python -m seqjax.conformance all --quick`, one test per mixer;
a newly registered mixer is covered without editing this file). The negative controls register a small, correct
mixer (a causal running mean over each document, with a projection) and copies of it with one planted flaw each;
the harness must pass the correct one and fail each flawed copy on exactly the check meant to see that flaw.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from seqjax import conformance
from seqjax.config import ModelConfig
from seqjax.conformance import checks
from seqjax.nn import contract
from seqjax.nn.mixers import available_mixers, register_mixer, unregister_mixer


@pytest.mark.parametrize("name", available_mixers())
def test_registered_mixer_conforms(name):
  report = conformance.run(name, quick=True)
  assert report.passed, "\n" + conformance.table([report])


class RunningMean(nn.Module):
  """y_t = proj(mean of x over the document's tokens up to t). Flaws (`flaw`) break one promise each."""

  cfg: ModelConfig
  flaw: str = ""
  shift: bool = False  # a second "mode" that is off by one token (flaw "modes")

  def setup(self):
    self.proj = nn.Dense(self.cfg.d_model, dtype=jnp.dtype(self.cfg.dtype), name="proj")

  def _means(self, x_BTD, segment_ids):
    b, t, _ = x_BTD.shape
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None or self.flaw == "documents" else segment_ids
    same_doc = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    visible_BTS = same_doc if self.flaw == "future" else same_doc & jnp.tril(jnp.ones((t, t), bool))
    if self.shift:
      visible_BTS = visible_BTS & ~jnp.eye(t, dtype=bool)[None] | (jnp.eye(t, dtype=bool)[None] & (jnp.arange(t) == 0))
    weights_BTS = visible_BTS.astype(jnp.float32)
    sums_BTD = jnp.einsum("bts,bsd->btd", weights_BTS, x_BTD.astype(jnp.float32))
    counts_BT = jnp.maximum(weights_BTS.sum(-1), 1.0)
    return sums_BTD, counts_BT

  def _read_out(self, mean):
    dtype = jnp.dtype(self.cfg.dtype)
    if self.flaw == "bfloat16":  # cancellation in the compute dtype: exact in float32, ruinous in bfloat16
      mean = (mean.astype(dtype) + 256.0) - 256.0
    if self.flaw == "gradients":
      mean = _half_gradient(mean)
    return self.proj(mean.astype(dtype))

  def __call__(self, x_BTD, *, segment_ids=None, positions=None, deterministic=True, return_state=False):
    del positions, deterministic
    sums_BTD, counts_BT = self._means(x_BTD, segment_ids)
    y_BTD = self._read_out(sums_BTD / counts_BT[..., None])
    if not return_state:
      return y_BTD
    last_B = contract.last_token_lengths(segment_ids, *x_BTD.shape[:2]) - 1
    rows = jnp.arange(x_BTD.shape[0])
    return y_BTD, (sums_BTD[rows, last_B], counts_BT[rows, last_B])

  def init_state(self, batch_size, max_len=0, dtype=None):
    del max_len, dtype
    return jnp.zeros((batch_size, self.cfg.d_model), jnp.float32), jnp.zeros((batch_size,), jnp.float32)

  def step(self, x_BD, state, *, deterministic=True):
    del deterministic
    total_BD, count_B = state
    total_BD, count_B = total_BD + x_BD.astype(jnp.float32), count_B + 1
    y_BD = self._read_out(total_BD / count_B[:, None])
    return (y_BD * 1.01 if self.flaw == "decode" else y_BD), (total_BD, count_B)


@jax.custom_vjp
def _half_gradient(x):
  return x


_half_gradient.defvjp(lambda x: (x, None), lambda _, g: (0.5 * g,))


@contextlib.contextmanager
def _registered(name, flaw="", modes=None):
  factory = lambda cfg: RunningMean(cfg, flaw=flaw)
  if flaw == "modes":  # two modes, selected by the MLP width the mixer ignores; one is off by one token
    factory = lambda cfg: RunningMean(cfg, shift=cfg.mlp_dim == 33)
    modes = {"exact": {"mlp_dim": 32}, "shifted": {"mlp_dim": 33}}
  register_mixer(name, modes=modes)(factory)
  try:
    yield name
  finally:
    unregister_mixer(name)


class NegativeControlsTest(parameterized.TestCase):

  def test_the_correct_running_mean_passes(self):
    with _registered("test_running_mean") as name:
      report = conformance.run(name, checks=["causal", "packing", "decode", "gradients", "bfloat16"])
    self.assertTrue(report.passed, conformance.table([report]))

  @parameterized.named_parameters(
      ("future", "future", "causal"),
      ("documents", "documents", "packing"),
      ("decode", "decode", "decode"),
      ("gradients", "gradients", "gradients"),
      ("bfloat16", "bfloat16", "bfloat16"),
      ("modes", "modes", "modes"),
  )
  def test_a_planted_flaw_fails_its_check(self, flaw, check):
    with _registered(f"test_running_mean_{flaw}", flaw=flaw) as name:
      report = conformance.run(name, checks=[check])
    (result,) = report.results
    self.assertEqual(result.status, checks.FAIL, f"the harness missed the flaw {flaw!r}: {result.detail}")

  def test_a_bidirectional_mixer_skips_the_causal_checks(self):
    """A mixer registered bidirectional (here one that sees the future) gets "n/a" for causal, packing and decode,
    and is still held to the other checks."""
    register_mixer("test_bidirectional_mean", bidirectional=True)(lambda cfg: RunningMean(cfg, flaw="future"))
    try:
      report = conformance.run("test_bidirectional_mean", checks=["causal", "packing", "decode", "gradients"])
    finally:
      unregister_mixer("test_bidirectional_mean")
    status = {r.check: r.status for r in report.results}
    self.assertEqual(status, {"causal": checks.NA, "packing": checks.NA, "decode": checks.NA,
                              "gradients": checks.PASS}, conformance.table([report]))

  def test_unknown_names_fail_before_running(self):
    with self.assertRaisesRegex(ValueError, "unknown mixer 'nope'.*registered mixers"):
      conformance.run("nope")
    with self.assertRaisesRegex(ValueError, "unknown check.*causal"):
      conformance.run(available_mixers()[0], checks=["causality_typo"])

  def test_a_failing_check_is_reported_not_raised(self):
    with _registered("test_running_mean_raises") as name:
      with mock_check("decode", functools.partial(_raise, RuntimeError("boom"))):
        report = conformance.run(name, checks=["decode"])
    self.assertFalse(report.passed)
    self.assertIn("boom", conformance.table([report]))


def _raise(error, *args):
  raise error


@contextlib.contextmanager
def mock_check(name, fn):
  original = checks.CHECKS[name]
  checks.CHECKS[name] = fn
  try:
    yield
  finally:
    checks.CHECKS[name] = original


def test_the_tutorial_mixer_conforms_and_its_page_shows_its_code():
  """docs/new_mixer.md walks through examples/sigmoid_attention.py: the page must show the file as it is, and the
  mixer must pass the harness (its LM training from the command line is in tests/test_main.py)."""
  import os  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "examples", "sigmoid_attention.py"), encoding="utf-8") as f:
    code = f.read()
  with open(os.path.join(root, "docs", "new_mixer.md"), encoding="utf-8") as f:
    assert code in f.read(), "docs/new_mixer.md no longer shows examples/sigmoid_attention.py as it is"
  import importlib  # pylint: disable=import-outside-toplevel
  module = importlib.import_module("examples.sigmoid_attention")
  try:
    report = conformance.run("sigmoid_attention", checks=["causal", "packing", "decode", "gradients"])
  finally:
    unregister_mixer("sigmoid_attention")
    import sys  # pylint: disable=import-outside-toplevel
    sys.modules.pop(module.__name__, None)
  assert report.passed, "\n" + conformance.table([report])


def test_the_recall_column_and_bad_budgets():
  """The table's recall column shows accuracy against chance; a non-positive budget is refused before any work."""
  from seqjax.conformance import recall  # pylint: disable=import-outside-toplevel
  report = conformance.Report("attention", (checks.CheckResult("causal", checks.PASS, 0.0),), 1.0)
  row = conformance.table([conformance.with_recall(report, recall.RecallResult("attention", 0.97, 0.25, 1500, 120.0,
                                                                              0.1))])
  assert "recall (answer accuracy)" in row and "0.97 (chance 0.25, 1500 steps)" in row
  assert "recall" not in conformance.table([report])
  with pytest.raises(ValueError, match="positive seconds"):
    recall.train_recall("attention", seconds=0)
  batch = recall.batch_of(recall.mqar.generate(recall.SETTING, "test", np.random.default_rng(0), 3))
  assert batch["inputs"].shape == (3, recall.SETTING.seq_len)
  assert batch["weights"].sum(1).tolist() == [recall.SETTING.num_pairs] * 3  # the loss sees the answers only


RECALL_STEPS = 1000  # attention: 0.25 (copying) after ~260 steps, 0.995 after 1,000 (docs/conformance.md)


@pytest.mark.slow
def test_train_flag_trains_attention_to_recall():
  """`python -m seqjax.conformance attention --quick --train` prints the recall column; attention, trained a fixed
  number of steps (deterministic, whatever the machine's speed), recalls far above the 1/4 of copying a value."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from seqjax.conformance import recall  # pylint: disable=import-outside-toplevel
  proc = subprocess.run([sys.executable, "-m", "seqjax.conformance", "attention", "--quick", "--train",
                         "--train_seconds=5"], capture_output=True, text=True, timeout=900,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "recall (answer accuracy)" in proc.stdout and "(chance 0.25," in proc.stdout, proc.stdout
  result = recall.train_recall("attention", seconds=1e9, max_steps=RECALL_STEPS)
  assert result.steps == RECALL_STEPS and result.accuracy > 0.9, result


def test_programs_are_shared_by_lowering_and_keyed_by_the_cpu_kernel_mode():
  """`checks.Program`: two functions that lower to the same program share one executable; a function traced under
  another CPU-kernel mode is lowered again (else the kernels check would compare a program with itself); another
  input shape is another program."""
  from seqjax.ops import backend  # pylint: disable=import-outside-toplevel
  executables = {}
  double, twice = (checks.Program(f, executables, None) for f in (lambda x: x * 2.0, lambda x: x + x * 1.0))
  same = checks.Program(lambda x: x * 2.0, executables, None)
  x = np.ones((2, 3), np.float32)
  assert float(double(x)[0, 0]) == 2.0 and float(same(x)[0, 0]) == 2.0 and len(executables) == 1
  twice(x)
  double(np.ones((3, 3), np.float32))
  assert len(executables) == 3
  by_mode = checks.Program(lambda x: x * (2.0 if backend.get_cpu_kernels() == "off" else 3.0), {}, None)
  with backend.cpu_kernels_mode("off"):
    off = float(by_mode(x)[0, 0])
  with backend.cpu_kernels_mode("auto"):
    auto = float(by_mode(x)[0, 0])
  assert (off, auto) == (2.0, 3.0)
