"""Every public SSM and attention op (and the recurrent and dense ops) accepts NumPy arrays as well as jax arrays,
with the same results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.ops import attention, recurrent, ssm
from seqjax.ops.attention import masks
from seqjax.ops.dense import dot, mlp, norms

RNG = np.random.default_rng(0)
B, L, E, P, N, H = 2, 7, 3, 4, 2, 3


def _normal(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def _positive(*shape):
  return np.log1p(np.exp(_normal(*shape))).astype(np.float32)


def _complex(*shape):
  return (_normal(*shape) + 1j * _normal(*shape)).astype(np.complex64)


SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 3, 3]], np.int32)
dA_EP, dB_EP, C_EP = np.exp(-_positive(E, P) + 0.3j).astype(np.complex64), _complex(E, P), _complex(E, P)
dLambda_P, dB_PE = np.exp(-_positive(P) + 0.2j).astype(np.complex64), _complex(P, E)

SSM_CASES = {  # name -> (function, NumPy positional arguments, keyword arguments)
    "selective_scan_sequential": (ssm.selective_scan, (_normal(B, L, E), _positive(B, L, E), -_positive(E, P),
                                                       _normal(B, L, P), _normal(B, L, P), _normal(E)),
                                  dict(mode="sequential", segment_ids=SEGMENTS, initial_state=_normal(B, E, P))),
    "selective_scan_parallel": (ssm.selective_scan, (_normal(B, L, E), _positive(B, L, E), -_positive(E, P),
                                                     _normal(B, L, P), _normal(B, L, P), _normal(E)),
                                dict(mode="parallel", segment_ids=SEGMENTS, initial_state=_normal(B, E, P))),
    "selective_scan_chunked": (ssm.selective_scan, (_normal(B, L, E), _positive(B, L, E), -_positive(E, P),
                                                    _normal(B, L, P), _normal(B, L, P), _normal(E)),
                               dict(mode="chunked", chunk_size=3, segment_ids=SEGMENTS)),
    "selective_step": (ssm.selective_step, (_normal(B, E), _positive(B, E), -_positive(E, P), _normal(B, P),
                                            _normal(B, P), _normal(E), _normal(B, E, P)), {}),
    "ssd_sequential": (ssm.ssd, (_normal(B, L, N, H), _positive(B, L, N), -_positive(N), _normal(B, L, P),
                                 _normal(B, L, P), _normal(N)),
                       dict(mode="sequential", segment_ids=SEGMENTS, initial_state=_normal(B, N, H, P))),
    "ssd_chunked": (ssm.ssd, (_normal(B, L, N, H), _positive(B, L, N), -_positive(N), _normal(B, L, P),
                              _normal(B, L, P), _normal(N)), dict(mode="chunked", chunk_size=3, segment_ids=SEGMENTS)),
    "ssd_step": (ssm.ssd_step, (_normal(B, N, H), _positive(B, N), -_positive(N), _normal(B, P), _normal(B, P),
                                _normal(N), _normal(B, N, H, P)), {}),
    "discretize": (ssm.discretize, (_complex(E, P) - 1.0, _positive(E, 1)), dict(method="zoh")),
    "s4d_kernel": (ssm.s4d_kernel, (dA_EP, dB_EP, C_EP, L), {}),
    "causal_fft_conv": (ssm.causal_fft_conv, (_normal(B, L, E), _normal(E, L)), {}),
    "s4d_conv": (ssm.s4d_conv, (_normal(B, L, E), dA_EP, dB_EP, C_EP, _normal(E)), {}),
    "diagonal_recurrence": (ssm.diagonal_recurrence, (_complex(B, L, P), _complex(B, L, P), _complex(B, P),
                                                      np.ones((B, L), np.float32)), {}),
    "s4d_recurrent_parallel": (ssm.s4d_recurrent, (_normal(B, L, E), dA_EP, dB_EP, C_EP, _normal(E)),
                               dict(mode="parallel", segment_ids=SEGMENTS, initial_state=_complex(B, E, P))),
    "s4d_recurrent_sequential": (ssm.s4d_recurrent, (_normal(B, L, E), dA_EP, dB_EP, C_EP, _normal(E)),
                                 dict(mode="sequential", segment_ids=SEGMENTS)),
    "s4d_chunked": (ssm.s4d_chunked, (_normal(B, L, E), dA_EP, dB_EP, C_EP, _normal(E)),
                    dict(segment_ids=SEGMENTS, initial_state=_complex(B, E, P), chunk=4)),
    "s4d_step": (ssm.s4d_step, (_normal(B, E), dA_EP, dB_EP, C_EP, _normal(E), _complex(B, E, P)), {}),
    "s5_scan_parallel": (ssm.s5_scan, (_normal(B, L, E), dLambda_P, dB_PE, C_EP, _normal(E)),
                         dict(mode="parallel", segment_ids=SEGMENTS, initial_state=_complex(B, P))),
    "s5_scan_sequential": (ssm.s5_scan, (_normal(B, L, E), dLambda_P, dB_PE, C_EP, _normal(E)),
                           dict(mode="sequential", segment_ids=SEGMENTS)),
    "s5_step": (ssm.s5_step, (_normal(B, E), dLambda_P, dB_PE, C_EP, _normal(E), _complex(B, P)), {}),
    "keep_mask": (ssm.keep_mask, (SEGMENTS, B, L), {}),
}


def _as_jax(tree):
  return jax.tree.map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a, tree)


def _assert_same(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(a, jax.Array)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_every_public_ssm_op_is_listed():
  listed = {fn for fn, _, _ in SSM_CASES.values()}
  public = {getattr(ssm, name) for name in ssm.__all__ if callable(getattr(ssm, name))}
  assert public == listed


@pytest.mark.parametrize("name", sorted(SSM_CASES))
def test_ssm_op_accepts_numpy(name):
  fn, args, kw = SSM_CASES[name]
  _assert_same(fn(*args, **kw), fn(*_as_jax(args), **_as_jax(kw)))


T, S, NQ, K, HD = 6, 9, 4, 2, 8
QKV = (_normal(B, T, NQ, HD), _normal(B, S, K, HD), _normal(B, S, K, HD))


@pytest.mark.parametrize("name", ["reference", "blockwise", "pallas"])
def test_attention_op_accepts_numpy(name):
  assert set(attention.available_attentions()) >= {"reference", "blockwise", "pallas"}
  fn = attention.get_attention(name)
  ids = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
  mask = masks.Causal(q_offset=S - T) & masks.SegmentIds(ids[:, S - T:], ids)
  _assert_same(fn(*QKV, mask=mask), fn(*_as_jax(QKV), mask=mask))


def test_recurrent_and_dense_ops_accept_numpy():
  x, h0, c0 = _normal(B, L, 5), _normal(B, 16), _normal(B, 16)
  w = (_normal(64, 5), _normal(64, 16), _normal(64), _normal(64))
  _assert_same(recurrent.lstm(x, h0, c0, *w), recurrent.lstm(*_as_jax((x, h0, c0, *w))))
  _assert_same(recurrent.lstm_step(x[:, 0], h0, c0, *w), recurrent.lstm_step(*_as_jax((x[:, 0], h0, c0, *w))))
  xd, w1, w2 = _normal(B, L, 16), _normal(16, 32), _normal(32, 16)
  _assert_same(mlp.mlp(xd, w1, w2), mlp.mlp(*_as_jax((xd, w1, w2))))
  _assert_same(norms.layer_norm(xd, w2[0], w1[:, 0]), norms.layer_norm(*_as_jax((xd, w2[0], w1[:, 0]))))
  dims = (((2,), (0,)), ((), ()))
  _assert_same(dot.flat_dot_general(xd, w1, dims), dot.flat_dot_general(*_as_jax((xd, w1)), dims))
