"""The Transformer encoder-decoder through the seq2seq task and the one training loop: the `transformer_smoke`
config end to end with beam-search evaluation, evaluation and generation from the checkpoint, config checks."""

import dataclasses

import numpy as np
import pytest

from seqjax.config import ConfigError, from_config_dict
from seqjax.data import numbers
from seqjax.train import loop
from tests.train.test_seq2seq_train import _config_dict, _records


@pytest.mark.slow  # ~5 min of compiling and training on a loaded 2-core machine
def test_transformer_smoke_run_with_beam_search_evaluation(tmp_path):
  """6 steps on the 8 simulated devices, evaluated with 2 beams at steps 3 and 6; then eval (greedy and beams) and
  generation from the checkpoint. Catches a task that does not build, train or decode the transformer."""
  cfg = _config_dict("transformer_smoke")
  cfg["data"]["data_dir"] = str(tmp_path / "tfds")
  cfg["train"].update(num_steps=6, eval_every=3, checkpoint_every=3, log_every=3, eval_batches=1)
  cfg["seq2seq"].update(num_beams=2, curriculum_warmup_steps=0)
  config = from_config_dict(cfg)
  workdir = str(tmp_path / "work")
  final = loop.train(config, workdir)
  assert final["step"] == 6 and np.isfinite(final["loss"])
  assert 0 < final["loss"] < np.log(numbers.VOCAB.size) + 1
  assert 0 <= final["exact_match"] <= 1 and 0 <= final["bleu"] <= 100 and 0 <= final["rouge_l"] <= 1
  assert [r["step"] for r in _records(workdir, "eval")] == [3, 6]
  beams = loop.evaluate_checkpoint(config, workdir)
  for key in ("loss", "exact_match", "bleu", "rouge_l"):
    np.testing.assert_allclose(beams[key], final[key], rtol=1e-6)
  greedy_config = dataclasses.replace(config, seq2seq=dataclasses.replace(config.seq2seq, num_beams=1))
  greedy = loop.evaluate_checkpoint(greedy_config, workdir)
  np.testing.assert_allclose(greedy["loss"], final["loss"], rtol=1e-6)  # the same teacher-forced loss
  out = loop.generate(dataclasses.replace(config, sample=dataclasses.replace(config.sample, prompt="12 905")),
                      workdir)
  assert [o.split(" -> ")[0] for o in out] == ["12", "905"]


@pytest.mark.parametrize("field, value, message", [
    ("teacher_forcing", "inverse_sigmoid", "config.seq2seq.teacher_forcing: the transformer's decoder trains"),
    ("num_heads", 3, "config.seq2seq.num_heads: 3 must divide hidden=16"),
    ("num_beams", 0, "config.seq2seq.num_beams: must be >= 1"),
])
def test_bad_transformer_config_names_the_field(field, value, message):
  cfg = _config_dict("transformer_smoke")
  cfg["seq2seq"][field] = value
  with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
    from_config_dict(cfg)


def test_max_len_too_short_for_the_data_is_refused_before_training(tmp_path):
  cfg = _config_dict("transformer_smoke")
  cfg["data"]["data_dir"] = str(tmp_path / "tfds")
  cfg["seq2seq"]["max_len"] = 20
  with pytest.raises(ConfigError, match=r"seq2seq\.max_len: .* more than seq2seq\.max_len=20"):
    loop.train(from_config_dict(cfg), str(tmp_path / "work"))
