"""Pieces shared by every `memory_scan` implementation: the state pytree and the memory MLP.

Shapes: weights are tuples `(W_1, ..., W_L)`, each `[..., in, out]` (leading axes are batch and
heads, `[B, H]`, in the public API); token inputs are `[..., n, D]` on the same leading axes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Weights = tuple  # (W_1, ..., W_L), each [B, H, in, out]

# The memory's matmuls are part of the exact recurrence (spec section 1: float32 state and
# products); without this, TPUs and Ampere+ GPUs silently run float32 matmuls in bf16/tf32.
PRECISION = jax.lax.Precision.HIGHEST

LN_EPS = 1e-5

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class MemoryState(NamedTuple):
    """Carried state of the neural memory (spec section 2).

    weights, momentum, anchor: tuples of `[B, H, in, out]` float32 (float64 under x64) arrays.
    offset: int32 `[]`, tokens consumed since the last chunk boundary (0 <= offset < chunk_size).
    Invariant kept by every impl: `offset == 0` implies `anchor == weights`.
    """

    weights: Weights
    momentum: Weights
    anchor: Weights
    offset: jax.Array

    @classmethod
    def create(cls, weights: Sequence[jax.Array], momentum: Sequence[jax.Array] | None = None):
        weights = tuple(weights)
        if momentum is None:
            momentum = tuple(jnp.zeros_like(w) for w in weights)
        # A numpy zero (not a jnp one) stays a concrete constant even when `create` runs under
        # jit, which lets `chunked` skip the extra chunk it needs for an unknown offset.
        return cls(weights, tuple(momentum), weights, np.zeros((), np.int32))

    def select(self, keep: jax.Array, other: MemoryState) -> MemoryState:
        """Rows of this state where `keep [B]` (bool), of `other` elsewhere, at a chunk boundary.

        Both states must be at a chunk boundary (offset 0, where anchor == weights): state passing
        ends rows on one, and the result is one too.
        """
        pick = lambda mine, theirs: jnp.where(keep.reshape((-1,) + (1,) * (mine.ndim - 1)), mine, theirs)
        weights = tuple(map(pick, self.weights, other.weights))
        return MemoryState(weights, tuple(map(pick, self.momentum, other.momentum)), weights, other.offset)


def layer_shapes(head_dim: int, hidden: int, depth: int) -> tuple[tuple[int, int], ...]:
    """`(in, out)` of each memory matrix W_1..W_L of one head (depth 1: one `[D, D]` matrix)."""
    if depth == 1:
        return ((head_dim, head_dim),)
    return ((head_dim, hidden),) + ((hidden, hidden),) * (depth - 2) + ((hidden, head_dim),)


def matmul(a: jax.Array, b: jax.Array, out=None, precision=PRECISION) -> jax.Array:
    """`out`: the result dtype (float32 accumulation of bf16 inputs); default: the inputs'."""
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out)


def matmul_nt(a: jax.Array, b: jax.Array, out=None, precision=PRECISION) -> jax.Array:
    """a `[..., m, k]` times b `[..., n, k]` transposed -> `[..., m, n]`, as one dot_general."""
    return jnp.einsum("...mk,...nk->...mn", a, b, precision=precision, preferred_element_type=out)


def matmul_tn(a: jax.Array, b: jax.Array, out=None, precision=PRECISION) -> jax.Array:
    """a `[..., k, m]` transposed times b `[..., k, n]` -> `[..., m, n]`."""
    return jnp.einsum("...km,...kn->...mn", a, b, precision=precision, preferred_element_type=out)


