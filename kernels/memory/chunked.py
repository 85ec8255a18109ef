"""The chunk form of the memory scan (spec appendix A) in pure JAX: one scan step per chunk.

Inside a chunk every gradient is taken at the anchor, so the chunk's weights at every token are the
carried weights plus a lower-triangular combination of rank-one per-token gradients. Per-token
outputs then come from the anchor's forward/backward on the keys and `b x b` coefficient matrices,
never from materialised per-token weights.

A call that starts mid-chunk (`offset > 0`) is laid on the global chunk grid: token `t` sits at
position `offset + t`, and positions outside the call are padding that leaves the state unchanged
(exactly what the write mask does). A traced offset needs one chunk more than a known one, so a
concrete offset is used as a Python int.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kernels.memory.common import (
    ACTIVATIONS,
    MemoryState,
    associative_loss,
    layer_norm,
    matmul,
    memory_apply,
)


def decay_products(f: jax.Array) -> jax.Array:
    """Pairwise products of a chunk's factors, as direct products (no ratios, zero-safe).

    f `[..., b]` -> P `[..., b+1, b+1]` with P[t, j] = prod_{i=j+1..t} f_i for j <= t (1 on the
    diagonal) and 0 above it; index 0 is the chunk start t0, index i the chunk's i-th token.
    """
    b = f.shape[-1]
    f = jnp.concatenate([jnp.ones_like(f[..., :1]), f], axis=-1)
    idx = np.arange(b + 1)
    below = idx[:, None] > idx[None, :]
    factors = jnp.where(below, f[..., :, None], 1.0)
    return jnp.where(below | (idx[:, None] == idx[None, :]), jnp.cumprod(factors, axis=-2), 0.0)


def _shift_rows(x: jax.Array, fill: float, axis: int) -> jax.Array:
    """Row t of the result is row t-1 of x (row 0 is `fill`): the read-before-write coefficients."""
    x = jnp.moveaxis(x, axis, -1)
    x = jnp.concatenate([jnp.full_like(x[..., :1], fill), x[..., :-1]], axis=-1)
    return jnp.moveaxis(x, -1, axis)


def _chunk_step(carry, xs, *, activation, residual_norm, read_before_write):
    """One chunk. carry: (weights, momentum, anchor), each a tuple of [B, H, in, out].

    xs: q, k, v [B, H, b, D]; theta [B, H, b, L]; eta, alpha [B, H, b]; valid [B, 1, b] bool;
    completes [] bool (this chunk ends inside the call, so the next chunk re-anchors).
    """
    weights, momentum, anchor = carry
    q, k, v, theta, eta, alpha, valid, completes = xs
    act = ACTIVATIONS[activation]

    # Invalid positions (padding, write mask) pass the state through unchanged.
    eta = jnp.where(valid, eta, 1.0)
    keep = jnp.where(valid, 1.0 - alpha, 1.0)
    theta = jnp.where(valid[..., None], theta, 0.0)

    mom = decay_products(eta)  # H of the spec, [B, H, b+1, b+1]
    dec = decay_products(keep)  # Dc of the spec
    h0 = mom[..., 1:, 0]  # H[t, t0], [B, H, b]
    d0 = dec[..., 1:, 0]  # Dc[t, t0]
    dec_valid = dec[..., 1:, 1:] * valid[..., None, :].astype(dec.dtype)  # Dc[t, s], masked s dropped
    gamma = matmul(dec_valid, mom[..., 1:, 1:])  # G[t, j], [B, H, b, b]
    c = matmul(dec_valid, h0[..., None])[..., 0]  # c_t, [B, H, b]

    # One forward + backward of the memory on the keys at the anchor: the layer inputs a^(l) and
    # errors delta^(l) whose outer products are the per-token gradients g_j^(l).
    def key_loss(perturb):
        pred, inputs = memory_apply(anchor, k, activation, residual_norm, perturb)
        return associative_loss(pred, v), inputs

    zeros = [jnp.zeros(k.shape[:-1] + (w.shape[-1],), k.dtype) for w in anchor]
    deltas, key_inputs = jax.grad(key_loss, has_aux=True)(zeros)

    if read_before_write:
        rd0, rc, rgamma = _shift_rows(d0, 1.0, -1), _shift_rows(c, 0.0, -1), _shift_rows(gamma, 0.0, -2)
    else:
        rd0, rc, rgamma = d0, c, gamma

    u = q
    new_weights, new_momentum = [], []
    for layer, (w, s, a, delta) in enumerate(zip(weights, momentum, key_inputs, deltas)):
        th = theta[..., layer]  # [B, H, b]
        a_t = jnp.swapaxes(a, -1, -2)  # [B, H, in, b]
        scores = matmul(u, a_t) * rgamma * th[..., None, :]  # [B, H, b(t), b(j)]
        z = rd0[..., None] * matmul(u, w) + rc[..., None] * matmul(u, s) - matmul(scores, delta)
        u = act(z) if layer < len(weights) - 1 else z
        g_end = (gamma[..., -1, :] * th)[..., None, :]  # G[b, j] theta_j
        h_end = (mom[..., -1, 1:] * th)[..., None, :]  # H[b, j] theta_j
        new_weights.append(d0[..., -1, None, None] * w + c[..., -1, None, None] * s - matmul(a_t * g_end, delta))
        new_momentum.append(h0[..., -1, None, None] * s - matmul(a_t * h_end, delta))
    y = q + layer_norm(u) if residual_norm else u

    new_weights, new_momentum = tuple(new_weights), tuple(new_momentum)
    new_anchor = jax.tree.map(lambda w, a: jnp.where(completes, w, a), new_weights, anchor)
    return (new_weights, new_momentum, new_anchor), y


def memory_scan_chunked(
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
    B, T, H, D = q.shape
    b = chunk_size
    offset = state.offset
    if not isinstance(offset, jax.core.Tracer):
        offset = int(offset)
        n = -(-(offset + T) // b)
        left = offset
    else:  # traced: room for any offset in [0, b)
        n = -(-(T + b - 1) // b)
        left = b - 1

    def place(x, fill):
        """[B, T, ...] -> [n, B, H, b, ...] on the global chunk grid (the mask stays [n, B, 1, b])."""
        pad = [(0, 0)] * x.ndim
        pad[1] = (left, n * b - T - (offset if isinstance(offset, int) else 0))
        x = jnp.pad(x, pad, constant_values=fill)
        if not isinstance(offset, int):
            x = jax.lax.dynamic_slice_in_dim(x, b - 1 - offset, n * b, axis=1)
        x = x.reshape(B, n, b, *x.shape[2:])
        if x.ndim == 3:  # mask [B, n, b]
            return jnp.moveaxis(x, 1, 0)[:, :, None, :]
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)  # [n, B, H, b, ...]

    pos = jnp.arange(n * b)
    in_call = (pos >= offset) & (pos < offset + T)
    valid = place(mask, False) & in_call.reshape(n, 1, 1, b)
    completes = (jnp.arange(1, n + 1) * b) <= offset + T
    xs = (
        place(q, 0.0), place(k, 0.0), place(v, 0.0), place(theta, 0.0),
        place(eta, 1.0), place(alpha, 0.0), valid, completes,
    )

    step = jax.tree_util.Partial(
        _chunk_step, activation=activation, residual_norm=residual_norm,
        read_before_write=read_before_write,
    )

    # Backprop through a scan keeps every step's carry: three weight copies per chunk. Instead keep
    # the carry every `group` chunks and recompute each group's chunks in the backward pass.
    @jax.checkpoint
    def run_group(carry, group_xs):
        return jax.lax.scan(step, carry, group_xs)

    group = max(1, math.isqrt(n))
    groups, tail = divmod(n, group)
    carry = (state.weights, state.momentum, state.anchor)
    head_xs = jax.tree.map(lambda x: x[: groups * group].reshape(groups, group, *x.shape[1:]), xs)
    carry, ys = jax.lax.scan(run_group, carry, head_xs)
    ys = ys.reshape(groups * group, *ys.shape[2:])
    if tail:
        carry, tail_ys = run_group(carry, jax.tree.map(lambda x: x[groups * group :], xs))
        ys = jnp.concatenate([ys, tail_ys], axis=0)

    y = jnp.moveaxis(ys, 3, 2).reshape(n, B, b, H, D)  # [n, B, b, H, D]
    y = jnp.moveaxis(y, 0, 1).reshape(B, n * b, H, D)
    y = jax.lax.dynamic_slice_in_dim(y, offset, T, axis=1)
    weights, momentum, anchor = carry
    new_offset = jnp.asarray((offset + T) % b, jnp.int32)
    return y, MemoryState(weights, momentum, anchor, new_offset)
