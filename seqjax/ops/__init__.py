"""Pure jax.numpy kernels: arrays in, arrays out. No Flax, no config."""
