"""Dense ops: projections as flat matmuls (`dot`), the position-wise MLP (`mlp`) and LayerNorm (`norms`).

    from seqjax.ops.dense import dot, mlp, norms
    dot.flat_dot_general(x, w, dims)    # a drop-in dot_general for nn.Dense / nn.DenseGeneral
    mlp.mlp(x_BTD, w1_DF, w2_FD, "gelu")
    norms.layer_norm(x, scale, bias)

Each has a C++ kernel for the CPU (op families "dense", "mlp", "layer_norm" of `seqjax.ops.backend`) and plain JAX
everywhere else; `reference_mlp` / `reference_layer_norm` are the JAX code the kernels are tested against.
"""

from seqjax.ops.dense import dot, mlp, norms
from seqjax.ops.dense.dot import flat_dot_general, matmul

__all__ = ["dot", "flat_dot_general", "matmul", "mlp", "norms"]
