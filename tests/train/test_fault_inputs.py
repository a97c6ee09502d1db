"""Bad input fails fast, with one message naming the problem and no traceback (exit status 2)."""

import time

import pytest

from tests.train import fault_harness as fh


@pytest.mark.parametrize("extra, faults, message", [
    (["--config.train.num_steps=abc"], "", "num_steps"),
    (["--config.train.checkpoint_every_secs=-1"], "", "config.train.checkpoint_every_secs: must be >= 0"),
    (["--config.train.on_nan=retry"], "", "config.train.on_nan: got 'retry'; allowed: 'stop', 'skip', 'rollback'"),
    (["--config.data.train_split=train[:1]", "--config.train.batch_size=128"], "",
     "Split 'train[:1]' is too small"),
    (["--config.data.eval_split=validation[:0]"], "", "config.data ('python_source/small'"),
    (["--mode=generate", "--config.sample.prompt=" + "x" * 60], "",
     "config.sample.prompt: 61 tokens plus sample.num_tokens=32 exceed the model's context model.max_len=64"),
    ([], "nan_at=six", "SEQJAX_FAULTS: cannot parse 'nan_at=six'"),
], ids=["wrong_type", "negative_secs", "bad_on_nan", "too_short_dataset", "empty_split", "prompt_too_long",
        "bad_fault_spec"])
def test_user_errors_are_one_message_without_traceback(tmp_path, extra, faults, message):
  start = time.monotonic()
  proc = fh.run(fh.base_args(str(tmp_path / "work"), str(tmp_path.parent / "tfds_inputs")) + extra,
                faults=faults, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert message in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert time.monotonic() - start < 120  # Seconds, not a compile or a training run (generous: loaded CI).
