"""Decoding for any `DecoderLM`: `generate` (greedy, sampling, beam search), its result, and the samplers.

See docs/decoding.md.
"""

from seqjax.decode.common import GenerateResult
from seqjax.decode.generate import generate
from seqjax.decode.samplers import Sampler

__all__ = ["GenerateResult", "Sampler", "generate"]
