"""seqjax: sequence models in JAX/Flax sharing one trainer, decoder and sharding layer."""

__version__ = "0.1.0"
