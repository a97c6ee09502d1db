"""S4D in chunks: exact with segment resets, without materialising the [B, T, E, P] states.

Legend: B batch, T length, E channels, P state size (complex, half of each conjugate pair), M number of chunks,
C chunk length (i indexes the output position inside a chunk, j the input position).

The recurrence (see `s4.py`): h_t = dA h_{t-1} + dB u_t, y_t = 2 Re(C h_t) + D u_t, per channel, with the state
zeroed before every position whose segment id differs from the previous one's. The FFT convolution cannot reset
and the associative scan (`s4d_recurrent`, mode "parallel") writes a complex [B, T, E, P] tensor several times
per pass. `s4d_chunked` splits T into chunks of C positions and runs a `lax.scan` over the M chunks:

- inside a chunk, y_i = sum_{j <= i, same segment} K[i - j] u_j with the S4D kernel K [E, C] (`s4d_kernel`, the
  Vandermonde product 2 Re(sum_p C dB dA^l)): a Toeplitz [C, C, E] shared by all chunks, masked per row and chunk
  to the pairs with the same count of resets up to them (float32);
- the state entering the chunk, h_in [B, E, P], is read out by the positions before the chunk's first reset:
  y_i += 2 Re(sum_p C dA^(i+1) h_in) (closed form; every power of |dA| <= 1, nothing overflows);
- the state leaving the chunk is sum over the chunk's last segment of dA^(C-1-j) dB u_j, plus dA^C h_in when the
  chunk has no reset — the carry of the scan.

The chunk step is rematerialised (`jax.checkpoint`): the backward pass recomputes one chunk's masked Toeplitz
instead of keeping an [M, B, C, C] stack. T need not be a multiple of C (the last chunk is zero-padded; the end
state is taken at the last real position).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.ssm._common import as_arrays, keep_mask
from seqjax.ops.ssm.s4 import s4d_kernel
from seqjax.ops.vma import vary_like

DEFAULT_CHUNK = 16


def _powers(log_dA_EP: jax.Array, exponents_L: jax.Array) -> jax.Array:
  """dA^k for each k of exponents_L: [L, E, P] complex64."""
  return jnp.exp(exponents_L.astype(jnp.float32)[:, None, None] * log_dA_EP)


def _end_state(h_BEP, u_BLE, count_BL, write_LEP, carry_EP):
  """The state after the L positions of u: the last segment's inputs, plus h decayed if nothing reset.

  count_BL is the number of resets up to each position (0: the position continues from h_BEP); write_LEP is
  dA^(L-1-j) dB and carry_EP is dA^L.
  """
  last_BL = (count_BL == count_BL[:, -1:]).astype(jnp.float32)
  um_BLE = u_BLE * last_BL[..., None]
  h_new_BEP = lax.complex(jnp.einsum("ble,lep->bep", um_BLE, write_LEP.real),
                          jnp.einsum("ble,lep->bep", um_BLE, write_LEP.imag))
  return h_new_BEP + jnp.where((count_BL[:, -1] == 0)[:, None, None], carry_EP * h_BEP, 0)


def s4d_chunked(u_BTE: jax.Array, dA_EP: jax.Array, dB_EP: jax.Array, C_EP: jax.Array,
                D_E: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                initial_state: jax.Array | None = None, return_final_state: bool = False,
                chunk: int = DEFAULT_CHUNK):
  """S4D in chunks (module docstring): y [B, T, E] in u's dtype, and optionally the final state [B, E, P] complex64.

  Same arguments and results as `s4d_recurrent`, plus `chunk` (C, default 16; min(C, T) is used).
  """
  u_BTE, dA_EP, dB_EP, C_EP, D_E, initial_state, segment_ids = as_arrays(u_BTE, dA_EP, dB_EP, C_EP, D_E,
                                                                         initial_state, segment_ids)
  if u_BTE.ndim != 3:
    raise ValueError(f"s4d_chunked: u must be [B, T, E], got shape {u_BTE.shape}")
  b, l, e = u_BTE.shape
  p = dA_EP.shape[-1]
  if dA_EP.shape != (e, p) or dB_EP.shape != (e, p) or C_EP.shape != (e, p):
    raise ValueError(f"s4d_chunked: dA, dB, C must be [E, P] with E={e}, got {dA_EP.shape}, {dB_EP.shape}, "
                     f"{C_EP.shape}")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"s4d_chunked: segment_ids must be [B, T] = {(b, l)}, got {segment_ids.shape}")
  if initial_state is not None and initial_state.shape != (b, e, p):
    raise ValueError(f"s4d_chunked: initial_state must be [B, E, P] = {(b, e, p)}, got {initial_state.shape}")
  if not isinstance(chunk, int) or chunk <= 0:
    raise ValueError(f"s4d_chunked: chunk must be a positive int, got {chunk!r}")
  chunk = min(chunk, l)
  m = -(-l // chunk)
  pad = m * chunk - l

  dA_EP, dB_EP, C_EP = (a.astype(jnp.complex64) for a in (dA_EP, dB_EP, C_EP))
  log_dA_EP = jnp.log(dA_EP)
  u32_BTE = u_BTE.astype(jnp.float32)
  # The Toeplitz of the kernel inside a chunk, [C, C, E]: K[i - j] for j <= i, else 0.
  kernel_EC = s4d_kernel(dA_EP, dB_EP, C_EP, chunk)
  lag_CC = jnp.arange(chunk)[:, None] - jnp.arange(chunk)[None, :]
  toeplitz_CCE = jnp.where((lag_CC >= 0)[..., None], kernel_EC.T[jnp.clip(lag_CC, 0)], 0.0)
  # The incoming state's read-out at each position of a chunk: 2 C dA^(i+1), [C, E, P].
  read_CEP = 2.0 * C_EP * _powers(log_dA_EP, jnp.arange(1, chunk + 1))
  # The chunk's end state from its inputs: dA^(C-1-j) dB, and from the incoming state: dA^C.
  write_CEP = _powers(log_dA_EP, jnp.arange(chunk - 1, -1, -1)) * dB_EP
  carry_EP = jnp.exp(chunk * log_dA_EP)

  # Resets counted inside each chunk: 0 = still the segment that was running when the chunk began.
  reset_BT = 1 - keep_mask(segment_ids, b, l).astype(jnp.int32)
  u_MBCE = jnp.pad(u32_BTE, ((0, 0), (0, pad), (0, 0))).reshape(b, m, chunk, e).transpose(1, 0, 2, 3)
  count_MBC = jnp.cumsum(jnp.pad(reset_BT, ((0, 0), (0, pad))).reshape(b, m, chunk), axis=-1).transpose(1, 0, 2)

  def chunk_step(h_BEP, xs):
    u_BCE, count_BC = xs
    same_BCC = (count_BC[:, :, None] == count_BC[:, None, :]).astype(jnp.float32)
    y_BCE = jnp.einsum("bij,ije,bje->bie", same_BCC, toeplitz_CCE, u_BCE)
    from_h_BCE = jnp.einsum("iep,bep->bie", read_CEP.real, h_BEP.real) - jnp.einsum(
        "iep,bep->bie", read_CEP.imag, h_BEP.imag)
    y_BCE = y_BCE + jnp.where((count_BC == 0)[..., None], from_h_BCE, 0.0)
    return _end_state(h_BEP, u_BCE, count_BC, write_CEP, carry_EP), (y_BCE, h_BEP)

  h0_BEP = (jnp.zeros((b, e, p), jnp.complex64) if initial_state is None
            else initial_state.astype(jnp.complex64))
  h0_BEP = vary_like(h0_BEP, u32_BTE)  # a scan carry (check_vma)
  h_end_BEP, (y_MBCE, h_in_MBEP) = lax.scan(jax.checkpoint(chunk_step), h0_BEP, (u_MBCE, count_MBC))
  y_BTE = y_MBCE.transpose(1, 0, 2, 3).reshape(b, m * chunk, e)[:, :l]
  if D_E is not None:
    y_BTE = y_BTE + D_E.astype(jnp.float32) * u32_BTE
  y_BTE = y_BTE.astype(u_BTE.dtype)
  if not return_final_state:
    return y_BTE
  if pad:  # the scan's carry ran past the last real position: redo the last chunk up to it
    r = chunk - pad
    h_end_BEP = _end_state(h_in_MBEP[-1], u_MBCE[-1, :, :r], count_MBC[-1, :, :r], write_CEP[pad:],
                           jnp.exp(r * log_dA_EP))
  return y_BTE, h_end_BEP
