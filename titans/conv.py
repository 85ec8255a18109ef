"""Causal depthwise 1-D convolution (the short conv in front of the memory's q, k, v)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from titans.layers import dense
from titans.sharding import sharded_init


def conv_taps(x: jax.Array, w: jax.Array) -> jax.Array:
    """The causal conv written as its taps (what `causal_depthwise_conv` computes; autodiff through
    it is the slow path the custom VJP replaces, and the oracle the tests compare it with)."""
    kernel, seq = w.shape[0], x.shape[1] - w.shape[0] + 1
    return sum(x[:, i : i + seq] * w[i] for i in range(kernel))


@jax.custom_vjp
def causal_depthwise_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """x `[batch, kernel-1+seq, channels]` (the previous kernel-1 inputs first), w `[kernel, channels]`
    -> `[batch, seq, channels]` with `out[t] = sum_i x[t+i] * w[i]` (row kernel-1 of w multiplies
    the current token).

    The VJP is written out because XLA:CPU lowers autodiff's pad-then-reduce weight gradient ~15x
    slower than this (41 ms vs 2.7 ms at 4096 x 256 on 2 cores).
    """
    return conv_taps(x, w)


def _fwd(x, w):
    return conv_taps(x, w), (x, w)


def _bwd(residuals, g):
    x, w = residuals
    kernel, seq = w.shape[0], g.shape[1]
    # d/dx is the same conv with the kernel flipped, over the cotangent padded on both sides.
    g_pad = jnp.pad(g, ((0, 0), (kernel - 1, kernel - 1), (0, 0)))
    x_bar = conv_taps(g_pad, w[::-1])
    w_bar = jnp.stack([jnp.einsum("btc,btc->c", x[:, i : i + seq], g) for i in range(kernel)])
    return x_bar.astype(x.dtype), w_bar.astype(w.dtype)


causal_depthwise_conv.defvjp(_fwd, _bwd)


class ConvProjection(nnx.Module):
    """`SiLU(causal_conv(x @ W))`: a linear projection followed by a causal depthwise conv.

    x `[batch, seq, d_in]` -> `[batch, seq, d_out]` in the compute dtype, carrying the last
    `kernel - 1` pre-conv rows `[batch, kernel-1, d_out]` between calls so that consecutive calls
    equal one. The taps accumulate in float32 (or float64 when computing in it); the carried rows
    stay in the compute dtype (the projection's output dtype, so carrying them is exact).
    """

    def __init__(self, d_in: int, d_out: int, *, kernel: int, dtype, param_dtype, rngs: nnx.Rngs,
                 names: tuple[str | None, str | None] = ("embed", "heads")):
        self.kernel, self.d_out, self.dtype = kernel, d_out, dtype
        self.proj = dense(d_in, d_out, names, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Weights [kernel, d_out]; row -1 multiplies the current token. PyTorch's Conv1d default
        # (uniform +-1/sqrt(fan_in), fan_in = kernel for depthwise), as in Gated DeltaNet's short conv.
        bound = 1.0 / math.sqrt(kernel)
        init = sharded_init(lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound), None, names[1])
        self.conv = nnx.Param(init(rngs.params(), (kernel, d_out), param_dtype))

    def zero_tail(self, batch_size: int) -> jax.Array:
        return jnp.zeros((batch_size, self.kernel - 1, self.d_out), self.dtype)

    def __call__(self, x: jax.Array, tail: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x `[batch, seq, d_in]`, tail `[batch, kernel-1, d_out]` (zeros when None) -> (out, new tail)."""
        u = self.proj(x.astype(self.dtype))
        if tail is None:
            tail = self.zero_tail(x.shape[0])
        full = jnp.concatenate([tail.astype(u.dtype), u], axis=1)
        acc = jnp.promote_types(self.dtype, jnp.float32)
        out = causal_depthwise_conv(full.astype(acc), self.conv[...].astype(acc))
        return jax.nn.silu(out).astype(self.dtype), full[:, full.shape[1] - (self.kernel - 1) :]
