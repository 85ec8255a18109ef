"""The chunk form in Pallas on NVIDIA GPUs (Triton): the chunk loop runs inside one kernel program
per (batch, head).

Depth 2 (every preset) runs `tiled.py`'s kernels: the state stays in global memory and each chunk
walks it in tiles of the hidden width, so a program's live values are a few `[D, 16]` tiles and
`[b, D]` sums (no spills, seconds of compile; BENCHMARKS.md "Compile proof"). Other depths run the
whole-state kernels below, which call the same per-chunk math as `chunked.py` (`chunk_forward` /
`chunk_backward`) on 2-D tiles; at the presets' sizes those spill (a depth-1 `[D, D]` state is
small, a depth >= 3 `[h, h]` one is not). What stays in XLA: laying the call on the chunk grid and
the decay coefficients of every chunk (`chunk_coefficients`, `b x b` per chunk; their gradient is
XLA autodiff of that small function).

Training: the chunks are run in groups of ~sqrt(n). A group is one `jax.custom_vjp` op whose
forward is one kernel launch; the `lax.scan` over groups keeps one state per group for backprop.
Its backward recomputes the group's chunk-start states with the forward kernel (`save=True`) and
runs the backward kernel over the group's chunks in reverse, carrying the state's cotangent.

Matmuls are float32 in, float32 out (`Precision.HIGHEST`, Triton's "ieee" input precision), the
same numbers as `chunked` up to summation order; `matmul_dtype="bfloat16"` feeds them bf16 inputs
(tensor cores) with float32 accumulation and a float32 state, in both impls alike. Triton needs
power-of-two tiles of at least 16 for its dots, so the chunk size, head dim and hidden width must
be powers of two >= 16 on GPU (`supported` says why a shape is not); interpret mode (CPU) runs any
shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from titans.kernels.memory.chunked import (
    Coefficients, chunk_backward, chunk_forward, kernel_grid, kernel_groups, kernel_result,
)
from titans.kernels.memory import tiled
from titans.kernels.memory.common import MemoryState, chunk_ops, split_refs

# The whole-state kernels (depth 1 and >= 3): one warp group per program (the chunk loop is
# sequential); depth 2 runs `tiled.py`'s kernels with their own warps.
NUM_WARPS = 4
NUM_STAGES = 1


def _compiler_params(depth: int):
    return pltriton.CompilerParams(num_warps=tiled.NUM_WARPS if depth == 2 else NUM_WARPS, num_stages=NUM_STAGES)


def supported(chunk_size: int, head_dim: int, hidden: int, dtype) -> str | None:
    """Why the compiled (GPU) kernel cannot run a shape, or None if it can."""
    for name, x in (("chunk_size", chunk_size), ("head_dim", head_dim), ("hidden width", hidden)):
        if x < 16 or x & (x - 1):
            return f"{name} is {x}; the Triton kernel needs a power of two >= 16"
    if jnp.dtype(dtype) != jnp.float32:
        return f"the state is {jnp.dtype(dtype)}; the Triton kernel runs float32 states"
    return None


def _forward_kernel(*refs, depth, b, n, config, save):
    """Refs: state (W, S, A: L each), q, k, v [n*b, D], theta (L) [n*b], coefficients, completes [n];
    outputs y [n*b, D], the final state and, with `save`, every chunk's start state [n, in, out]."""
    sizes = [depth] * 3 + [3, depth, 8, 1, 1] + [depth] * (6 if save else 3)
    w0, s0, a0, qkv, thetas, coef_refs, (completes,), (y_ref,), *outs = split_refs(refs, sizes)
    coef_refs = Coefficients(*coef_refs)

    def body(i, carry):
        if save:
            for saved, mats in zip(outs[3:], carry):
                for ref, m in zip(saved, mats):
                    ref[i] = m
        inputs, coef = tiled.load_chunk(i, b, *qkv, thetas, coef_refs)
        (carry, y), _ = chunk_forward(carry, inputs, coef, completes[i] != 0, config)
        y_ref[pl.ds(i * b, b), :] = y.astype(y_ref.dtype)
        return carry

    carry = tuple(tuple(r[...] for r in refs_) for refs_ in (w0, s0, a0))
    carry = jax.lax.fori_loop(0, n, body, carry)
    for final, mats in zip(outs[:3], carry):
        for ref, m in zip(final, mats):
            ref[...] = m


