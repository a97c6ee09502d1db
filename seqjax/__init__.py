"""seqjax: sequence models in JAX/Flax sharing one trainer, decoder and sharding layer."""

__version__ = "0.1.0"


def __getattr__(name: str):
  """`seqjax.load` (seqjax.train.saved.load), imported on first use so that `import seqjax` stays light."""
  if name == "load":
    from seqjax.train.saved import load  # pylint: disable=import-outside-toplevel
    return load
  raise AttributeError(f"module 'seqjax' has no attribute {name!r}")
