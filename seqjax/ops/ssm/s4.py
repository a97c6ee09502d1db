"""Linear time-invariant diagonal SSMs: S4D (one SISO SSM per channel) and S5 (one MIMO SSM), complex diagonal A.

Legend: B batch, T length, E channels (S4D's independent SISO systems; S5's input/output width), P state size
(complex; S4D keeps half of each conjugate pair and takes 2 Re(.) of the output).

S4D (Gu et al., 2022):  h_t = dA h_{t-1} + dB u_t,   y_t = 2 Re(C h_t) + D u_t,   per channel e, A_e diagonal [P].
Because A, B, C do not depend on t, y = K * u is a causal convolution with the kernel
K[e, l] = 2 Re(sum_p C[e, p] dB[e, p] dA[e, p]^l) (a Vandermonde product), computed by FFT in O(T log T):
`s4d_kernel` + `causal_fft_conv` is the convolution mode; `s4d_recurrent` (a `lax.associative_scan` over the
diagonal recurrence, or `lax.scan`) and `s4d_step` are the recurrent modes — equal to tolerance.

S5 (Smith et al., 2023):  h_t = dLambda h_{t-1} + dB u_t (h [P] complex, u [E]),  y_t = Re(C h_t) + D u_t,
computed with `lax.associative_scan` (`s5_scan`, mode "parallel") or `lax.scan` (mode "sequential"); `s5_step`
decodes.

Discretisation: "zoh" (zero-order hold: dA = exp(dt A), dB = (dA - 1) / A B) or "bilinear"
(dA = (1 + dt A / 2) / (1 - dt A / 2), dB = dt B / (1 - dt A / 2)).

Segment resets (`segment_ids` [B, T]): the state is zeroed before a position whose id differs from the previous
one. A convolution cannot reset, so the recurrent forms handle packed sequences (the layers switch to them).
States are complex64 (float32 parts) whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seqjax.ops.ssm._common import as_arrays, keep_mask
from seqjax.ops.vma import vary_like

DISCRETIZATIONS = ("zoh", "bilinear")
RECURRENT_MODES = ("parallel", "sequential")


def discretize(A: jax.Array, dt: jax.Array, method: str = "zoh") -> tuple[jax.Array, jax.Array]:
  """Discretises a diagonal continuous-time SSM: returns (dA, B_scale), complex64, both shaped like dt * A.

  The discrete input matrix is dB = B_scale * B, broadcast along B's state axis (S4D: dB_EP = B_scale * B_EP;
  S5: dB_PE = B_scale[:, None] * B_PE).

  Args:
    A: [..., P] complex diagonal (negative real part).
    dt: positive step sizes broadcastable against A ([E, 1] for S4D's per-channel dt, [P] for S5's per-state dt).
    method: "zoh" (dA = exp(dt A), B_scale = (dA - 1) / A) or "bilinear"
      (dA = (1 + dt A / 2) / (1 - dt A / 2), B_scale = dt / (1 - dt A / 2)).
  """
  A, dt = as_arrays(A, dt)
  if method not in DISCRETIZATIONS:
    raise ValueError(f"discretize: method={method!r} is not one of {DISCRETIZATIONS}")
  A = A.astype(jnp.complex64)
  dt = dt.astype(jnp.float32)
  dtA = dt * A
  if method == "zoh":
    dA = jnp.exp(dtA)
    return dA, (dA - 1.0) / A
  denom = 1.0 - dtA / 2.0
  return (1.0 + dtA / 2.0) / denom, dt / denom


# ---------------------------------------------------------------------------------------------------------------
# S4D
# ---------------------------------------------------------------------------------------------------------------


def s4d_kernel(dA_EP: jax.Array, dB_EP: jax.Array, C_EP: jax.Array, length: int) -> jax.Array:
  """The SSM convolution kernel K [E, T] (float32): K[e, l] = 2 Re(sum_p C dB dA^l), a Vandermonde product.

  dA^l is exp(l log dA): the Vandermonde matrix [E, P, T] is materialised (complex64), fine for layer sizes.
  """
  dA_EP, dB_EP, C_EP = as_arrays(dA_EP, dB_EP, C_EP)
  if not (dA_EP.shape == dB_EP.shape == C_EP.shape and dA_EP.ndim == 2):
    raise ValueError(f"s4d_kernel: dA, dB and C must all be [E, P], got {dA_EP.shape}, {dB_EP.shape}, "
                     f"{C_EP.shape}")
  log_dA_EP = jnp.log(dA_EP.astype(jnp.complex64))
  vandermonde_EPT = jnp.exp(log_dA_EP[..., None] * jnp.arange(length, dtype=jnp.float32))
  kernel_ET = 2.0 * jnp.einsum("ep,epl->el", C_EP * dB_EP, vandermonde_EPT).real
  return kernel_ET.astype(jnp.float32)


def causal_fft_conv(u_BTE: jax.Array, kernel_ET: jax.Array) -> jax.Array:
  """y[b, t, e] = sum_{s <= t} K[e, t - s] u[b, s, e] by FFT (zero-padded to >= 2L: no wrap-around). float32."""
  u_BTE, kernel_ET = as_arrays(u_BTE, kernel_ET)
  if u_BTE.ndim != 3 or kernel_ET.ndim != 2 or kernel_ET.shape[0] != u_BTE.shape[2]:
    raise ValueError(f"causal_fft_conv: u must be [B, T, E] and kernel [E, T'], got {u_BTE.shape} and "
                     f"{kernel_ET.shape}")
  length = u_BTE.shape[1]
  n_fft = 1 << max(1, (2 * length - 1).bit_length())
  u_f = jnp.fft.rfft(u_BTE.astype(jnp.float32), n=n_fft, axis=1)
  k_f = jnp.fft.rfft(kernel_ET[:, :length].astype(jnp.float32).T, n=n_fft, axis=0)
  return jnp.fft.irfft(u_f * k_f[None], n=n_fft, axis=1)[:, :length]


def s4d_conv(u_BTE: jax.Array, dA_EP: jax.Array, dB_EP: jax.Array, C_EP: jax.Array,
             D_E: jax.Array | None = None) -> jax.Array:
  """S4D by convolution: y [B, T, E] in u's dtype. No state in, no state out, no resets (see `s4d_recurrent`)."""
  u_BTE, dA_EP, dB_EP, C_EP, D_E = as_arrays(u_BTE, dA_EP, dB_EP, C_EP, D_E)
  y_BTE = causal_fft_conv(u_BTE, s4d_kernel(dA_EP, dB_EP, C_EP, u_BTE.shape[1]))
  if D_E is not None:
    y_BTE = y_BTE + D_E.astype(jnp.float32) * u_BTE.astype(jnp.float32)
  return y_BTE.astype(u_BTE.dtype)