def row_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis, keeping it (size 1).

    A matmul with a ones vector: XLA:CPU runs these small row reductions several times slower as
    reductions than as matmuls (measured +7% training tokens/s of the chunk scan at 4 x 64).
    """
    return matmul(x, jnp.ones((x.shape[-1], 1), x.dtype))


def _broadcast_row(s: jax.Array, n: int) -> jax.Array:
    """[..., 1] -> [..., n] as an outer product with ones, so its transpose is `row_sum` (a matmul)."""
    return matmul(s, jnp.ones((1, n), s.dtype))


class Ops(NamedTuple):
    """The primitives the per-chunk math is written in, so XLA and Pallas kernels share it.

    sum/broadcast: row sums `[..., n] -> [..., 1]` and back. XLA code uses matmuls with ones (see
    `row_sum`); a Triton kernel cannot (a dot needs every dimension >= 16), so kernels reduce.
    matmul, matmul_nt, matmul_tn: the products of the chunk form, float32 (HIGHEST) or with
    bfloat16 inputs and float32 accumulation (`chunk_ops`).
    """

    sum: Callable[[jax.Array], jax.Array]
    broadcast: Callable[[jax.Array, int], jax.Array]
    matmul: Callable[[jax.Array, jax.Array], jax.Array]
    matmul_nt: Callable[[jax.Array, jax.Array], jax.Array]
    matmul_tn: Callable[[jax.Array, jax.Array], jax.Array]


MATMUL_DTYPES = ("float32", "bfloat16")


def chunk_ops(kernel: bool, matmul_dtype: str = "float32") -> Ops:
    if kernel:
        rows = (lambda x: jnp.sum(x, axis=-1, keepdims=True), lambda s, n: jnp.broadcast_to(s, s.shape[:-1] + (n,)))
    else:
        rows = (row_sum, _broadcast_row)
    if matmul_dtype == "float32":
        return Ops(*rows, matmul, matmul_nt, matmul_tn)

    # bf16 inputs, float32 (the state's dtype) accumulation and result. Default precision: the
    # bf16 products are exact in float32 anyway, and Mosaic (TPU) rejects an fp32 contract
    # precision on bf16 operands ("Bad lhs type").
    def low(product):
        return lambda a, b: product(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), out=a.dtype,
                                    precision=jax.lax.Precision.DEFAULT)

    return Ops(*rows, low(matmul), low(matmul_nt), low(matmul_tn))


XLA_OPS = chunk_ops(kernel=False)


def layer_norm(x: jax.Array, ops: Ops | None = None) -> jax.Array:
    """LayerNorm over the last axis without affine parameters (biased variance).

    With the default (XLA) ops, means and their broadcasts are matmuls with ones, so autodiff of
    this (first and second order, as the chunk scan needs) has no row reductions (slow on XLA:CPU).
    """
    ops = ops or XLA_OPS
    n = x.shape[-1]
    centered = x - ops.broadcast(ops.sum(x) / n, n)
    rstd = jax.lax.rsqrt(ops.sum(jnp.square(centered)) / n + LN_EPS)
    return centered * ops.broadcast(rstd, n)


def mlp_layers(weights: Weights, x: jax.Array, activation: str, mm=matmul) -> tuple[list[jax.Array], list[jax.Array]]:
    """The memory MLP on x `[..., n, D]`: each layer's input `a^(l)` and pre-activation `z^(l)`
    (`h_l = act(z^(l))` feeds the next layer; the last `z^(L)` is the MLP output)."""
    act = ACTIVATIONS[activation]
    inputs, pre = [], []
    h = x
    for layer, w in enumerate(weights):
        inputs.append(h)
        pre.append(mm(h, w))
        h = act(pre[-1]) if layer < len(weights) - 1 else h
    return inputs, pre


def memory_output(x: jax.Array, out: jax.Array, residual_norm: bool, ops: Ops | None = None) -> jax.Array:
    """M_W(x) from the MLP output `out`: `x + LN(out)` with residual_norm, else `out`."""
    return x + layer_norm(out, ops) if residual_norm else out


def memory_apply(weights: Weights, x: jax.Array, activation: str, residual_norm: bool) -> jax.Array:
    """M_W(x) for x `[..., n, D]` with weights `[..., in, out]` -> `[..., n, D]`."""
    return memory_output(x, mlp_layers(weights, x, activation)[1][-1], residual_norm)


def associative_loss(pred: jax.Array, v: jax.Array) -> jax.Array:
    """sum_d (M(k) - v)_d^2, summed over every leading axis too (tokens are independent)."""
    return jnp.sum(jnp.square(pred - v))


def split_refs(refs, sizes):
    """A kernel's flat refs cut into consecutive groups of the given sizes."""
    out, i = [], 0
    for size in sizes:
        out.append(refs[i : i + size])
        i += size
    return out
