"""Config validation: every user mistake names the field and what is allowed, before any compute."""

import dataclasses
import importlib.util
import os
import re

import pytest

from seqjax.config import Config, ConfigError, default_config_dict, from_config_dict, with_vocab_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_shipped_configs_validate(arg):
  config = from_config_dict(load_config("lm_pysrc", arg))
  assert isinstance(config, Config)
  assert config.data.name == "python_source"


def test_defaults_roundtrip(monkeypatch):
  monkeypatch.delenv("SEQJAX_CPU_KERNELS", raising=False)
  assert from_config_dict(default_config_dict()) == Config()


def test_config_is_frozen():
  config = Config()
  with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'seed'"):
    config.seed = 3  # type: ignore[misc]
  with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'num_steps'"):
    config.train.num_steps = 3  # type: ignore[misc]


def test_cpu_kernels_is_a_top_level_choice_defaulting_to_the_environment(monkeypatch):
  monkeypatch.delenv("SEQJAX_CPU_KERNELS", raising=False)
  assert Config().cpu_kernels == "auto" and from_config_dict(default_config_dict()).cpu_kernels == "auto"
  cfg = default_config_dict().to_dict()
  cfg["cpu_kernels"] = "off"
  assert from_config_dict(cfg).cpu_kernels == "off"
  cfg["cpu_kernels"] = "maybe"
  with pytest.raises(ConfigError, match=r"config\.cpu_kernels: got 'maybe'; allowed: 'auto', 'on', 'off'"):
    from_config_dict(cfg)
  monkeypatch.setenv("SEQJAX_CPU_KERNELS", "off")  # The switch's variable is the field's default...
  assert from_config_dict(load_config("lm_pysrc", "smoke")).cpu_kernels == "off"
  monkeypatch.setenv("SEQJAX_CPU_KERNELS", "sometimes")  # ...and checked as such.
  with pytest.raises(ConfigError, match=r"config\.cpu_kernels: its default \$SEQJAX_CPU_KERNELS='sometimes' is "
                                        r"not one of auto, on, off"):
    default_config_dict()


def test_main_applies_cpu_kernels():
  from seqjax import main  # pylint: disable=import-outside-toplevel
  from seqjax.ops import backend  # pylint: disable=import-outside-toplevel
  before = backend.get_cpu_kernels()
  try:
    main.apply_cpu_kernels("off")
    assert backend.get_cpu_kernels() == "off"
  finally:
    backend.set_cpu_kernels(before)


@pytest.mark.parametrize("path, value, expected", [
    (("model", "attention", "num_heads"), 3, "config.model.attention.num_heads"),
    (("model", "attention", "num_kv_heads"), 3, "config.model.attention.num_kv_heads"),
    (("model", "positions"), "relative", "allowed: 'learned'"),
    (("model", "dropout"), 1.5, "config.model.dropout"),
    (("train", "batch_size"), "32", "expected int"),
    (("train", "grad_accum_steps"), 5, "must divide train.batch_size"),
    (("train", "num_steps"), 0, "config.train.num_steps"),
    (("data", "seq_len"), 512, "exceeds model.max_len"),
    (("mesh", "data"), 0, "config.mesh.data"),
    (("model", "scan_layers"), 1, "expected bool"),
])
def test_bad_values_name_the_field(path, value, expected):
  cfg = default_config_dict().to_dict()
  section = cfg
  for key in path[:-1]:
    section = section[key]
  section[path[-1]] = value
  with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
    from_config_dict(cfg)


def test_family_sections_reject_unknown_fields_and_name_the_section():
  cfg = default_config_dict().to_dict()
  cfg["model"]["ssm"]["chunks"] = 8
  with pytest.raises(ConfigError, match=r"config\.model\.ssm\.chunks: unknown field\. Did you mean 'chunk'"):
    from_config_dict(cfg)
  cfg = default_config_dict().to_dict()
  cfg["model"]["rnn_hidden"] = 64  # The flat name of before the family sections.
  with pytest.raises(ConfigError, match=r"config\.model\.rnn_hidden: unknown field"):
    from_config_dict(cfg)


def test_vocab_size_comes_from_the_tokenizer_unless_set():
  config = from_config_dict(default_config_dict())
  assert config.model.vocab_size == 0
  assert with_vocab_size(config, 259).model.vocab_size == 259
  padded = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=384))
  assert with_vocab_size(padded, 259).model.vocab_size == 384  # Padding the table is allowed.
  small = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=100))
  with pytest.raises(ConfigError, match=r"config\.model\.vocab_size: 100 is smaller than the tokenizer's"):
    with_vocab_size(small, 259)


def test_unknown_field_suggests_the_closest():
  cfg = default_config_dict().to_dict()
  cfg["train"]["num_step"] = 10
  with pytest.raises(ConfigError, match=r"config\.train\.num_step: unknown field\. Did you mean 'num_steps'"):
    from_config_dict(cfg)


def test_unknown_section():
  cfg = default_config_dict().to_dict()
  cfg["trainer"] = {}
  with pytest.raises(ConfigError, match="config.trainer: unknown field"):
    from_config_dict(cfg)


