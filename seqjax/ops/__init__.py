"""Pure jax.numpy kernels: arrays in, arrays out. No Flax, no config.

Packages by family: `attention` (registry, reference, blockwise, Pallas, masks, positions), `recurrent` (RNN, LSTM,
GRU), `ssm` (S4D, S5, selective scan, SSD), `dense` (flat matmuls, MLP, LayerNorm). `backend` is the one choice
of CPU kernels (`seqjax.cpu_kernels`) per op family and holds the switch `SEQJAX_CPU_KERNELS`.
"""
