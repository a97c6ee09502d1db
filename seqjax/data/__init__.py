"""Datasets (TFDS builders built locally), the byte tokenizer and the grain packing pipeline."""

from seqjax.data.pipeline import DataUnavailableError, LMData, make_lm_data
from seqjax.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "DataUnavailableError", "LMData", "make_lm_data"]