def diagonal_recurrence(a_BTP: jax.Array, b_BTP: jax.Array, h0_BP: jax.Array, keep_BT: jax.Array,
                        mode: str = "parallel") -> jax.Array:
  """All states of h_t = keep_t a_t h_{t-1} + b_t (complex or real, any trailing dims), [B, T, ...]."""
  a_BTP, b_BTP, h0_BP, keep_BT = as_arrays(a_BTP, b_BTP, h0_BP, keep_BT)
  if mode not in RECURRENT_MODES:
    raise ValueError(f"diagonal_recurrence: mode={mode!r} is not one of {RECURRENT_MODES}")
  extra = (None,) * (a_BTP.ndim - 2)
  a_BTP = a_BTP * keep_BT[(...,) + extra].astype(a_BTP.dtype)
  if mode == "sequential":
    h0_BP = vary_like(h0_BP, a_BTP, b_BTP)  # a scan carry (check_vma)

    def step(h, ab):
      h = ab[0] * h + ab[1]
      return h, h
    _, h_TBP = lax.scan(step, h0_BP, (jnp.swapaxes(a_BTP, 0, 1), jnp.swapaxes(b_BTP, 0, 1)))
    return jnp.swapaxes(h_TBP, 0, 1)
  b_BTP = b_BTP.at[:, 0].add(a_BTP[:, 0] * h0_BP)

  def combine(first, second):
    return first[0] * second[0], second[0] * first[1] + second[1]

  return lax.associative_scan(combine, (a_BTP, b_BTP), axis=1)[1]


def s4d_recurrent(u_BTE: jax.Array, dA_EP: jax.Array, dB_EP: jax.Array, C_EP: jax.Array,
                  D_E: jax.Array | None = None, *, mode: str = "parallel", initial_state: jax.Array | None = None,
                  return_final_state: bool = False, segment_ids: jax.Array | None = None):
  """S4D by recurrence: y [B, T, E] (u's dtype) and optionally the final state [B, E, P] complex64.

  mode "parallel" (associative scan, materialises [B, T, E, P]) or "sequential" (lax.scan).
  """
  u_BTE, dA_EP, dB_EP, C_EP, D_E, initial_state, segment_ids = as_arrays(u_BTE, dA_EP, dB_EP, C_EP, D_E,
                                                                         initial_state, segment_ids)
  b, l, e = u_BTE.shape
  p = dA_EP.shape[1]
  if dA_EP.shape != (e, p) or dB_EP.shape != (e, p) or C_EP.shape != (e, p):
    raise ValueError(f"s4d_recurrent: dA, dB, C must be [E, P] with E={e}, got {dA_EP.shape}, {dB_EP.shape}, "
                     f"{C_EP.shape}")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"s4d_recurrent: segment_ids must be [B, T] = {(b, l)}, got {segment_ids.shape}")
  h0_BEP = (jnp.zeros((b, e, p), jnp.complex64) if initial_state is None
            else initial_state.astype(jnp.complex64))
  u32_BTE = u_BTE.astype(jnp.float32)
  a_BTEP = jnp.broadcast_to(dA_EP, (b, l, e, p))
  b_BTEP = u32_BTE[..., None] * dB_EP
  h_BTEP = diagonal_recurrence(a_BTEP, b_BTEP, h0_BEP, keep_mask(segment_ids, b, l), mode)
  y_BTE = 2.0 * jnp.einsum("blep,ep->ble", h_BTEP, C_EP).real
  if D_E is not None:
    y_BTE = y_BTE + D_E.astype(jnp.float32) * u32_BTE
  y_BTE = y_BTE.astype(u_BTE.dtype)
  return (y_BTE, h_BTEP[:, -1]) if return_final_state else y_BTE


