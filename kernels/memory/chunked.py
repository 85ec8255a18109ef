"""The chunk form of the memory scan (spec appendix A) in pure JAX: one scan step per chunk.

Inside a chunk every gradient is taken at the anchor, so the chunk's weights at every token are the
carried weights plus a lower-triangular combination of rank-one per-token gradients. Per-token
outputs then come from the anchor's forward/backward on the keys and `b x b` coefficient matrices,
never from materialised per-token weights.

A call that starts mid-chunk (`offset > 0`) is laid on the global chunk grid: token `t` sits at
position `offset + t`, and positions outside the call are padding that leaves the state unchanged
(exactly what the write mask does). A traced offset needs one chunk more than a known one, so a
concrete offset is used as a Python int.

The per-chunk math (`chunk_forward`, `chunk_backward`) runs on any leading axes, so the Pallas
kernels (`pallas.py`) call the same functions on one (batch, head) tile.

Training: the chunk step has a hand-written VJP (`chunk_backward`; +21% training tokens/s over
autodiff on CPU), and the chunk scan is rematerialised in groups of ~sqrt(n) chunks, so backprop
keeps O(sqrt(n)) copies of the state instead of three per chunk.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from titans.kernels.memory.common import (
    ACTIVATIONS,
    MemoryState,
    associative_loss,
    chunk_ops,
    matmul,
    memory_output,
    mlp_layers,
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


def derivative(fn):
    """Elementwise derivative of an elementwise function."""
    return lambda z: jax.jvp(fn, (z,), (jnp.ones_like(z),))[1]


class Coefficients(NamedTuple):
    """A chunk's decay/momentum coefficients (spec appendix A); `b` is the chunk length.

    Readout rows (shifted down one row with read_before_write): d0 `[..., b]` = Dc[t, t0],
    c `[..., b]` = c_t, gamma `[..., b, b]` = G[t, j]. Chunk end: d0_end, c_end, h0_end `[...]` =
    Dc[b, t0], c_b, H[b, t0]; gamma_end, mom_end `[..., b]` = G[b, j], H[b, j].
    """

    d0: jax.Array
    c: jax.Array
    gamma: jax.Array
    d0_end: jax.Array
    c_end: jax.Array
    h0_end: jax.Array
    gamma_end: jax.Array
    mom_end: jax.Array


def chunk_coefficients(eta, alpha, valid, read_before_write) -> Coefficients:
    """eta, alpha `[..., b]`; valid `[..., b]` bool (broadcasts against them).

    Invalid positions (padding, write mask) get eta = 1, alpha = 0 and no S-carry term, so they
    pass the state through unchanged (their theta must be 0 too).
    """
    eta = jnp.where(valid, eta, 1.0)
    keep = jnp.where(valid, 1.0 - alpha, 1.0)
    mom = decay_products(eta)  # H of the spec, [..., b+1, b+1]
    dec = decay_products(keep)  # Dc of the spec
    h0 = mom[..., 1:, 0]  # H[t, t0], [..., b]
    d0 = dec[..., 1:, 0]  # Dc[t, t0]
    dec_valid = dec[..., 1:, 1:] * valid[..., None, :].astype(dec.dtype)  # Dc[t, s], masked s dropped
    gamma = matmul(dec_valid, mom[..., 1:, 1:])  # G[t, j], [..., b, b]
    c = matmul(dec_valid, h0[..., None])[..., 0]  # c_t, [..., b]
    ends = (d0[..., -1], c[..., -1], h0[..., -1], gamma[..., -1, :], mom[..., -1, 1:])
    if read_before_write:
        return Coefficients(_shift_rows(d0, 1.0, -1), _shift_rows(c, 0.0, -1), _shift_rows(gamma, 0.0, -2), *ends)
    return Coefficients(d0, c, gamma, *ends)


def key_error(out, k, v, residual_norm, ops):
    """d loss / d out for the memory's last pre-activation `out` [..., b, D] (the error delta^(L))."""
    return jax.grad(lambda o: associative_loss(memory_output(k, o, residual_norm, ops), v))(out)


def readout(coef: Coefficients, uw, us, p_theta, delta, ops):
    """A layer's readout pre-activation `zeta_t = Dc[t,t0] u_t W + c_t u_t S - sum_j G[t,j] theta_j
    (u_t . a_j) delta_j`, from `uw = u W`, `us = u S` `[..., b, out]`, `p_theta[t, j] = (u_t . a_j)
    theta_j` `[..., b, b]` and the errors `delta` `[..., b, out]`."""
    return coef.d0[..., None] * uw + coef.c[..., None] * us - ops.matmul(p_theta * coef.gamma, delta)


