"""Small models and synthetic batches shared by the trainer tests."""

import numpy as np

from seqjax.config import default_config_dict, from_config_dict


def tiny_config(**overrides):
  cfg = default_config_dict().to_dict()
  cfg["model"].update(d_model=32, num_layers=2, mlp_dim=64, max_len=32, vocab_size=259)
  cfg["model"]["attention"].update(num_heads=2, implementation="reference")
  cfg["data"].update(seq_len=16)
  cfg["train"].update(batch_size=8, num_steps=10)
  cfg["sample"].update(num_tokens=8)
  cfg["optim"].update(learning_rate=3e-3, warmup_steps=2)
  for section, values in overrides.items():
    if isinstance(values, dict):
      _merge(cfg[section], values)
    else:
      cfg[section] = values
  return from_config_dict(cfg)


def _merge(into: dict, values: dict) -> None:
  """Nested update: {"attention": {"num_heads": 4}} changes one field of a family section."""
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(into.get(key), dict):
      _merge(into[key], value)
    else:
      into[key] = value


def synthetic_batch(batch_size=8, seq_len=16, vocab=259, seed=0, two_docs=True):
  """Random tokens packed as two documents per row (segment ids 1 and 2, positions restarting)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, size=(batch_size, seq_len + 1)).astype(np.int32)
  seg = np.ones((batch_size, seq_len), np.int32)
  pos = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))
  if two_docs:
    cut = seq_len // 2
    seg[:, cut:] = 2
    pos[:, cut:] = np.arange(seq_len - cut)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
          "weights": np.ones((batch_size, seq_len), np.float32),
          "target_bytes": np.ones((batch_size, seq_len), np.int32)}
