"""int8 weight-only quantization (`seqjax.decode.quantize`, `seqjax.ops.quant`).

- Per-channel scales and values against a float64 NumPy oracle, every entry within scale / 2 of the weight
  (bugs caught: a scale per tensor instead of per channel, reducing over the wrong axes, truncation instead of
  rounding, a scale of 255 / 2 levels).
- Which leaves are quantized: kernels and embeddings yes (a scanned stack keeps one scale set per layer), norm
  scales and biases no; the parameter-memory ratio against a count by hand.
- The quantized model's logits stay close to the float model's, and `generate` with quantized params decodes
  exactly what the dequantized float params decode (the on-the-fly dequantization inside the program).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.decode import QuantizedTensor, dequantize, generate, parameter_bytes, quantize
from seqjax.ops.quant import dequantize_int8, quantize_int8
from tests.decode.helpers import full_log_probs, make_lm, model_config


@pytest.mark.parametrize("shape, axes", [((64, 48), (0,)), ((32, 4, 8), (0,)), ((3, 16, 20), (1,)),
                                         ((40, 24), (1,))])
def test_quantize_int8_against_numpy(shape, axes):
  w = np.random.default_rng(0).standard_normal(shape) * np.linspace(0.01, 3.0, shape[-1])
  w[..., 0] = 0.0  # an all-zero channel when the last axis is a channel axis
  values, scale = quantize_int8(jnp.asarray(w, jnp.float32), axes)
  values, scale = np.asarray(values), np.asarray(scale, np.float64)
  expected_scale = np.max(np.abs(w), axis=axes, keepdims=True) / 127.0
  expected_scale = np.where(expected_scale > 0, expected_scale, 1.0)
  np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
  assert values.dtype == np.int8 and values.min() >= -127 and values.max() <= 127
  assert np.max(np.abs(values - np.round(w / expected_scale))) <= 1  # float32 division may round a tie apart
  error = np.abs(np.asarray(dequantize_int8(values, scale), np.float64) - w)
  assert np.all(error <= expected_scale / 2 * (1 + 1e-5) + 1e-7), float(np.max(error / expected_scale))
  # Each channel's largest weight maps to +-127: the scale is per channel, not per tensor.
  np.testing.assert_array_equal(np.max(np.abs(values), axis=axes), np.where(
      np.max(np.abs(w), axis=axes) > 0, 127, 0))


def test_which_leaves_are_quantized_and_the_memory_ratio():
  model, params = make_lm(model_config("attention", d_model=32, mlp_dim=128, vocab=64, num_layers=2))
  qparams = quantize(params, min_size=256)
  flat = {jax.tree_util.keystr(p): x for p, x in
          jax.tree_util.tree_leaves_with_path(qparams, is_leaf=lambda x: isinstance(x, QuantizedTensor))}
  quantized = {k for k, x in flat.items() if isinstance(x, QuantizedTensor)}
  assert "['embed']['embedding']" in quantized
  assert any("['mlp']" in k and "kernel" in k for k in quantized)
  assert not any("norm" in k or "bias" in k for k in quantized), quantized
  embed = flat["['embed']['embedding']"]
  assert embed.scale.shape == (64, 1)  # one scale per token row
  # Memory by hand: float32 leaves stay 4 bytes per entry; a quantized one is 1 byte per entry + 4 per scale.
  expected = sum(x.values.size + 4 * x.scale.size if isinstance(x, QuantizedTensor) else 4 * x.size
                 for x in flat.values())
  assert parameter_bytes(qparams) == expected
  assert parameter_bytes(qparams) / parameter_bytes(params) < 0.35


def test_a_scanned_stack_keeps_one_scale_set_per_layer():
  model, params = make_lm(model_config("attention", scan_layers=True, num_layers=3, d_model=32, mlp_dim=64))
  qparams = quantize(params, min_size=256)
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(qparams, is_leaf=lambda x: isinstance(x, QuantizedTensor))
             if isinstance(x, QuantizedTensor) and "layers" in jax.tree_util.keystr(p)]
  assert kernels and all(k.scale.shape[0] == 3 and k.scale.shape[1] == 1 for k in kernels)


def test_quantized_logits_are_close_and_generate_dequantizes_on_the_fly():
  model, params = make_lm(model_config("attention", d_model=64, mlp_dim=256, vocab=32, num_layers=2,
                                       positions="rope"), embed_scale=1.0)
  qparams = quantize(params, min_size=256)
  prompts = np.asarray([[1, 5, 7, 2, 9, 3], [1, 3, 4, 8, 0, 0]], np.int32)
  exact = full_log_probs(model, params, prompts)
  approx = full_log_probs(model, dequantize(qparams), prompts)
  # int8 error per weight <= scale / 2 ~ 0.4% of a channel's largest weight: the log-probabilities move by a
  # few hundredths of their spread at most.
  assert np.max(np.abs(approx - exact)) < 0.05 * np.std(exact), (np.max(np.abs(approx - exact)), np.std(exact))
  assert np.mean(np.abs(approx - exact)) < 0.02 * np.std(exact)
  assert np.max(np.abs(approx - exact)) > 0  # the quantization did change something
  lengths = np.asarray([6, 4], np.int32)
  on_the_fly = generate(model, qparams, prompts, prompt_lengths=lengths, max_new_tokens=6)
  materialized = generate(model, dequantize(qparams), prompts, prompt_lengths=lengths, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(on_the_fly.tokens), np.asarray(materialized.tokens))
  np.testing.assert_allclose(np.asarray(on_the_fly.scores), np.asarray(materialized.scores), rtol=1e-5, atol=1e-5)