def _backward_kernel(*refs, depth, b, n, config):
    """Refs: chunk-start states (W, S, A: L each) [n, in, out], q, k, v, theta (L), coefficients,
    completes, y_bar [n*b, D], the final state's cotangent (3L); outputs the cotangents of q, k, v,
    theta (L), the coefficients (8) and the start state (3L)."""
    sizes = [depth] * 3 + [3, depth, 8, 1, 1] + [depth] * 3 + [3, depth, 8] + [depth] * 3
    sw, ss, sa, qkv, thetas, coef_refs, (completes,), (y_bar,), *rest = split_refs(refs, sizes)
    carry_bar_in, qkv_bar, theta_bar, coef_bar, carry_bar_out = rest[:3], rest[3], rest[4], rest[5], rest[6:]
    coef_refs = Coefficients(*coef_refs)

    def body(j, carry_bar):
        i = n - 1 - j
        t = pl.ds(i * b, b)
        carry = tuple(tuple(r[i] for r in refs_) for refs_ in (sw, ss, sa))
        inputs, coef = tiled.load_chunk(i, b, *qkv, thetas, coef_refs)
        _, residuals = chunk_forward(carry, inputs, coef, completes[i] != 0, config)
        carry_bar, (qb, kb, vb, thb), cb = chunk_backward(config, residuals, (carry_bar, y_bar[t, :]))
        tiled.store_chunk_cotangents(i, b, qkv_bar, theta_bar, coef_bar, (qb, kb, vb), thb, cb)
        return carry_bar

    carry_bar = tuple(tuple(r[...] for r in refs_) for refs_ in carry_bar_in)
    carry_bar = jax.lax.fori_loop(0, n, body, carry_bar)
    for final, mats in zip(carry_bar_out, carry_bar):
        for ref, m in zip(final, mats):
            ref[...] = m


def _per_head(x) -> pl.BlockSpec:
    """Program (i, j) of grid (B, H) sees row i, head j of an array `[B, H, ...]`."""
    return pl.BlockSpec((None, None, *x.shape[2:]), lambda i, j: (i, j) + (0,) * (len(x.shape) - 2))


def _specs(carry, xs, n):
    """BlockSpecs of the kernels' common inputs: the (row, head) slice of every array; tokens
    `[B, T, H, D]` are sliced in place (no transpose in HBM)."""
    tokens = lambda x: pl.BlockSpec((None, x.shape[1], None, x.shape[3]), lambda i, j: (i, 0, j, 0))
    q, k, v, thetas, coef, completes = xs
    return (
        [_per_head(w) for mats in carry for w in mats]
        + [tokens(x) for x in (q, k, v)]
        + [_per_head(x) for x in (*thetas, *coef)]
        + [pl.BlockSpec((n,), lambda i, j: (0,))]
    )


def _forward_call(carry, xs, static, save):
    b, n, activation, residual_norm, matmul_dtype, interpret = static
    q = xs[0]
    B, _, H, _ = q.shape
    depth = len(carry[0])
    mats = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in carry[0]]
    saved = [jax.ShapeDtypeStruct((B, H, n, *w.shape[2:]), w.dtype) for w in carry[0]]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] + mats * 3 + (saved * 3 if save else [])
    in_specs = _specs(carry, xs, n)
    out_specs = [in_specs[3 * depth]] + [_per_head(s) for s in out_shape[1:]]
    config = (activation, residual_norm, chunk_ops(kernel=True, matmul_dtype=matmul_dtype))
    if depth == 2:
        t = tiled.hidden_tile(carry[0][0].shape[-1], interpret)
        kernel = functools.partial(tiled.forward_kernel, b=b, n=n, t=t, config=config, save=save, interpret=interpret)
    else:
        kernel = functools.partial(_forward_kernel, depth=depth, b=b, n=n, save=save, config=config)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, H), in_specs=in_specs, out_specs=out_specs,
        compiler_params=_compiler_params(depth),
        interpret=interpret, name="titans_memory_forward" + ("_save" if save else ""),
    )(*jax.tree.leaves(carry), *jax.tree.leaves(xs))
    y, rest = outs[0], outs[1:]
    new_carry = tuple(tuple(rest[i * depth : (i + 1) * depth]) for i in range(3))
    saved = tuple(tuple(rest[(3 + i) * depth : (4 + i) * depth]) for i in range(3)) if save else None
    return y, new_carry, saved


