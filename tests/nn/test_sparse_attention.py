"""Linformer against a float64 NumPy oracle; the bidirectional declaration (refused by the LM task, trained by the
classify task); the sparse mixers training from a config (slow)."""

import importlib.util
import os

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.config import ConfigError, from_config_dict
from seqjax.nn.mixers import is_bidirectional
from seqjax.ops.attention.linformer import linformer_attention
from seqjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _np_linformer(q, k, v, e, f, keep):
  q, k, v, e, f = (np.asarray(x, np.float64) for x in (q, k, v, e, f))
  k, v = k * keep[:, :, None, None], v * keep[:, :, None, None]
  kp, vp = np.einsum("bskh,sp->bpkh", k, e), np.einsum("bskh,sp->bpkh", v, f)
  G = q.shape[2] // k.shape[2]
  kp, vp = np.repeat(kp, G, axis=2), np.repeat(vp, G, axis=2)  # query head n uses kv head n // G
  s = np.einsum("btnh,bpnh->bntp", q, kp) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bntp,bpnh->btnh", p / p.sum(-1, keepdims=True), vp)


class LinformerTest(parameterized.TestCase):

  def _args(self):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 11, 4, 8))
    k, v = rng.standard_normal((2, 11, 2, 8)), rng.standard_normal((2, 11, 2, 8))
    e, f = rng.standard_normal((11, 5)) / 3, rng.standard_normal((11, 5)) / 3
    keep = np.ones((2, 11), bool)
    keep[1, 8:] = False
    return q, k, v, e, f, keep

  def test_forward_and_gradients_equal_numpy(self):
    q, k, v, e, f, keep = self._args()
    fn = jax.jit(lambda q, k, v, e, f: linformer_attention(q, k, v, e, f, key_mask=jnp.asarray(keep)))
    args32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, e, f)]
    np.testing.assert_allclose(fn(*args32), _np_linformer(q, k, v, e, f, keep), atol=2e-5)
    w = np.random.default_rng(1).standard_normal(q.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2, 3, 4)))(*args32)
    rng, eps = np.random.default_rng(2), 1e-6
    for i, g in enumerate(grads):
      d = rng.standard_normal(g.shape)
      plus, minus = [q, k, v, e, f], [q, k, v, e, f]
      plus[i], minus[i] = plus[i] + eps * d, minus[i] - eps * d
      numeric = (np.sum(_np_linformer(*plus, keep) * w) - np.sum(_np_linformer(*minus, keep) * w)) / (2 * eps)
      np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * d), numeric, rtol=1e-4, atol=1e-4)

  def test_padding_keys_change_nothing(self):
    q, k, v, e, f, keep = self._args()
    k2 = k.copy()
    k2[1, 8:] += 5.0
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    out = [linformer_attention(f32(q), f32(kk), f32(v), f32(e), f32(f), key_mask=jnp.asarray(keep)) for kk in (k, k2)]
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)

  def test_bad_shapes_are_clear_errors(self):
    q, k, v, e, f, _ = self._args()
    with self.assertRaisesRegex(ValueError, r"projections e, f of shape \[S=11, P\]"):
      linformer_attention(q, k, v, e[:5], f[:5])


def _config_dict(arg):
  spec = importlib.util.spec_from_file_location("synthetic_cfg", os.path.join(ROOT, "configs", "synthetic.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg).to_dict()


def test_linformer_is_bidirectional_and_refused_by_the_lm():
  assert is_bidirectional("linformer") and not is_bidirectional("longformer")
  cfg = _config_dict("mqar,smoke")
  cfg["model"]["mixer"] = "linformer"
  with pytest.raises(ConfigError, match="'linformer' is bidirectional"):
    from_config_dict(cfg)


def _smoke(variant, mixer, tmp_path, steps):
  cfg = _config_dict(f"{variant},smoke")
  cfg["data"]["data_dir"] = str(tmp_path / "data")
  cfg["model"]["mixer"] = mixer
  cfg["model"]["sparse"] = {"window": 8, "block_size": 8, "chunk": 8, "projected_len": 16}
  cfg["train"].update(num_steps=steps, eval_every=steps, checkpoint_every=steps, log_every=1, eval_batches=1)
  return from_config_dict(cfg)


@pytest.mark.slow
def test_linformer_trains_the_listops_classifier(tmp_path):
  config = _smoke("listops", "linformer", tmp_path, steps=3)
  final = loop.train(config, str(tmp_path / "work"))
  assert final["step"] == 3 and np.isfinite(final["loss"]) and 0 <= final["accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["longformer", "bigbird", "reformer"])
def test_sparse_mixers_train_the_lm_from_a_config(mixer, tmp_path):
  config = _smoke("mqar", mixer, tmp_path, steps=3)
  final = loop.train(config, str(tmp_path / "work"))
  assert final["step"] == 3 and np.isfinite(final["loss"])
