"""Decoding for any `DecoderLM`: `generate` (greedy, sampling, beam search, speculative decoding), its result, the
samplers, and int8 weight-only quantization (`quantize`).

See docs/decoding.md.
"""

from seqjax.decode.common import GenerateResult
from seqjax.decode.generate import generate
from seqjax.decode.quantize import QuantizedTensor, dequantize, parameter_bytes, quantize
from seqjax.decode.samplers import Sampler

__all__ = ["GenerateResult", "QuantizedTensor", "Sampler", "dequantize", "generate", "parameter_bytes", "quantize"]