def s4d_step(u_BE: jax.Array, dA_EP: jax.Array, dB_EP: jax.Array, C_EP: jax.Array, D_E: jax.Array | None,
             h_BEP: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One S4D step: (y [B, E] in u's dtype, new state [B, E, P] complex64)."""
  u_BE, dA_EP, dB_EP, C_EP, D_E, h_BEP = as_arrays(u_BE, dA_EP, dB_EP, C_EP, D_E, h_BEP)
  u32_BE = u_BE.astype(jnp.float32)
  h_BEP = dA_EP * h_BEP.astype(jnp.complex64) + u32_BE[..., None] * dB_EP
  y_BE = 2.0 * jnp.einsum("bep,ep->be", h_BEP, C_EP).real
  if D_E is not None:
    y_BE = y_BE + D_E.astype(jnp.float32) * u32_BE
  return y_BE.astype(u_BE.dtype), h_BEP


# ---------------------------------------------------------------------------------------------------------------
# S5
# ---------------------------------------------------------------------------------------------------------------


def s5_scan(u_BTE: jax.Array, dLambda_P: jax.Array, dB_PE: jax.Array, C_EP: jax.Array,
            D_E: jax.Array | None = None, *, mode: str = "parallel", initial_state: jax.Array | None = None,
            return_final_state: bool = False, segment_ids: jax.Array | None = None):
  """S5: y [B, T, E] (u's dtype) = Re(C h_t) + D u_t, and optionally the final state [B, P] complex64.

  Args:
    u_BTE: [B, T, E] inputs.
    dLambda_P: [P] discretised diagonal state matrix (complex).
    dB_PE: [P, E] discretised input matrix (complex).
    C_EP: [E, P] output matrix (complex).
    D_E: optional [E] real skip.
    mode: "parallel" (lax.associative_scan, the S5 way) or "sequential" (lax.scan).
  """
  u_BTE, dLambda_P, dB_PE, C_EP, D_E, initial_state, segment_ids = as_arrays(u_BTE, dLambda_P, dB_PE, C_EP, D_E,
                                                                             initial_state, segment_ids)
  b, l, e = u_BTE.shape
  p = dLambda_P.shape[0]
  if dLambda_P.shape != (p,) or dB_PE.shape != (p, e) or C_EP.shape != (e, p):
    raise ValueError(f"s5_scan: need dLambda [P], dB [P, E], C [E, P] with E={e}; got {dLambda_P.shape}, "
                     f"{dB_PE.shape}, {C_EP.shape}")
  if segment_ids is not None and segment_ids.shape != (b, l):
    raise ValueError(f"s5_scan: segment_ids must be [B, T] = {(b, l)}, got {segment_ids.shape}")
  h0_BP = jnp.zeros((b, p), jnp.complex64) if initial_state is None else initial_state.astype(jnp.complex64)
  u32_BTE = u_BTE.astype(jnp.float32)
  bu_BTP = jnp.einsum("ble,pe->blp", u32_BTE.astype(jnp.complex64), dB_PE)
  a_BTP = jnp.broadcast_to(dLambda_P, (b, l, p))
  h_BTP = diagonal_recurrence(a_BTP, bu_BTP, h0_BP, keep_mask(segment_ids, b, l), mode)
  y_BTE = jnp.einsum("blp,ep->ble", h_BTP, C_EP).real
  if D_E is not None:
    y_BTE = y_BTE + D_E.astype(jnp.float32) * u32_BTE
  y_BTE = y_BTE.astype(u_BTE.dtype)
  return (y_BTE, h_BTP[:, -1]) if return_final_state else y_BTE


def s5_step(u_BE: jax.Array, dLambda_P: jax.Array, dB_PE: jax.Array, C_EP: jax.Array, D_E: jax.Array | None,
            h_BP: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One S5 step: (y [B, E] in u's dtype, new state [B, P] complex64)."""
  u_BE, dLambda_P, dB_PE, C_EP, D_E, h_BP = as_arrays(u_BE, dLambda_P, dB_PE, C_EP, D_E, h_BP)
  u32_BE = u_BE.astype(jnp.float32)
  h_BP = dLambda_P * h_BP.astype(jnp.complex64) + jnp.einsum("be,pe->bp", u32_BE.astype(jnp.complex64), dB_PE)
  y_BE = jnp.einsum("bp,ep->be", h_BP, C_EP).real
  if D_E is not None:
    y_BE = y_BE + D_E.astype(jnp.float32) * u32_BE
  return y_BE.astype(u_BE.dtype), h_BP
