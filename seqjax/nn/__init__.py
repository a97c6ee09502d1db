"""Thin Flax linen modules: they own parameters and call `seqjax.ops`."""
