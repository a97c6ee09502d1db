"""The linen Mlp (plain kind) against float64 NumPy: forward and a hand-written backward, never via seqjax.ops.

tests/cpu_kernels/test_mlp.py checks the native CPU kernel against `reference_mlp`, which shares the activation
table and the dot helper with the module; a wrong constant in the tanh-GELU or a wrong activation id passed to the
kernel would be shared by both sides or hidden by them. Here the oracle is written from the definitions:

    y = act(x W1) W2,  gelu(h) = 0.5 h (1 + tanh(sqrt(2 / pi) (h + 0.044715 h^3)))  (flax's default approximation),
    relu(h) = max(h, 0),  silu(h) = h sigmoid(h),

and for a loss L = sum(y * G) the backward pass by the chain rule with the activations' derivatives written out:
dW2 = act(h)^T G, dh = (G W2^T) * act'(h), dW1 = x^T dh, dx = dh W1^T. The sizes (D = 32, F = 48, float32) are ones
where the module runs the native kernel on a CPU, which the test asserts from the lowered program.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import cpu_kernels
from seqjax.nn.layers import Mlp

_C = np.sqrt(2.0 / np.pi)


def _act_and_derivative(name, h):
  if name == "gelu":
    u = _C * (h + 0.044715 * h ** 3)
    t = np.tanh(u)
    return 0.5 * h * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * h * h)
  if name == "relu":
    return np.maximum(h, 0.0), (h > 0).astype(np.float64)
  if name == "silu":
    s = 1.0 / (1.0 + np.exp(-h))
    return h * s, s * (1.0 + h * (1.0 - s))
  raise ValueError(name)


def mlp_oracle(x, w1, w2, g, activation):
  """(y, dx, dW1, dW2) in float64 for the loss sum(y * g)."""
  x, w1, w2, g = (np.asarray(a, np.float64) for a in (x, w1, w2, g))
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  h = x2 @ w1
  a, da_dh = _act_and_derivative(activation, h)
  y = a @ w2
  dw2 = a.T @ g2
  dh = (g2 @ w2.T) * da_dh
  dw1 = x2.T @ dh
  dx = dh @ w1.T
  return y.reshape(x.shape), dx.reshape(x.shape), dw1, dw2


def _close(actual, expected, what, tol=2e-5):
  expected = np.asarray(expected, np.float64)
  scale = float(np.max(np.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_mlp_module_matches_numpy_forward_and_backward(activation):
  """Forward and the gradients w.r.t. x, wi and wo, at sizes where the native CPU kernel runs.

  Catches (each planted once; the affected activations failed, the others passed): the native kernel given the
  wrong activation ids (gelu -> silu, relu -> silu, silu -> gelu; monkeypatched seqjax.cpu_kernels.mlp.ACTIVATIONS),
  the native backward's dW1 scaled by 0.5 and its dx by 0.9 (monkeypatched custom_vjp), the GELU derivative constant
  in cpu_kernels/src/mlp.cc changed from 3 * 0.044715 to 2 * 0.044715 (a copy of the sources built into a scratch
  cache; only dx/dW1 of gelu failed), the plain-JAX path's GELU switched to the exact erf form (with
  SEQJAX_CPU_KERNELS=off).
  """
  B, T, D, F = 2, 37, 32, 48  # 74 rows: a ragged last row block
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, T, D)).astype(np.float32)
  g = rng.standard_normal((B, T, D)).astype(np.float32)
  layer = Mlp(hidden=F, activation=activation)
  params = nn.unbox(layer.init(jax.random.PRNGKey(1), jnp.asarray(x)))["params"]
  assert jax.tree.map(jnp.shape, params) == {"wi": {"kernel": (D, F)}, "wo": {"kernel": (F, D)}}

  def loss(params, x):
    return jnp.sum(layer.apply({"params": params}, x) * g)

  forward = jax.jit(lambda p, x: layer.apply({"params": p}, x))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  if cpu_kernels.available("mlp"):  # the sizes were chosen so that the module takes the native kernel, both ways
    assert "seqjax_mlp_fwd" in forward.lower(params, jnp.asarray(x)).as_text()
    assert "seqjax_mlp_bwd" in grads.lower(params, jnp.asarray(x)).as_text()
  y = forward(params, jnp.asarray(x))
  (gp, gx) = grads(params, jnp.asarray(x))
  w1, w2 = np.asarray(params["wi"]["kernel"]), np.asarray(params["wo"]["kernel"])
  y_ref, dx_ref, dw1_ref, dw2_ref = mlp_oracle(x, w1, w2, g, activation)
  _close(y, y_ref, "y")
  _close(gx, dx_ref, "dx")
  _close(gp["wi"]["kernel"], dw1_ref, "dW1")
  _close(gp["wo"]["kernel"], dw2_ref, "dW2")


def test_oracle_backward_matches_finite_differences():
  """The hand-written float64 backward itself, against central differences (so the oracle is not the weak link)."""
  rng = np.random.default_rng(1)
  x, w1, w2, g = (rng.standard_normal(s) for s in ((3, 4), (4, 5), (5, 4), (3, 4)))
  for activation in ("gelu", "relu", "silu"):
    _, dx, dw1, dw2 = mlp_oracle(x, w1, w2, g, activation)
    f = lambda x, w1, w2: float(np.sum(mlp_oracle(x, w1, w2, g, activation)[0] * g))  # noqa: E731
    for arg, grad in ((0, dx), (1, dw1), (2, dw2)):
      v = rng.standard_normal(grad.shape)
      args = [x, w1, w2]
      plus, minus = list(args), list(args)
      plus[arg], minus[arg] = args[arg] + 1e-6 * v, args[arg] - 1e-6 * v
      numeric = (f(*plus) - f(*minus)) / 2e-6
      assert abs(numeric - np.sum(grad * v)) < 1e-6 * (1 + abs(numeric)), (activation, arg)