def end_state(coef: Coefficients, w, m, a, delta, th, ops):
    """A layer's weights and momentum `[..., in, out]` at the chunk end from those at its start,
    the layer inputs `a [..., b, in]`, errors `delta [..., b, out]` and step sizes `th [..., b]`."""
    new_w = coef.d0_end[..., None, None] * w + coef.c_end[..., None, None] * m
    new_w = new_w - ops.matmul_tn(a, (coef.gamma_end * th)[..., None] * delta)
    new_m = coef.h0_end[..., None, None] * m - ops.matmul_tn(a, (coef.mom_end * th)[..., None] * delta)
    return new_w, new_m


def chunk_forward(carry, inputs, coef: Coefficients, completes, config):
    """One chunk of the chunk form, on any leading axes (`[B, H]` here, none in a Pallas kernel).

    carry: (weights, momentum, anchor), each a tuple of `[..., in, out]`; inputs: q, k, v
    `[..., b, D]` and theta, a tuple of L `[..., b]` (0 at invalid positions); completes: bool `[]`
    (the chunk ends inside the call, so the next one re-anchors); config: (activation,
    residual_norm, ops). Returns ((new carry), y `[..., b, D]`) and the residuals of `chunk_backward`.
    """
    activation, residual_norm, ops = config
    act, act_grad = ACTIVATIONS[activation], derivative(ACTIVATIONS[activation])
    weights, momentum, anchor = carry
    q, k, v, theta = inputs
    depth = len(weights)

    # One forward + backward of the memory on the keys at the anchor: the layer inputs a^(l) and
    # errors delta^(l) whose outer products are the per-token gradients g_j^(l).
    a, z = mlp_layers(anchor, k, activation, ops.matmul)
    delta = [None] * depth
    s = [None] * (depth - 1)  # delta^(l+1) W^(l+1)T, before the activation's derivative
    delta[-1] = key_error(z[-1], k, v, residual_norm, ops)
    for layer in reversed(range(depth - 1)):
        s[layer] = ops.matmul_nt(delta[layer + 1], anchor[layer + 1])
        delta[layer] = s[layer] * act_grad(z[layer])

    u, uw, us, p, zeta = [], [], [], [], []
    new_weights, new_momentum = [], []
    h = q
    for layer, (w, m) in enumerate(zip(weights, momentum)):
        th = theta[layer]  # [..., b]
        u.append(h)
        p.append(ops.matmul_nt(h, a[layer]))  # u_t . a_j, [..., b(t), b(j)]
        uw.append(ops.matmul(h, w))
        us.append(ops.matmul(h, m))
        zeta.append(readout(coef, uw[-1], us[-1], p[-1] * th[..., None, :], delta[layer], ops))
        h = act(zeta[-1]) if layer < depth - 1 else h
        w, m = end_state(coef, w, m, a[layer], delta[layer], th, ops)
        new_weights.append(w)
        new_momentum.append(m)
    y = memory_output(q, zeta[-1], residual_norm, ops)

    new_anchor = tuple(jnp.where(completes, w, an) for w, an in zip(new_weights, anchor))
    out = ((tuple(new_weights), tuple(new_momentum), new_anchor), y)
    return out, (carry, inputs, coef, completes, a, z, s, delta, u, uw, us, p, zeta)


