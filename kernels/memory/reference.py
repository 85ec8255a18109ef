"""The oracle: spec section 1 token by token, written to be obviously right rather than fast.

Every per-token gradient is `jax.grad` of the associative loss at the anchor (chunk-start weights),
so outer gradients through it are JAX's own second-order autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from titans.kernels.memory.common import MemoryState, associative_loss, memory_apply


def memory_scan_reference(
    state: MemoryState,
    q: jax.Array,  # [B, T, H, D], compute dtype
    k: jax.Array,
    v: jax.Array,
    theta: jax.Array,  # [B, T, H, L]
    eta: jax.Array,  # [B, T, H]
    alpha: jax.Array,  # [B, T, H]
    mask: jax.Array,  # [B, T] bool
    *,
    chunk_size: int,
    activation: str,
    residual_norm: bool,
    read_before_write: bool,
) -> tuple[jax.Array, MemoryState]:
    def memory(weights, x):  # weights [B, H, in, out], x [B, H, D] -> [B, H, D]
        return memory_apply(weights, x[..., None, :], activation, residual_norm)[..., 0, :]

    def loss(weights, key, value):
        return associative_loss(memory(weights, key), value)

    def step(carry, xs):
        weights, momentum, anchor, offset = carry
        q_t, k_t, v_t, theta_t, eta_t, alpha_t, mask_t = xs  # [B, H, ...], mask_t [B]
        # Rows and heads have independent losses, so the gradient of the summed loss is the
        # per-(row, head) gradient.
        grads = jax.grad(loss)(anchor, k_t, v_t)
        new_momentum, new_weights = [], []
        for layer, (w, s, g) in enumerate(zip(weights, momentum, grads)):
            th = theta_t[..., layer, None, None]
            s_new = eta_t[..., None, None] * s - th * g
            w_new = (1 - alpha_t[..., None, None]) * w + s_new
            keep = mask_t[:, None, None, None]
            new_momentum.append(jnp.where(keep, s_new, s))
            new_weights.append(jnp.where(keep, w_new, w))
        new_weights, new_momentum = tuple(new_weights), tuple(new_momentum)
        new_offset = (offset + 1) % chunk_size
        new_anchor = jax.tree.map(
            lambda w, a: jnp.where(new_offset == 0, w, a), new_weights, anchor
        )
        y = memory(weights if read_before_write else new_weights, q_t)
        return (new_weights, new_momentum, new_anchor, new_offset), y

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    xs = tuple(map(time_major, (q, k, v, theta, eta, alpha, mask)))
    carry = (state.weights, state.momentum, state.anchor, jnp.asarray(state.offset, jnp.int32))
    carry, y = jax.lax.scan(step, carry, xs)
    return jnp.moveaxis(y, 0, 1), MemoryState(*carry)