def _backward_call(saved, xs, cotangents, static):
    b, n, activation, residual_norm, matmul_dtype, interpret = static
    carry_bar, y_bar = cotangents
    q, k, v, thetas, coef, completes = xs
    B, _, H, _ = q.shape
    depth = len(thetas)
    in_specs = _specs(saved, xs, n)
    token_spec = in_specs[3 * depth]
    in_specs += [token_spec] + [_per_head(w) for mats in carry_bar for w in mats]
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    out_shape = [like(x) for x in (q, k, v, *thetas, *coef, *jax.tree.leaves(carry_bar))]
    config = (activation, residual_norm, chunk_ops(kernel=True, matmul_dtype=matmul_dtype))
    if depth == 2:
        hidden = carry_bar[0][0].shape[-1]
        out_shape.append(jax.ShapeDtypeStruct((B, H, 2, b, hidden), q.dtype))  # the kernel's scratch
        kernel = functools.partial(tiled.backward_kernel, b=b, n=n, t=tiled.hidden_tile(hidden, interpret),
                                   config=config, interpret=interpret)
    else:
        kernel = functools.partial(_backward_kernel, depth=depth, b=b, n=n, config=config)
    out_specs = [token_spec] * 3 + [_per_head(s) for s in out_shape[3:]]
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, H), in_specs=in_specs, out_specs=out_specs,
        compiler_params=_compiler_params(depth),
        interpret=interpret, name="titans_memory_backward",
    )(*jax.tree.leaves(saved), *jax.tree.leaves(xs), y_bar, *jax.tree.leaves(carry_bar))
    q_bar, k_bar, v_bar = outs[:3]
    theta_bar = tuple(outs[3 : 3 + depth])
    coef_bar = Coefficients(*outs[3 + depth : 11 + depth])
    rest = outs[11 + depth : 11 + 4 * depth]
    start_bar = tuple(tuple(rest[i * depth : (i + 1) * depth]) for i in range(3))
    completes_bar = np.zeros(completes.shape, jax.dtypes.float0)
    return start_bar, (q_bar, k_bar, v_bar, theta_bar, coef_bar, completes_bar)


_group = kernel_groups(_forward_call, _backward_call)


def memory_scan_pallas(
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
    interpret: bool = False,
) -> tuple[jax.Array, MemoryState]:
    B, T, H, D = q.shape
    b = chunk_size
    depth = theta.shape[-1]
    n, group, groups, place, completes, offset, theta, coef = kernel_grid(
        state.offset, theta, eta, alpha, mask, b, read_before_write)

    # Group-major layouts for the scan over groups: tokens [G, B, g*b, H, D], per-token scalars
    # [G, B, H, g*b], per-chunk ones [G, B, H, g], the b x b rows [G, B, H, g*b, b].
    def tokens(x):
        return jnp.moveaxis(x.reshape(B, groups, group * b, *x.shape[2:]), 1, 0)

    def by_group(x, per_chunk):  # [B, H, n, ...] -> [G, B, H, g(*b), ...]
        x = x.reshape(B, H, groups, group, *x.shape[3:])
        if not per_chunk:
            x = x.reshape(B, H, groups, group * x.shape[4], *x.shape[5:])
        return jnp.moveaxis(x, 2, 0)

    thetas = tuple(by_group(jnp.moveaxis(theta[..., layer], 2, 1).reshape(B, H, n, b), False) for layer in range(depth))
    coef = Coefficients(*(by_group(x, x.ndim == 3) for x in coef))
    xs = (
        tokens(place(q, 0.0)), tokens(place(k, 0.0)), tokens(place(v, 0.0)), thetas, coef,
        completes.astype(jnp.int32).reshape(groups, group),
    )
    static = (b, group, activation, residual_norm, matmul_dtype, interpret)  # (b, chunks per group, ...)
    carry = (state.weights, state.momentum, state.anchor)
    carry, ys = jax.lax.scan(lambda c, x: _group(c, x, static), carry, xs)
    y = jnp.moveaxis(ys, 0, 1).reshape(B, n * b, H, D)
    return kernel_result(y, carry, offset, T, b)