def chunk_backward(config, residuals, cotangents):
    """Hand-written VJP of `chunk_forward`: first-order terms through the readout and the state
    update, second-order ones through the per-token gradients (a^(l), delta^(l) depend on k, v and
    the anchor). Only elementwise pieces (LayerNorm, activations) use jax.vjp.

    Returns the carry's cotangent, (q, k, v, theta-tuple) cotangents and the coefficients' one.
    """
    activation, residual_norm, ops = config
    act_grad = derivative(ACTIVATIONS[activation])
    carry, inputs, coef, completes, a, z, s, delta, u, uw, us, p, zeta = residuals
    (new_weights_bar, new_momentum_bar, new_anchor_bar), y_bar = cotangents
    weights, momentum, anchor = carry
    q, k, v, theta = inputs
    depth = len(weights)
    # Nested single-axis sums: a Triton kernel has no multi-axis reduction.
    sum_mat = lambda x: jnp.sum(jnp.sum(x, axis=-1), axis=-1)

    # new_anchor = where(completes, new_weights, anchor)
    new_weights_bar = [wb + jnp.where(completes, ab, 0.0) for wb, ab in zip(new_weights_bar, new_anchor_bar)]
    anchor_bar = [jnp.where(completes, 0.0, ab) for ab in new_anchor_bar]
    a_bar = [jnp.zeros_like(x) for x in a]
    delta_bar = [jnp.zeros_like(x) for x in delta]
    z_bar = [jnp.zeros_like(x) for x in z]
    weights_bar, momentum_bar, theta_bar = [None] * depth, [None] * depth, [None] * depth
    coef_bar = {name: 0.0 for name in Coefficients._fields}

    # Chunk-end state: W' = d0 W + c S - a^T diag(G_b theta) delta, S' = h0 S - a^T diag(H_b theta) delta.
    for layer in range(depth):
        th = theta[layer]
        wb, mb = new_weights_bar[layer], new_momentum_bar[layer]
        w, m = weights[layer], momentum[layer]
        weights_bar[layer] = coef.d0_end[..., None, None] * wb
        momentum_bar[layer] = coef.c_end[..., None, None] * wb + coef.h0_end[..., None, None] * mb
        coef_bar["d0_end"] += sum_mat(wb * w)
        coef_bar["c_end"] += sum_mat(wb * m)
        coef_bar["h0_end"] += sum_mat(mb * m)
        gw, gm = (coef.gamma_end * th)[..., None], (coef.mom_end * th)[..., None]
        a_wb, a_mb = ops.matmul(a[layer], wb), ops.matmul(a[layer], mb)  # [..., b, out]
        a_bar[layer] -= gw * ops.matmul_nt(delta[layer], wb) + gm * ops.matmul_nt(delta[layer], mb)
        delta_bar[layer] -= gw * a_wb + gm * a_mb
        coef_w = -ops.sum(a_wb * delta[layer])[..., 0]  # d/d(G_b theta)_j
        coef_m = -ops.sum(a_mb * delta[layer])[..., 0]
        theta_bar[layer] = coef_w * coef.gamma_end + coef_m * coef.mom_end
        coef_bar["gamma_end"] += coef_w * th
        coef_bar["mom_end"] += coef_m * th

    # Readout: zeta = d0 (u W) + c (u S) - (P * G * theta) delta, layer by layer from the top.
    _, readout_vjp = jax.vjp(lambda zz, qq: memory_output(qq, zz, residual_norm, ops), zeta[-1], q)
    zeta_bar, q_bar = readout_vjp(y_bar.astype(zeta[-1].dtype))
    u_bar = None  # the error of the layer above, set at the end of each iteration
    for layer in reversed(range(depth)):
        th = theta[layer]
        if layer < depth - 1:
            zeta_bar = u_bar * act_grad(zeta[layer])
        coef_bar["d0"] += ops.sum(zeta_bar * uw[layer])[..., 0]
        coef_bar["c"] += ops.sum(zeta_bar * us[layer])[..., 0]
        zd, zc = coef.d0[..., None] * zeta_bar, coef.c[..., None] * zeta_bar
        weights_bar[layer] += ops.matmul_tn(u[layer], zd)
        momentum_bar[layer] += ops.matmul_tn(u[layer], zc)
        u_bar = ops.matmul_nt(zd, weights[layer]) + ops.matmul_nt(zc, momentum[layer])
        scores_bar = -ops.matmul_nt(zeta_bar, delta[layer])  # [..., b, b]
        delta_bar[layer] -= ops.matmul_tn(p[layer] * coef.gamma * th[..., None, :], zeta_bar)
        pm = scores_bar * p[layer]
        coef_bar["gamma"] += pm * th[..., None, :]
        theta_bar[layer] += jnp.sum(pm * coef.gamma, axis=-2)
        p_bar = scores_bar * coef.gamma * th[..., None, :]
        u_bar += ops.matmul(p_bar, a[layer])
        a_bar[layer] += ops.matmul_tn(p_bar, u[layer])
    q_bar += u_bar

    # Keys, second order: delta^(l) = (delta^(l+1) W^(l+1)T) * act'(z^(l)), delta^(L) = error(out).
    for layer in range(depth - 1):
        _, chain_vjp = jax.vjp(lambda ss, zz: ss * act_grad(zz), s[layer], z[layer])
        s_bar, z_extra = chain_vjp(delta_bar[layer])
        z_bar[layer] += z_extra
        delta_bar[layer + 1] += ops.matmul(s_bar, anchor[layer + 1])
        anchor_bar[layer + 1] += ops.matmul_tn(s_bar, delta[layer + 1])
    _, error_vjp = jax.vjp(lambda o, kk, vv: key_error(o, kk, vv, residual_norm, ops), z[-1], k, v)
    out_bar, k_bar, v_bar = error_vjp(delta_bar[-1])
    z_bar[-1] += out_bar
    # Keys, first order: z^(l) = a^(l) A^(l), a^(l+1) = act(z^(l)), a^(1) = k.
    for layer in reversed(range(depth)):
        anchor_bar[layer] += ops.matmul_tn(a[layer], z_bar[layer])
        a_bar[layer] += ops.matmul_nt(z_bar[layer], anchor[layer])
        if layer > 0:
            z_bar[layer - 1] += a_bar[layer] * act_grad(z[layer - 1])
    k_bar += a_bar[0]

    carry_bar = (tuple(weights_bar), tuple(momentum_bar), tuple(anchor_bar))
    return carry_bar, (q_bar, k_bar, v_bar, tuple(theta_bar)), Coefficients(**coef_bar)


