"""The seqjax -> GPT-2 dimension mapping of experiments/bench_torch_gpt2.py (no torch needed)."""

import dataclasses
import json
import pathlib

import pytest

from seqjax.config import AttentionConfig, ModelConfig
from tests.experiments_loader import load_experiment



@pytest.fixture(scope="module")
def bench():
  with load_experiment("bench_torch_gpt2") as module:
    yield module


def test_default_model_maps_to_gpt2_dimensions(bench):
  m = ModelConfig(d_model=256, num_layers=4, attention=AttentionConfig(num_heads=4), mlp_dim=1024, vocab_size=259,
                  max_len=256)
  kw = bench.gpt2_config_kwargs(m)
  assert (kw["n_embd"], kw["n_layer"], kw["n_head"], kw["n_inner"]) == (256, 4, 4, 1024)
  assert (kw["vocab_size"], kw["n_positions"]) == (259, 256)
  assert kw["resid_pdrop"] == kw["embd_pdrop"] == kw["attn_pdrop"] == 0.0
  assert kw["tie_word_embeddings"] is True
  assert kw["activation_function"] == "gelu_new"  # flax's default gelu is the tanh approximation
  json.dumps(kw)  # it is sent to the torch worker as JSON


def test_other_dimensions_follow_the_config(bench):
  m = ModelConfig(d_model=96, num_layers=3, attention=AttentionConfig(num_heads=6), mlp_dim=200, vocab_size=300,
                  max_len=128,
                  activation="relu", tie_embeddings=False)
  kw = bench.gpt2_config_kwargs(m)
  assert (kw["n_embd"], kw["n_layer"], kw["n_head"], kw["n_inner"], kw["vocab_size"], kw["n_positions"]) == (
      96, 3, 6, 200, 300, 128)
  assert kw["activation_function"] == "relu" and kw["tie_word_embeddings"] is False


@pytest.mark.parametrize("change, field", [
    (dict(mixer="lstm"), "model.mixer"),
    (dict(positions="alibi"), "model.positions"),
    (dict(norm="rmsnorm"), "model.norm"),
    (dict(mlp="gated"), "model.mlp"),
    (dict(attention=AttentionConfig(num_kv_heads=1)), "model.attention.num_kv_heads"),
    (dict(attention=AttentionConfig(head_dim=32)), "model.attention.head_dim"),
    (dict(dtype="bfloat16"), "model.dtype"),
])
def test_models_without_a_gpt2_counterpart_are_rejected(bench, change, field):
  m = dataclasses.replace(ModelConfig(), **change)
  with pytest.raises(ValueError, match=field):
    bench.gpt2_config_kwargs(m)


def test_rope_model_is_compared_with_a_note(bench):
  m = ModelConfig(positions="rope", vocab_size=259)
  assert bench.gpt2_config_kwargs(m)["n_positions"] == m.max_len
  assert any("rope" in d for d in bench.gpt2_differences(m))
  assert not any("positions" in d for d in bench.gpt2_differences(ModelConfig(positions="learned")))


def test_flop_estimate_scales_with_tokens(bench):
  m = ModelConfig()
  one = bench.train_flops_per_step(m, 1, 256)
  assert bench.train_flops_per_step(m, 32, 256) == pytest.approx(32 * one)
  matmul_params = 4 * (4 * 256 * 256 + 2 * 256 * 1024) + 259 * 256
  assert one > 6 * matmul_params * 256  # plus the attention matmuls


def test_seqjax_side_runs_zero_steps(bench):
  """`--warmup=0` asks each side for zero untimed steps. Catches: the loss read from the last step's metrics when
  there was none (UnboundLocalError before)."""
  from seqjax.config import default_config_dict, from_config_dict  # pylint: disable=import-outside-toplevel
  cfg = default_config_dict().to_dict()
  cfg["model"].update(d_model=32, num_layers=1, mlp_dim=64, max_len=16, vocab_size=40)
  cfg["sample"]["num_tokens"] = 8
  cfg["data"]["seq_len"], cfg["train"]["batch_size"] = 16, 8
  runner = bench.SeqjaxRunner(from_config_dict(cfg))
  first = runner.loss
  assert runner.run(0) == {"times": [], "cpu_times": [], "loss": first}
  out = runner.run(2)
  assert len(out["times"]) == len(out["cpu_times"]) == 2 and out["loss"] == runner.loss
