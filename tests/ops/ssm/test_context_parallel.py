"""Context-parallel SSMs on 8 simulated devices = the whole sequence on one device.

`seqjax.ops.ssm.context_parallel` runs SSD, the selective scan, S4D and S5 on the local shards of a sequence split
over the mesh axis "seq" and passes the states across the shards. Checked under `shard_map`'s default
check_vma=True, on (data 2, seq 4) and (seq 8), with both combines ("all_gather", "ppermute"):
- forward and the state after the whole sequence against float64 NumPy loops over the *whole* sequence
  (SSD and the selective scan: the oracles of test_numpy_oracle.py; S4D / S5: the diagonal recurrence below);
- gradients of every input against autodiff of the unsharded sequential mode (`lax.scan`);
- packed documents: one starts exactly at a shard boundary, one spans three shards, resets fall inside shards;
- a negative control: the shards run alone (no incoming state) differ from the oracle, so the case really needs
  the states to cross the shards.
Catches: an incoming state not cut at a reset or at a document starting on a shard boundary, a wrong decay power
(off by one step), the combine composing maps in the wrong order or skipping a shard, a gradient of a replicated
operand (A, D) not summed over the shards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from seqjax.ops import ssm
from seqjax.ops.ssm import context_parallel as cp
from tests.ops.ssm.test_numpy_oracle import selective_oracle, ssd_oracle

LENGTH = 48  # 12 per shard on seq 4, 6 on seq 8
# Row 0: documents starting at 12 (a shard boundary on seq 4), 17 and 40 (inside shards); 17..39 spans shards.
# Row 1: one document.
SEGMENTS = np.array([[1] * 12 + [2] * 5 + [3] * 23 + [4] * 8, [7] * LENGTH], np.int32)
MESHES = {"data2_seq4": (2, 4), "seq8": (1, 8)}


def _mesh(name):
  return Mesh(np.array(jax.devices()[:8]).reshape(MESHES[name]), ("data", "seq"))


def _inputs(kind, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  softplus = lambda a: np.log1p(np.exp(a)).astype(np.float32)  # noqa: E731
  b, l = SEGMENTS.shape
  if kind == "ssd":  # x, dt, A, B, C, D
    return [f(b, l, 2, 3), 0.5 * softplus(f(b, l, 2)), -np.exp(0.3 * f(2)), f(b, l, 4), f(b, l, 4), 1.0 + f(2)]
  if kind == "selective":  # x, delta, A, B, C, D
    return [f(b, l, 3), 0.5 * softplus(f(b, l, 3)), -np.exp(0.3 * f(3, 4)), f(b, l, 4), f(b, l, 4), 1.0 + f(3)]
  # S4D: u, log|dA| real part, dA phase, dB (re, im), C (re, im), D; S5 similar with dLambda [P], dB [P, E].
  e, p = 3, 4
  shape_a = (e, p) if kind == "s4d" else (p,)
  shape_b = (e, p) if kind == "s4d" else (p, e)
  return [f(b, l, e), -0.1 * np.exp(0.5 * f(*shape_a)), f(*shape_a), f(*shape_b), f(*shape_b), f(e, p), f(e, p),
          1.0 + f(e)]


def _complex_operands(args):
  u, log_mag, phase, b_re, b_im, c_re, c_im, d = args
  return u, jnp.exp(log_mag + 1j * phase), b_re + 1j * b_im, c_re + 1j * c_im, d


def _run(kind, args, segment_ids, *, sharded, combine="all_gather", alone=False):
  """(y, final state) of the kernel: context-parallel (`sharded`: the mesh name) or unsharded sequential."""
  seg = jnp.asarray(segment_ids)
  if kind in ("ssd", "selective"):
    local = {"ssd": cp.ssd_context_parallel, "selective": cp.selective_scan_context_parallel}[kind]
    whole = {"ssd": ssm.ssd, "selective": ssm.selective_scan}[kind]
    operands = lambda a: a  # noqa: E731
    kwargs = {"mode": "chunked", "chunk_size": 4}
  else:
    local = {"s4d": cp.s4d_context_parallel, "s5": cp.s5_context_parallel}[kind]
    whole = {"s4d": ssm.s4d_recurrent, "s5": ssm.s5_scan}[kind]
    operands = _complex_operands
    kwargs = {"mode": "parallel"}
  if not sharded:
    return whole(*operands(args), mode="sequential", segment_ids=seg, return_final_state=True)
  mesh = _mesh(sharded)

  def body(*a):
    *a, seg_local = a
    if alone:  # the negative control: each shard from a zero state
      y, h = whole(*operands(a), segment_ids=seg_local, return_final_state=True, **kwargs)
    else:
      y, h = local(*operands(a), segment_ids=seg_local, return_final_state=True, combine=combine, **kwargs)
    return y, h[None]

  seq_spec = P("data", "seq")
  specs = tuple(seq_spec if np.ndim(x) >= 3 and np.shape(x)[:2] == SEGMENTS.shape else P() for x in args)
  y, h_R = jax.shard_map(body, mesh=mesh, in_specs=specs + (seq_spec,), out_specs=(seq_spec, P("seq", "data")))(
      *args, seg)
  return y, h_R[-1]


def _oracle(kind, args):
  if kind == "ssd":
    x = args[0]
    return ssd_oracle(*args, np.zeros((x.shape[0], x.shape[2], x.shape[3], args[3].shape[2])), SEGMENTS)
  if kind == "selective":
    return selective_oracle(*args, np.zeros((args[0].shape[0],) + args[2].shape), SEGMENTS)
  u, dA, dB, C, D = (np.asarray(a, np.complex128) for a in _complex_operands(args))
  u = u.real
  nb, nl, ne = u.shape
  reset = np.zeros(SEGMENTS.shape, bool)
  reset[:, 1:] = SEGMENTS[:, 1:] != SEGMENTS[:, :-1]
  y = np.zeros(u.shape)
  h = np.zeros((nb,) + dA.shape, np.complex128)
  for b in range(nb):
    for t in range(nl):
      if reset[b, t]:
        h[b] = 0
      if kind == "s4d":  # per channel: h [E, P], y = 2 Re(C h) + D u
        h[b] = dA * h[b] + dB * u[b, t][:, None]
        y[b, t] = 2.0 * np.sum(C * h[b], axis=1).real + D.real * u[b, t]
      else:  # MIMO: h [P], y = Re(C h) + D u
        h[b] = dA * h[b] + dB @ u[b, t]
        y[b, t] = (C @ h[b]).real + D.real * u[b, t]
  return y, h


def _close(actual, expected, what, tol=5e-5):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale, err_msg=what)


CASES = ([pytest.param("ssd", mesh, combine, id=f"ssd_{mesh}_{combine}")
          for mesh, combine in (("data2_seq4", "all_gather"), ("data2_seq4", "ppermute"), ("seq8", "ppermute"))]
         + [pytest.param(kind, mesh, combine, id=f"{kind}_{mesh}_{combine}",
                         marks=[pytest.mark.slow] if mesh == "seq8" else [])  # the fast set: SSD on every mesh
            for kind in ("selective", "s4d", "s5")
            for mesh, combine in (("data2_seq4", "all_gather"), ("seq8", "ppermute"))])


@pytest.mark.parametrize("kind, mesh, combine", CASES)
def test_context_parallel_equals_whole_sequence(kind, mesh, combine):
  args = _inputs(kind)
  y, h = jax.jit(lambda *a: _run(kind, a, SEGMENTS, sharded=mesh, combine=combine))(*args)
  want_y, want_h = _oracle(kind, args)
  _close(y, want_y, f"{kind} output")
  _close(h, want_h, f"{kind} final state")

  def loss(fn):
    w = np.random.default_rng(1).standard_normal(np.shape(want_y)).astype(np.float32)

    def f(*a):
      y, h = fn(*a)
      return jnp.sum(y * w) + jnp.sum(jnp.abs(h) ** 2)
    return jax.jit(jax.grad(f, argnums=tuple(range(len(args)))))

  grads = loss(lambda *a: _run(kind, a, SEGMENTS, sharded=mesh, combine=combine))(*args)
  want = loss(lambda *a: _run(kind, a, SEGMENTS, sharded=None))(*args)
  for i, (g, w) in enumerate(zip(grads, want)):
    _close(g, w, f"{kind} gradient of argument {i}", tol=2e-4)


@pytest.mark.parametrize("kind", ["ssd", "selective", "s4d", "s5"])
def test_negative_control_shards_alone_differ(kind):
  """Without the incoming state the shards' outputs are wrong: the case above depends on the combine."""
  args = _inputs(kind)
  y, _ = jax.jit(lambda *a: _run(kind, a, SEGMENTS, sharded="data2_seq4", alone=True))(*args)
  want_y, _ = _oracle(kind, args)
  assert np.max(np.abs(np.asarray(y) - want_y)) > 1e-2 * max(1.0, np.max(np.abs(want_y)))


def test_combine_error_and_halo_across_shards():
  with pytest.raises(ValueError, match="combine must be one of"):
    cp.combine_states(jnp.ones(2), jnp.ones(2), combine="tree")
  # A halo of 5 positions on shards of 2: assembled from three shards to the left, zeros before the sequence.
  x = jnp.arange(1, 17, dtype=jnp.float32)[None]
  halo = jax.shard_map(lambda x: cp.from_left(x, 5), mesh=_mesh("seq8"), in_specs=P(None, "seq"),
                       out_specs=P(None, "seq"))(x)
  padded = np.concatenate([np.zeros(5), np.arange(1, 17)])
  want = np.concatenate([padded[2 * r:2 * r + 5] for r in range(8)])[None]
  np.testing.assert_array_equal(np.asarray(halo), want)