def _step_forward(carry, xs, config):
    """The scan step: one chunk with its coefficients. xs: q, k, v [B, H, b, D]; theta [B, H, b, L]
    (0 where invalid); eta, alpha [B, H, b]; valid [B, 1, b] bool; completes [] bool."""
    activation, residual_norm, read_before_write, matmul_dtype = config
    q, k, v, theta, eta, alpha, valid, completes = xs
    coef = chunk_coefficients(eta, alpha, valid, read_before_write)
    inputs = (q, k, v, tuple(theta[..., layer] for layer in range(theta.shape[-1])))
    ops = chunk_ops(kernel=False, matmul_dtype=matmul_dtype)
    out, residuals = chunk_forward(carry, inputs, coef, completes, (activation, residual_norm, ops))
    return out, (residuals, eta, alpha, valid)


def _step_backward(config, residuals, cotangents):
    activation, residual_norm, read_before_write, matmul_dtype = config
    residuals, eta, alpha, valid = residuals
    carry_bar, (q_bar, k_bar, v_bar, theta_bar), coef_bar = chunk_backward(
        (activation, residual_norm, chunk_ops(kernel=False, matmul_dtype=matmul_dtype)), residuals, cotangents
    )
    _, coefficients_vjp = jax.vjp(lambda e, al: chunk_coefficients(e, al, valid, read_before_write), eta, alpha)
    eta_bar, alpha_bar = coefficients_vjp(coef_bar)
    return carry_bar, (q_bar, k_bar, v_bar, jnp.stack(theta_bar, axis=-1), eta_bar, alpha_bar, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunk_step(carry, xs, config):
    return _step_forward(carry, xs, config)[0]


_chunk_step.defvjp(_step_forward, _step_backward)


def chunk_count(offset, T: int, b: int) -> int:
    """Chunks of the grid that a call of T tokens from `offset` touches (a traced offset: room
    for any offset in [0, b))."""
    if isinstance(offset, jax.core.Tracer):
        return -(-(T + b - 1) // b)
    return -(-(int(offset) + T) // b)


def chunk_grid(offset, T: int, b: int, min_chunks: int = 1):
    """Lay a call of T tokens on the global chunk grid (module docstring, "Offsets").

    Returns `n` (chunks, at least `min_chunks`), `place(x, fill)`: `[B, T, ...] -> [B, n*b, ...]`
    with positions outside the call set to `fill`, `in_call [n*b]` bool, `completes [n]` bool
    (the chunk ends inside the call) and `offset` (a Python int where it is concrete).
    """
    n = max(chunk_count(offset, T, b), min_chunks)
    if not isinstance(offset, jax.core.Tracer):
        offset = int(offset)
        left = offset
    else:
        left = b - 1

    def place(x, fill):
        pad = [(0, 0)] * x.ndim
        pad[1] = (left, n * b - T - (offset if isinstance(offset, int) else 0))
        x = jnp.pad(x, pad, constant_values=fill)
        if not isinstance(offset, int):
            x = jax.lax.dynamic_slice_in_dim(x, b - 1 - offset, n * b, axis=1)
        return x

    pos = jnp.arange(n * b)
    in_call = (pos >= offset) & (pos < offset + T)
    completes = (jnp.arange(1, n + 1) * b) <= offset + T
    return n, place, in_call, completes, offset


class KernelGrid(NamedTuple):
    """A call laid out for the Pallas kernels (Triton and Mosaic): `n` chunks in `groups` groups of
    `group` (~sqrt(n)) chunks, one kernel launch each; `place` and `offset` as in `chunk_grid`;
    theta `[B, n*b, H, L]` zero where no write happens; `coef` `[B, H, n, ...]`."""

    n: int
    group: int
    groups: int
    place: Callable
    completes: jax.Array
    offset: object
    theta: jax.Array
    coef: Coefficients


def kernel_grid(offset, theta, eta, alpha, mask, b: int, read_before_write: bool) -> KernelGrid:
    """Lay a call (theta `[B, T, H, L]`, eta, alpha `[B, T, H]`, mask `[B, T]`) on whole groups of
    chunks: the extra chunks past the call are padding that passes the state through."""
    B, T, H, _ = theta.shape
    count = chunk_count(offset, T, b)
    group = max(1, math.isqrt(count))
    groups = -(-count // group)
    n, place, in_call, completes, offset = chunk_grid(offset, T, b, min_chunks=groups * group)
    valid = place(mask, False) & in_call  # [B, N]
    theta = jnp.where(valid[:, :, None, None], place(theta, 0.0), 0.0)
    by_chunk = lambda x, fill: jnp.moveaxis(place(x, fill).reshape(B, n, b, H), 3, 1)  # [B, H, n, b]
    coef = chunk_coefficients(by_chunk(eta, 1.0), by_chunk(alpha, 0.0), valid.reshape(B, 1, n, b), read_before_write)
    return KernelGrid(n, group, groups, place, completes, offset, theta, coef)


def kernel_result(y: jax.Array, carry, offset, T: int, b: int) -> tuple[jax.Array, MemoryState]:
    """A kernel call's outputs `[B, n*b, H, D]` and final (weights, momentum, anchor) -> the call's
    `y [B, T, H, D]` and state."""
    y = jax.lax.dynamic_slice_in_dim(y, offset, T, axis=1)
    weights, momentum, anchor = carry
    return y, MemoryState(weights, momentum, anchor, jnp.asarray((offset + T) % b, jnp.int32))


def kernel_groups(forward_call: Callable, backward_call: Callable) -> Callable:
    """`group(carry, xs, static) -> (carry, y)`: a group of chunks in one kernel launch, as one
    `jax.custom_vjp` op. `forward_call(carry, xs, static, save)` returns (y, carry, the chunk-start
    states when `save`); the backward recomputes those (`save=True`) and runs
    `backward_call(saved, xs, cotangents, static)`, carrying the state's cotangent."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def group(carry, xs, static):
        y, carry, _ = forward_call(carry, xs, static, save=False)
        return carry, y

    def forward(carry, xs, static):
        return group(carry, xs, static), (carry, xs)

    def backward(static, residuals, cotangents):
        carry, xs = residuals
        _, _, saved = forward_call(carry, xs, static, save=True)
        return backward_call(saved, xs, cotangents, static)

    group.defvjp(forward, backward)
    return group


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
    matmul_dtype: str = "float32",
) -> tuple[jax.Array, MemoryState]:
    B, T, H, D = q.shape
    b = chunk_size
    n, place, in_call, completes, offset = chunk_grid(state.offset, T, b)

    def chunks(x, fill):
        """[B, T, ...] -> [n, B, H, b, ...] (the mask: [n, B, 1, b])."""
        x = place(x, fill).reshape(B, n, b, *x.shape[2:])
        if x.ndim == 3:  # mask [B, n, b]
            return jnp.moveaxis(x, 1, 0)[:, :, None, :]
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    valid = chunks(mask, False) & in_call.reshape(n, 1, 1, b)
    theta = jnp.where(valid[..., None], chunks(theta, 0.0), 0.0)
    xs = (
        chunks(q, 0.0), chunks(k, 0.0), chunks(v, 0.0), theta,
        chunks(eta, 1.0), chunks(alpha, 0.0), valid, completes,
    )

    config = (activation, residual_norm, read_before_write, matmul_dtype)
    step = lambda carry, chunk_xs: _chunk_step(carry, chunk_xs, config)

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
