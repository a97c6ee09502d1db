"""The LM's forward in bfloat16 against float32 with the same (float32) parameters.

Only the compute dtype differs, so the two runs differ by bfloat16 rounding alone: 8 significant bits, a relative
error of at most 2^-9 (0.2%) per rounded value. The logits pass through an embedding lookup, two blocks of a few
rounded matmuls, norms and residual adds, and a rounded read-out; measured at these sizes the error is ~0.55% of
the float32 logits' scale (both the largest error against the largest logit, and in RMS). The tolerances below,
2% of the largest float32 logit for any single logit and 1.5% in RMS, allow a few times that and stay far below
what a wrong bfloat16-only path produces (a dropped bias or a wrong activation: 5-50%).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.models.lm import DecoderLM
from tests.random_params import random_lm_params
from tests.train.helpers import synthetic_batch, tiny_config


@pytest.mark.parametrize("implementation", ["blockwise", "reference"])
def test_bf16_forward_close_to_float32(implementation):
  """Catches (each planted once by rewriting a bfloat16-only path in a scratch plugin; both kernels failed): the
  plain-JAX LayerNorm (taken for bfloat16; float32 runs the CPU kernel) dropping its bias, the plain-JAX MLP (idem)
  applying relu instead of gelu."""
  attention = {"implementation": implementation}
  config32 = tiny_config(model={"attention": attention})
  config16 = tiny_config(model={"attention": attention, "dtype": "bfloat16"})
  params = random_lm_params(DecoderLM(config32.model), 16)
  batch = synthetic_batch(batch_size=4)

  def logits(config):
    model = DecoderLM(config.model)
    fn = jax.jit(lambda p, x, s, t: model.apply({"params": p}, x, segment_ids=s, positions=t))
    return np.asarray(fn(params, *(jnp.asarray(batch[k]) for k in ("inputs", "segment_ids", "positions"))))

  l32, l16 = logits(config32), logits(config16)
  assert l16.dtype == np.float32  # the LM returns float32 logits whatever the compute dtype
  scale = float(np.max(np.abs(l32)))
  assert scale > 1.0
  err = np.abs(l16 - l32)
  assert float(np.max(err)) <= 0.02 * scale, float(np.max(err)) / scale
  assert float(np.sqrt(np.mean(err ** 2))) <= 0.015 * float(np.sqrt(np.mean(l32 ** 2)))
  assert np.mean(np.argmax(l16, -1) == np.argmax(l32, -1)) > 0.9  # the predictions mostly agree