def test_ints_accepted_for_floats():
  cfg = default_config_dict().to_dict()
  cfg["optim"]["learning_rate"] = 1
  assert from_config_dict(cfg).optim.learning_rate == 1.0


def test_mixed_pattern_forbids_scan():
  cfg = default_config_dict().to_dict()
  cfg["model"]["mixer"] = "attention,lstm"
  cfg["model"]["scan_layers"] = True
  with pytest.raises(ConfigError, match="config.model.scan_layers"):
    from_config_dict(cfg)


def test_layer_mixers_repeat_the_pattern():
  cfg = default_config_dict().to_dict()
  cfg["model"].update(mixer="a, b", num_layers=5)
  assert from_config_dict(cfg).model.layer_mixers() == ("a", "b", "a", "b", "a")


def test_ssm_mode_must_be_a_mode_of_every_ssm_mixer_in_the_pattern():
  cfg = default_config_dict()
  cfg.model.mixer = "mamba2,attention"
  cfg.model.ssm.mode = "sequential"
  assert from_config_dict(cfg).model.ssm.mode == "sequential"
  cfg.model.mixer = "mamba2,s5"
  cfg.model.ssm.mode = "chunked"
  with pytest.raises(ConfigError, match=r"config.model.ssm.mode: 'chunked' is not a mode of the 's5' mixer"):
    from_config_dict(cfg)


def test_override_applies_nested_fields_and_checks_them():
  from seqjax.config import ModelConfig, override  # pylint: disable=import-outside-toplevel
  cfg = override(ModelConfig(), {"attention": {"implementation": "reference", "num_heads": 8}, "dropout": 0.1})
  assert (cfg.attention.implementation, cfg.attention.num_heads, cfg.dropout) == ("reference", 8, 0.1)
  assert cfg.attention.window == ModelConfig().attention.window
  with pytest.raises(ConfigError, match=r"config.model.attention.num_head: unknown field"):
    override(ModelConfig(), {"attention": {"num_head": 8}})
  with pytest.raises(ConfigError, match=r"config.model.dtype: got 'float16'"):
    override(ModelConfig(), {"dtype": "float16"})
  with pytest.raises(ConfigError, match=r"config.model.attention.num_heads: 3 heads do not divide"):
    override(ModelConfig(), {"attention": {"num_heads": 3}})


@pytest.mark.parametrize("changes, expected", [
    ({"model": {"context_parallel": "scatter"}}, "allowed: 'ring'"),
    ({"mesh": {"seq": 2, "data": 1}, "model": {"positions": "alibi"}}, "alibi is not supported"),
    ({"mesh": {"seq": 2, "data": 1}, "task": "seq2seq", "data": {"name": "numbers_to_words"}},
     "does not split sequences"),
    ({"model": {"mixer": "mamba2,attention", "context_parallel_layout": "zigzag"}}, "only attention"),
    ({"mesh": {"seq": 3, "data": 1}, "data": {"seq_len": 128}}, "must split evenly over mesh.seq=3"),
    ({"mesh": {"seq": 4, "data": 1}, "data": {"seq_len": 68}, "model": {"context_parallel_layout": "zigzag"}},
     "two chunks each"),
    ({"mesh": {"seq": 2, "data": 1}, "model": {"mixer": "attention,lstm"}}, "the recurrent mixer.s. lstm in"),
])
def test_context_parallel_choices_and_refusals(changes, expected):
  cfg = default_config_dict().to_dict()
  for section, values in changes.items():
    if isinstance(values, dict):
      cfg[section].update(values)
    else:
      cfg[section] = values
  with pytest.raises(ConfigError, match=expected):
    from_config_dict(cfg)
@pytest.mark.parametrize("field, value, expected", [
    ("top_p", 0.0, "config.sample.top_p: must be in (0, 1]"),
    ("top_p", 1.2, "config.sample.top_p: must be in (0, 1]"),
    ("min_p", 1.0, "config.sample.min_p: must be in [0, 1)"),
    ("num_beams", 0, "config.sample.num_beams: must be >= 1"),
    ("num_beams", 4, "config.sample.num_beams: beam search is deterministic"),  # default temperature 0.8
    ("stop_tokens", "eos,newline", "config.sample.stop_tokens: entries are token ids"),
    ("length_penalty", float("nan"), "config.sample.length_penalty: must be a finite number"),
    ("quantize", "yes", "config.sample.quantize: got 'yes' of type str; expected bool"),
])
def test_bad_sample_options_name_the_field(field, value, expected):
  cfg = default_config_dict().to_dict()
  cfg["sample"][field] = value
  with pytest.raises(ConfigError, match=re.escape(expected)):
    from_config_dict(cfg)


def test_sample_stop_tokens_parse():
  cfg = default_config_dict().to_dict()
  cfg["sample"].update(stop_tokens=" eos, 13 ,", num_beams=3, temperature=0.0)
  assert from_config_dict(cfg).sample.stop_token_ids(eos_id=2) == (2, 13)
