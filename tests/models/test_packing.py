"""Packed rows equal the same documents run one per row.

A row holding documents A | B (segment ids 1 then 2, positions restarting at 0 at B) must give, on A's positions,
the logits of A alone and, on B's positions, the logits of B alone — each alone in a row of its own with positions
0..len-1 and no segment ids at all (so the reference side does not depend on the segment mask; the tokens after a
document in its own row are filler that causality hides). The LM runs its default attention kernel.

What each position encoding lets this see: with learned (and sinusoidal) positions a model that ignored the given
`positions` (counting from the row start) gives B the embeddings of positions len(A).. and fails; with RoPE and ALiBi
only distances inside a document matter, so for them the test sees a document that attends to another one, not
ignored positions (both planted: see the test's docstring).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.models.lm import DecoderLM
from tests.random_params import random_lm_params
from tests.train.helpers import tiny_config

T = 16
LEN_A, LEN_B = 7, 9


def _rows(seed=0):
  rng = np.random.default_rng(seed)
  doc_a = rng.integers(3, 259, LEN_A)
  doc_b = rng.integers(3, 259, LEN_B)
  packed = np.concatenate([doc_a, doc_b])[None]
  seg = np.array([[1] * LEN_A + [2] * LEN_B])
  pos = np.array([list(range(LEN_A)) + list(range(LEN_B))])
  filler = rng.integers(3, 259, T)
  alone = np.stack([np.concatenate([doc_a, filler[:T - LEN_A]]), np.concatenate([doc_b, filler[:T - LEN_B]])])
  return (jnp.asarray(packed, jnp.int32), jnp.asarray(seg, jnp.int32), jnp.asarray(pos, jnp.int32),
          jnp.asarray(alone, jnp.int32))


@pytest.mark.parametrize("positions, mixer", [("learned", "attention"), ("rope", "attention"),
                                              ("alibi", "attention"), ("learned", "mamba,attention")])
def test_packed_documents_equal_documents_alone(positions, mixer):
  """Catches (each planted once in a scratch plugin): the LM ignoring the given positions (learned cases failed;
  rope and alibi passed, as explained above), the segment mask dropped before the attention kernel (every case
  failed), the Mamba conv reaching across the document boundary (the hybrid case failed)."""
  config = tiny_config(model={"positions": positions, "mixer": mixer,
                              "attention": {"implementation": "blockwise"}, "ssm": {"state": 4}})
  model = DecoderLM(config.model)
  params = random_lm_params(model, T)
  packed, seg, pos, alone = _rows()
  packed_logits = jax.jit(lambda p, x, s, t: model.apply({"params": p}, x, segment_ids=s, positions=t))(
      params, packed, seg, pos)
  alone_logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, alone)
  scale = float(jnp.max(jnp.abs(alone_logits)))
  np.testing.assert_allclose(packed_logits[0, :LEN_A], alone_logits[0, :LEN_A], rtol=0, atol=1e-5 * scale,
                             err_msg="document A")
  np.testing.assert_allclose(packed_logits[0, LEN_A:], alone_logits[1, :LEN_B], rtol=0, atol=1e-5 * scale,
                             err_msg="document B")
