"""`DecoderLM.extend` + `commit` (seqjax.nn.extend) for every registered mixer, a sliding window, a hybrid and a
scanned stack: the logits of a T-token extension equal T cached steps' logits, and committing the first count[b]
tokens of each row leaves the cache those count[b] steps leave (checked by the logits of the steps that follow).

Bugs this catches: an extension query seeing a later new token (future leak), a ring buffer overwritten before an
earlier query of the extension read it, RoPE / learned positions not advanced per new token, a commit that writes
the rejected tokens or picks the state of the wrong position (the next steps' logits then differ).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import AttentionConfig
from seqjax.nn import contract

from tests.decode.helpers import CASES, make_lm, model_config

PROMPTS = np.asarray([[1, 5, 7, 2, 9], [1, 3, 0, 0, 0], [1, 11, 4, 6, 0]], np.int32)
LENGTHS = np.asarray([5, 2, 4], np.int32)
EXTENSION = np.asarray([[3, 8, 2, 6], [7, 7, 1, 4], [2, 9, 5, 10]], np.int32)
COUNTS = np.asarray([4, 1, 2], np.int32)
EXTRA_CASES = {
    "attention_window_ring": model_config("attention", window=4, positions="alibi"),
  "attention_window_shorter_than_extension": model_config("attention", window=2, positions="rope"),
    "attention_gqa_rope_scanned": model_config("attention", positions="rope", scan_layers=True, num_layers=2,
                                               attention=AttentionConfig(num_heads=2, num_kv_heads=1,
                                                                         implementation="reference")),
}


# The fast suite keeps one case per kind of pending extension (attention's parallel pass over a ring with ALiBi;
# stepped states of an SSM) and the hybrid; every other mixer runs with -m slow (each case compiles four programs).
FAST = ("attention_window_ring", "mamba2", "hybrid_mamba_attention_lstm")


def _cases():
  return {**CASES, **EXTRA_CASES}


@pytest.mark.parametrize("case", [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
                                  for name in _cases()])
def test_extend_and_commit_equal_cached_steps(case):
  cfg = _cases()[case]
  model, params = make_lm(cfg)
  apply = jax.jit(model.apply, static_argnames="method")
  variables = {"params": params}
  _, cache = apply(variables, PROMPTS, lengths=LENGTHS, method="prefill")
  # Steps: the logits of each extension token, and the cache after count[b] tokens of each row.
  stepped, caches = [], []
  c = cache
  for t in range(EXTENSION.shape[1]):
    logits, c = apply(variables, EXTENSION[:, t], c, method="step")
    stepped.append(np.asarray(logits))
    caches.append(c)
  extended, pending = apply(variables, EXTENSION, cache, method="extend")
  np.testing.assert_allclose(np.asarray(extended), np.stack(stepped, axis=1), rtol=2e-5, atol=2e-5)
  committed = jax.jit(model.commit)(cache, pending, COUNTS)
  np.testing.assert_array_equal(np.asarray(committed["position"]), LENGTHS + COUNTS)
  # Continue from the committed cache and from each row's own stepped cache: the same logits.
  reference = caches[0]
  for count in range(2, EXTENSION.shape[1] + 1):
    reference = contract.where_rows(jnp.asarray(COUNTS == count), caches[count - 1], reference)
  for token_B in np.asarray([[4, 6, 12], [2, 1, 3]], np.int32):
    logits_commit, committed = apply(variables, token_B, committed, method="step")
    logits_ref, reference = apply(variables, token_B, reference, method="step")
    np.testing.assert_allclose(np.asarray(logits_commit), np.asarray(logits_ref), rtol=2e-5, atol=2e-5)
