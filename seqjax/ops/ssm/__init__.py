"""State-space model kernels: the public entry (`from seqjax.ops import ssm`).

One recurrence family, several exact ways to compute it, proven equal by tests (tests/ops/ssm/):
- Mamba's selective scan (S6), `selective_scan` in modes "sequential" / "parallel" / "chunked" (default), and its
  decoding step `selective_step`                                                (implementation: `selective.py`);
- Mamba-2's SSD, `ssd` in modes "sequential" / "chunked" (default), and `ssd_step`               (`ssd.py`);
- S4D: `discretize`, the Vandermonde kernel `s4d_kernel`, `causal_fft_conv`, `s4d_conv`, the recurrent forms
  `s4d_recurrent` / `s4d_step`; S5: `s5_scan` / `s5_step`                                   (`s4.py`);
- S4D in chunks, exact with segment resets, `s4d_chunked`                                        (`s4_chunked.py`).

Legend: B batch, T length, E expanded width / channels, P state size (the Mamba paper's N), N heads (SSD),
H head dim, C chunk length. States are accumulated in float32 (complex64 for S4D/S5). Every scan takes
`segment_ids` [B, T] (the state resets where the id changes: packed sequences), an initial state and can return
its final state; `keep_mask` (`_common.py`) turns segment ids into the reset mask they all use. Every op accepts any
array-like (NumPy arrays included).
"""

from seqjax.ops.ssm._common import keep_mask
from seqjax.ops.ssm.s4 import (DISCRETIZATIONS, RECURRENT_MODES, causal_fft_conv, diagonal_recurrence, discretize,
                               s4d_conv, s4d_kernel, s4d_recurrent, s4d_step, s5_scan, s5_step)
from seqjax.ops.ssm.s4_chunked import DEFAULT_CHUNK as S4D_DEFAULT_CHUNK
from seqjax.ops.ssm.s4_chunked import s4d_chunked
from seqjax.ops.ssm.selective import MODES, selective_scan, selective_step
from seqjax.ops.ssm.ssd import MODES as SSD_MODES
from seqjax.ops.ssm.ssd import ssd, ssd_step

__all__ = [
    "DISCRETIZATIONS", "MODES", "RECURRENT_MODES", "SSD_MODES", "causal_fft_conv", "diagonal_recurrence",
    "discretize", "keep_mask", "s4d_conv", "s4d_kernel", "s4d_recurrent", "s4d_step", "s5_scan", "s5_step",
    "selective_scan", "selective_step", "ssd", "ssd_step", "s4d_chunked", "S4D_DEFAULT_CHUNK",
]
