"""Small shared linen layers: token embedding with a tied read-out, position tables, MLPs, norms.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `seqjax.train.sharding` maps them onto
the device mesh. The legend: B batch, T length, D model width, F MLP hidden width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.ops.attention import positions as positions_ops
from seqjax.ops.dense import mlp as mlp_ops
from seqjax.ops.dense import norms as norm_ops
from seqjax.ops.dense.dot import flat_dot_general

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = mlp_ops.ACTIVATIONS


def dense_init(scale: float = 1.0) -> nn.initializers.Initializer:
  """Fan-in variance scaling (truncated normal), the default for every projection here."""
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` reuses the table as the output projection (tied embeddings)."""

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD: jax.Array) -> jax.Array:
    """Logits [B, T, V] = x @ embedding^T / sqrt(D).

    The table is initialised with unit variance (a unit-scale residual stream); the 1/sqrt(D) keeps the tied
    read-out's logits at unit scale too.
    """
    scale = self.features ** -0.5
    return flat_dot_general(x_BTD * scale, self.embedding.astype(self.dtype).T, (((2,), (0,)), ((), ())))


class LearnedPositions(nn.Module):
  """A learned table of `max_len` position vectors, indexed by each token's position in its document."""

  max_len: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, positions_BT: jax.Array) -> jax.Array:
    table = self.param("table", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                             (None, "embed")),
                       (self.max_len, self.features), self.param_dtype)
    return jnp.take(table, positions_BT, axis=0)


def sinusoidal_positions(positions_BT: jax.Array, features: int) -> jax.Array:
  """Fixed sinusoidal position vectors [B, T, D]."""
  return positions_ops.sinusoidal(positions_BT, features)


class _Kernel(nn.Module):
  """A bare [in, out] projection kernel, the parameter `nn.DenseGeneral(use_bias=False)` would create."""

  shape: tuple[int, int]
  axes: tuple[str, str]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", nn.with_logical_partitioning(dense_init(), self.axes), self.shape, self.param_dtype)


class Mlp(nn.Module):
  """Position-wise MLP: D -> F -> D, plain (`act(x W1) W2`) or gated (`act(x Wg) * (x W1) W2`).

  The plain MLP without active dropout is `seqjax.ops.dense.mlp.mlp`: on a CPU one fused C++ kernel per pass (same
  parameters `wi/kernel`, `wo/kernel`, same results to float32 rounding).
  """

  hidden: int
  kind: Literal["mlp", "gated"] = "mlp"
  activation: str = "gelu"
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> jax.Array:
    d = x_BTD.shape[-1]
    act = ACTIVATIONS[self.activation]
    if self.kind == "mlp" and (self.dropout == 0.0 or deterministic):
      w1 = _Kernel((d, self.hidden), ("embed", "mlp"), self.param_dtype, name="wi")()
      w2 = _Kernel((self.hidden, d), ("mlp", "embed"), self.param_dtype, name="wo")()
      x_BTD = x_BTD.astype(self.dtype)
      return mlp_ops.mlp(x_BTD, w1.astype(self.dtype), w2.astype(self.dtype), self.activation)
    dense = lambda features, axes, name: nn.DenseGeneral(  # noqa: E731
        features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(dense_init(), axes), dot_general=flat_dot_general)
    h_BTF = dense(self.hidden, ("embed", "mlp"), "wi")(x_BTD)
    if self.kind == "gated":
      h_BTF = act(dense(self.hidden, ("embed", "mlp"), "wg")(x_BTD)) * h_BTF
    else:
      h_BTF = act(h_BTF)
    h_BTF = nn.Dropout(self.dropout)(h_BTF, deterministic=deterministic)
    return dense(d, ("mlp", "embed"), "wo")(h_BTF)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with parameters `scale` and `bias` [D], as `flax.linen.LayerNorm` (epsilon 1e-6,
  statistics in float32); `seqjax.ops.dense.norms.layer_norm`, so a C++ kernel per pass on a CPU."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,),
                      self.param_dtype)
    if x.dtype == jnp.float32 and scale.dtype == jnp.float32:
      return norm_ops.layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)
    return norm_ops.reference_layer_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                         self.epsilon).astype(self.dtype)


def make_norm(kind: str, dtype: Dtype, name: str) -> nn.Module:
  """LayerNorm or RMSNorm; statistics are computed in float32 whatever `dtype` is."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
  if kind == "rmsnorm":
    return nn.RMSNorm(dtype=dtype, scale_init=scale_init, name=name)
  return LayerNorm(dtype=dtype, name=name)
