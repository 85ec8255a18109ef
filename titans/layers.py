"""Small shared pieces: norms, the SwiGLU feed-forward, bias-free dense layers with logical names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from titans.sharding import sharded_init

NORM_EPS = 1e-6


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis, in x's dtype (the sum in float32 or wider)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    # eps inside the rsqrt keeps the value and gradient finite for an all-zero head (SiLU can give one).
    norm = jax.lax.rsqrt(jnp.sum(jnp.square(x.astype(acc)), axis=-1, keepdims=True) + NORM_EPS)
    return (x.astype(acc) * norm).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x / RMS(x) * scale over the last axis, computed in float32 (or wider), returned in that dtype."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(acc)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + NORM_EPS)
    return x * scale.astype(acc)


def dense(n_in: int, n_out: int, names: tuple[str | None, str | None], *, dtype, param_dtype,
          rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free `nnx.Linear` whose kernel carries logical axis names."""
    return nnx.Linear(
        n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=sharded_init(nnx.initializers.lecun_normal(), *names), rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm with a learned gain `[dim]`; output in the compute dtype."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, name: str | None = "embed"):
        self.dtype = dtype
        self.scale = nnx.Param(sharded_init(nnx.initializers.ones, name)(rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...]).astype(self.dtype)


class SwiGLU(nnx.Module):
    """`(silu(x @ W_1) * (x @ W_3)) @ W_2`, x `[..., d_model]`."""

    def __init__(self, d_model: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = dense(d_model, hidden, ("embed", "mlp"), **kw)
        self.up = dense(d_model, hidden, ("embed", "mlp"), **kw)
        self.down = dense(hidden, d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
