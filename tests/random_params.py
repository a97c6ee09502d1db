"""LM parameters drawn in NumPy for equivalence tests (compiling the LM's `init` costs more than most such tests).

The tree and shapes are the model's own (`jax.eval_shape` of `init`); the values are drawn here: embeddings N(0, 1),
matrices N(0, 1 / fan_in) with fan_in the product of all but the last axis, 1-d scales 1 + N(0, 0.1^2) and other
1-d parameters (biases, SSM vectors) N(0, 0.1^2).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def random_lm_params(model: nn.Module, seq_len: int = 16, seed: int = 0):
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(leaf.shape)
    if leaf.ndim == 1:
      value = (1.0 if "scale" in name else 0.0) + 0.1 * noise
    elif "embedding" in name:
      value = noise
    else:
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
