"""The S4D mixer's modes agree with segment ids: conv (which runs the chunked form there), chunked, parallel,
sequential — outputs, parameter gradients and the prefill state."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import config
from seqjax.nn import ssm as ssm_nn

D_MODEL, LENGTH = 8, 19
SEGMENTS = np.array([[1] * 5 + [2] * 9 + [3] * 5, [4] * 12 + [0] * 7], np.int32)  # row 1 right-padded (id 0)


def _apply(mode, params, x, **kw):
  return ssm_nn.S4D(d_model=D_MODEL, d_state=4, mode=mode, chunk_size=4).apply(params, x, segment_ids=SEGMENTS,
                                                                              **kw)


def test_modes_agree_with_segment_ids():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, LENGTH, D_MODEL)), jnp.float32)
  params = ssm_nn.S4D(d_model=D_MODEL, d_state=4).init(jax.random.PRNGKey(1), x)
  w = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
  results = {}
  for mode in ssm_nn.S4D_MODES:
    loss = lambda p, mode=mode: jnp.sum(_apply(mode, p, x) * w)
    prefill = jax.jit(functools.partial(_apply, mode, return_state=True))
    results[mode] = (jax.jit(functools.partial(_apply, mode))(params, x), jax.jit(jax.grad(loss))(params),
                     *prefill(params, x))
  y_ref, g_ref, y_pre_ref, h_ref = results["sequential"]
  for mode in ("conv", "chunked", "parallel"):
    y, g, y_pre, h = results[mode]
    scale = float(np.max(np.abs(np.asarray(y_ref))))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=0, atol=3e-5 * scale, err_msg=mode)
    np.testing.assert_allclose(np.asarray(y_pre), np.asarray(y_pre_ref), rtol=0, atol=3e-5 * scale, err_msg=mode)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), rtol=0, atol=3e-5 * float(np.max(np.abs(h_ref))),
                               err_msg=mode)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * max(1.0, np.max(np.abs(b))),
                                 err_msg=mode)


def test_mode_validation():
  x = jnp.ones((1, 4, D_MODEL))
  with pytest.raises(ValueError, match="S4D: mode='scan' is not one of"):
    ssm_nn.S4D(d_model=D_MODEL, mode="scan").init(jax.random.PRNGKey(0), x)
  assert config.SSM_MODES["s4d"] == ssm_nn.S4D_MODES
