"""Recurrent cells: Elman RNN, LSTM, GRU over sequences (`lstm`, `gru`, `rnn`) and one token at a time
(`lstm_step`, `gru_step`, `rnn_step`).

Layout and conventions (PyTorch / cuDNN compatible, so checkpoints port both ways): batch-major sequences
``x [B, T, I]`` in, ``ys [B, T, R]`` out; weights ``w_ih [Z*R, I]``, ``w_hh [Z*R, R]``, biases ``b_ih, b_hh [Z*R]``
with Z gates stacked (RNN 1; LSTM 4, order i, f, g, o; GRU 3, order r, z, n, with ``b_hn`` inside the reset
product). Dimension legend: B batch, T sequence length, I input width, R recurrent state width, Z gates
per cell, X = Z * R stacked gates.

Modules:
  cells.py     the pointwise cell updates and the single-token steps (decoding);
  sequence.py  the sequence ops: checks, lengths / reverse / segment resets, the choice of kernel;
  scan.py      the chunked, software-pipelined `lax.scan` kernel with a hand-written backward (GPU/TPU, and a
               CPU where the C++ kernel of `seqjax.cpu_kernels.recurrent` does not apply).

Speed and memory: docs/recurrent.md.
"""

from seqjax.ops.recurrent.cells import NONLINEARITIES, NUM_GATES, gru_step, lstm_step, rnn_step
from seqjax.ops.recurrent.sequence import DEFAULT_CHUNK, DEFAULT_UNROLL, gru, lstm, rnn

__all__ = ["DEFAULT_CHUNK", "DEFAULT_UNROLL", "NONLINEARITIES", "NUM_GATES", "gru", "gru_step", "lstm", "lstm_step",
           "rnn", "rnn_step"]
