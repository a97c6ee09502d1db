"""Tiny decoder LMs for the decoding tests: one per mixer family, float32, small vocabularies."""

import functools

import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqjax.config import AttentionConfig, ModelConfig, SsmConfig
from seqjax.models.lm import DecoderLM
from seqjax.nn.mixers import available_mixers, is_bidirectional


def model_config(mixer: str, *, vocab: int = 13, window: int = 0, num_layers: int = 1, **model) -> ModelConfig:
  attention = AttentionConfig(num_heads=2, window=window, implementation="reference")
  base = dict(mixer=mixer, d_model=16, num_layers=num_layers, mlp_dim=32, vocab_size=vocab, max_len=24,
              attention=attention, ssm=SsmConfig(state=4, head_dim=8, chunk=4))
  return ModelConfig(**{**base, **model})


# Every registered causal mixer (a newly registered one is covered without editing this file; bidirectional ones such
# as linformer have no decoding), sliding-window attention,
# a hybrid and a scanned stack (layer states stacked on a leading axis: the batch is axis 1 of their leaves).
CASES = {name: model_config(name) for name in available_mixers() if not is_bidirectional(name)}
CASES.update({
    "attention_window": model_config("attention", window=3, positions="rope"),
    "hybrid_mamba_attention_lstm": model_config("mamba,attention,lstm", num_layers=3, positions="sinusoidal"),
    "attention_scanned": model_config("attention", scan_layers=True, num_layers=2, positions="learned"),
})


def make_lm(cfg: ModelConfig, seed: int = 0, embed_scale: float = 4.0):
  """(model, params) with random parameters; the embedding is scaled up so that the next-token distributions of
  the tiny models are far from uniform (no near-ties between the argmax and the runner-up); 1: as initialised."""
  model = DecoderLM(cfg)
  # lazy_init runs only the initialisers (no eager forward); the "rbg" generator compiles them fast.
  example = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  params = nn.unbox(model.lazy_init(jax.random.key(seed, impl="rbg"), example)["params"])
  params["embed"] = jax.tree.map(lambda x: x * embed_scale, params["embed"])
  return model, params


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(model.apply)  # one wrapper per model: a fresh `jax.jit(model.apply)` would compile every call


def full_log_probs(model, params, tokens_BL) -> np.ndarray:
  """float64 log-probabilities [B, L, V] of each next token from the parallel (uncached) forward."""
  logits = np.asarray(_jitted_apply(model)({"params": params}, jnp.asarray(tokens_BL)), np.float64)
  logits -= logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


# One mixer of each family runs every per-mixer case in `make test`; the others run in `make test-slow`. Every
# registered mixer's prefill + steps is still checked in `make test` by the conformance harness's decode check
# (tests/test_conformance.py); these per-family cases add the plumbing around it (generate's loop, the LM's cache).
REPRESENTATIVE_MIXERS = frozenset({"attention", "lstm", "mamba", "mamba2", "s4d", "gla", "deltanet", "longformer"})


def tiered(names, registered=None):
  """pytest params over `names`: a registered mixer outside REPRESENTATIVE_MIXERS is marked slow; composite cases
  (hybrids, scanned stacks, windows: not registered names) always run."""
  registered = set(available_mixers()) if registered is None else set(registered)
  return [pytest.param(n, marks=pytest.mark.slow) if n in registered and n not in REPRESENTATIVE_MIXERS else n
          for n in names]
