"""The chunk form on TPU: Pallas kernels lowered through Mosaic, one grid step per chunk.

Grid `(batch, heads, chunks)`: the first two axes are "parallel" (independent programs, split
over a chip's cores), the chunk axis "arbitrary" (sequential). The memory state of a (row, head)
(weights, momentum, anchor: float32, every layer) lives in VMEM scratch across the chunk axis: it
is read from the input state at chunk 0 and written to the output state after the last chunk, and
never goes back to HBM in between. Each grid step sees one chunk's blocks, which the Pallas
pipeline prefetches (double-buffered DMA) while the previous chunk computes:

- q, k, v (and y, and their cotangents) `[b, D]`;
- the per-token coefficient rows `[L + 4, b]`: theta of each layer, then `Dc[t, t0]`, `c_t`,
  `G[b, j]`, `H[b, j]` (one row each, lane-major);
- `G[t, j]` `[b, b]`;
- the chunk's scalars `Dc[b, t0]`, `c_b`, `H[b, t0]` and "the chunk ends inside the call" in SMEM.

Every block spans the full extent of its last two dimensions, so Mosaic's (8, 128) tiling rule
holds for every chunk size and head dim (tiles that are not multiples of (8, 128) are padded in
VMEM by Mosaic, which costs VMEM, not correctness). HBM holds tokens head-major `[B, H, n, b, D]`
(a transpose in XLA outside the kernel): Mosaic cannot slice a head out of `[B, T, H, D]` (a
squeezed second-minor dimension).

The per-chunk math is `chunk_forward` / `chunk_backward` of `chunked.py`, called on 2-D tiles, as
in the Triton kernel (`pallas.py`); laying the call on the chunk grid and the coefficients stay in
XLA, exactly as there. Training: groups of ~sqrt(n) chunks, one `jax.custom_vjp` op each; its
backward reruns the forward kernel saving every chunk's start state, then runs the backward
kernel over the group's chunks in reverse (the chunk grid axis read backwards), carrying the
state's cotangent in VMEM scratch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from titans.kernels.memory.chunked import (
    Coefficients, chunk_backward, chunk_forward, kernel_grid, kernel_groups, kernel_result,
)
from titans.kernels.memory.common import MemoryState, chunk_ops, split_refs

SEMANTICS = ("parallel", "parallel", "arbitrary")
ROWS = ("d0", "c", "gamma_end", "mom_end")  # the per-token coefficient rows after the L theta rows
ENDS = ("d0_end", "c_end", "h0_end")  # the per-chunk scalars (SMEM), then `completes`


def interpret_mode(interpret: bool, dtype):
    """Where asked (CPU): Pallas' TPU interpreter, which runs the kernel with TPU semantics (VMEM
    scratch that starts as NaN, the grid in order, blocks copied in and out); for a float64 state
    (gradient checks under `jax.enable_x64`, which its host callbacks do not see) the plain
    interpreter, the same kernel body as XLA ops."""
    if not interpret:
        return False
    return True if jnp.dtype(dtype) == jnp.float64 else pltpu.InterpretParams()



def _chunk_inputs(c, q_ref, k_ref, v_ref, rows_ref, gamma_ref, ends_ref, depth):
    """Chunk c's inputs (q, k, v, thetas), coefficients and `completes`: the token blocks are this
    grid step's, the scalars are row c of the (row, head)'s `[n, 4]` SMEM block."""
    thetas = tuple(rows_ref[layer, :] for layer in range(depth))
    row = {name: rows_ref[depth + r, :] for r, name in enumerate(ROWS)}
    end = {name: ends_ref[c, e] for e, name in enumerate(ENDS)}
    coef = Coefficients(gamma=gamma_ref[...], **row, **end)
    return (q_ref[...], k_ref[...], v_ref[...], thetas), coef, ends_ref[c, len(ENDS)] != 0


def _forward_kernel(*refs, depth, n, config, save):
    """Refs: start state (W, S, A: L each) [in, out]; q, k, v [b, D], rows, gamma, ends; outputs y,
    the final state (3L) and, with `save`, this chunk's start state (3L); scratch: the state (3L)."""
    sizes = [3 * depth, 6, 1, 3 * depth] + [3 * depth] * save + [3 * depth]
    start, chunk, (y_ref,), final, *rest = split_refs(refs, sizes)
    saved, scratch = (rest[0], rest[1]) if save else (None, rest[0])
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        for ref, init in zip(scratch, start):
            ref[...] = init[...]

    carry = tuple(tuple(r[...] for r in scratch[j * depth : (j + 1) * depth]) for j in range(3))
    if save:
        for ref, m in zip(saved, jax.tree.leaves(carry)):
            ref[...] = m
    inputs, coef, completes = _chunk_inputs(i, *chunk, depth)
    (carry, y), _ = chunk_forward(carry, inputs, coef, completes, config)
    y_ref[...] = y.astype(y_ref.dtype)
    for ref, m in zip(scratch, jax.tree.leaves(carry)):
        ref[...] = m

    @pl.when(i == n - 1)
    def _():
        for ref, m in zip(final, scratch):
            ref[...] = m[...]


def _backward_kernel(*refs, depth, n, config):
    """Refs: the chunk's start state (3L), q, k, v, rows, gamma, ends, y_bar, the final state's
    cotangent (3L); outputs the cotangents of q, k, v, rows, gamma, the chunk's scalars (one row
    each, broadcast over b) and of the start state (3L); scratch: the state's cotangent (3L)."""
    sizes = [3 * depth, 6, 1, 3 * depth, 3, 3, 3 * depth, 3 * depth]
    saved, chunk, (y_bar_ref,), bar_in, qkv_bar, coef_bar, bar_out, scratch = split_refs(refs, sizes)
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _():
        for ref, init in zip(scratch, bar_in):
            ref[...] = init[...]

    carry = tuple(tuple(r[...] for r in saved[l * depth : (l + 1) * depth]) for l in range(3))
    carry_bar = tuple(tuple(r[...] for r in scratch[l * depth : (l + 1) * depth]) for l in range(3))
    inputs, coef, completes = _chunk_inputs(n - 1 - j, *chunk, depth)
    _, residuals = chunk_forward(carry, inputs, coef, completes, config)
    carry_bar, (qb, kb, vb, thb), cb = chunk_backward(config, residuals, (carry_bar, y_bar_ref[...]))
    for ref, x in zip(qkv_bar, (qb, kb, vb)):
        ref[...] = x
    rows_bar, gamma_bar, ends_bar = coef_bar
    for r, x in enumerate((*thb, *(getattr(cb, name) for name in ROWS))):
        rows_bar[r, :] = x
    gamma_bar[...] = cb.gamma
    b = ends_bar.shape[-1]
    for e, name in enumerate(ENDS):
        ends_bar[e, :] = jnp.broadcast_to(getattr(cb, name), (b,))
    for ref, m in zip(scratch, jax.tree.leaves(carry_bar)):
        ref[...] = m

    @pl.when(j == n - 1)
    def _():
        for ref, m in zip(bar_out, scratch):
            ref[...] = m[...]


def _state_spec(w) -> pl.BlockSpec:
    """A (row, head)'s matrix of a state `[B, H, in, out]`, the same block at every chunk: one
    VMEM buffer, not the pipeline's two (it is fetched, or written back, once per program)."""
    return pl.BlockSpec((None, None, *w.shape[2:]), lambda i, j, c: (i, j, 0, 0), pipeline_mode=pl.Buffered(1))


def _chunk_spec(x, reverse: bool, n: int) -> pl.BlockSpec:
    """Chunk c (or n-1-c) of an array `[B, H, n, ...]`: its whole trailing block."""
    trail = x.shape[3:]
    pick = (lambda c: n - 1 - c) if reverse else (lambda c: c)
    return pl.BlockSpec((None, None, None, *trail), lambda i, j, c: (i, j, pick(c)) + (0,) * len(trail))


def _chunk_specs(xs, reverse, n):
    q, k, v, rows, gamma, ends = xs
    # The chunk scalars: a (row, head)'s whole `[n, 4]` in SMEM (a block's last two dimensions
    # must be whole or (8, 128) multiples there too), indexed by the chunk in the kernel.
    ends_spec = pl.BlockSpec((None, None, *ends.shape[2:]), lambda i, j, c: (i, j, 0, 0), memory_space=pltpu.SMEM)
    return [_chunk_spec(x, reverse, n) for x in (q, k, v, rows, gamma)] + [ends_spec]


VMEM_LIMIT = None  # vmem_limit_bytes of every kernel; None: the chip's scoped default (README: what each needs)


def _params():
    return pltpu.CompilerParams(dimension_semantics=SEMANTICS, vmem_limit_bytes=VMEM_LIMIT)


def _forward_call(carry, xs, static, save):
    n, activation, residual_norm, matmul_dtype, interpret = static
    q = xs[0]
    B, H = q.shape[:2]
    depth = len(carry[0])
    states = jax.tree.leaves(carry)
    like = lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype)
    per_chunk = lambda w: jax.ShapeDtypeStruct((B, H, n, *w.shape[2:]), w.dtype)
    out_shape = [like(q)] + [like(w) for w in states] + ([per_chunk(w) for w in states] if save else [])
    out_specs = ([_chunk_spec(q, False, n)] + [_state_spec(w) for w in states]
                 + ([_chunk_spec(s, False, n) for s in out_shape[1 + len(states):]] if save else []))
    kernel = functools.partial(
        _forward_kernel, depth=depth, n=n, save=save,
        config=(activation, residual_norm, chunk_ops(kernel=True, matmul_dtype=matmul_dtype)),
    )
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, H, n),
        in_specs=[_state_spec(w) for w in states] + _chunk_specs(xs, False, n), out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(w.shape[2:], w.dtype) for w in states],
        compiler_params=_params(), interpret=interpret_mode(interpret, states[0].dtype),
        name="titans_memory_forward" + ("_save" if save else ""),
    )(*states, *xs)
    y, rest = outs[0], outs[1:]
    unflat = lambda flat: tuple(tuple(flat[l * depth : (l + 1) * depth]) for l in range(3))
    return y, unflat(rest[: 3 * depth]), unflat(rest[3 * depth :]) if save else None


def _backward_call(saved, xs, cotangents, static):
    n, activation, residual_norm, matmul_dtype, interpret = static
    carry_bar, y_bar = cotangents
    q, k, v, rows, gamma, ends = xs
    B, H = q.shape[:2]
    depth = len(saved[0])
    saved_flat, bar_flat = jax.tree.leaves(saved), jax.tree.leaves(carry_bar)
    ends_rows = jax.ShapeDtypeStruct((B, H, n, len(ENDS), rows.shape[-1]), rows.dtype)
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    out_shape = [like(x) for x in (q, k, v, rows, gamma)] + [ends_rows] + [like(w) for w in bar_flat]
    out_specs = [_chunk_spec(x, True, n) for x in out_shape[:6]] + [_state_spec(w) for w in bar_flat]
    in_specs = ([_chunk_spec(s, True, n) for s in saved_flat] + _chunk_specs(xs, True, n) + [_chunk_spec(y_bar, True, n)]
                + [_state_spec(w) for w in bar_flat])
    kernel = functools.partial(
        _backward_kernel, depth=depth, n=n,
        config=(activation, residual_norm, chunk_ops(kernel=True, matmul_dtype=matmul_dtype)),
    )
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, H, n), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(w.shape[2:], w.dtype) for w in bar_flat],
        compiler_params=_params(), interpret=interpret_mode(interpret, saved_flat[0].dtype), name="titans_memory_backward",
    )(*saved_flat, *xs, y_bar, *bar_flat)
    q_bar, k_bar, v_bar, rows_bar, gamma_bar, ends_bar = outs[:6]
    # The scalars' cotangents (column 0 of their broadcast rows); `completes` has none.
    ends_bar = jnp.concatenate([ends_bar[..., 0], jnp.zeros_like(ends[..., len(ENDS):])], axis=-1)
    rest = outs[6:]
    start_bar = tuple(tuple(rest[l * depth : (l + 1) * depth]) for l in range(3))
    return start_bar, (q_bar, k_bar, v_bar, rows_bar, gamma_bar, ends_bar)


_group = kernel_groups(_forward_call, _backward_call)


def memory_scan_mosaic(
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

    # Head-major, chunk-major layouts [B, H, n, ...], then group-major for the scan over groups.
    tokens = lambda x: jnp.moveaxis(place(x, 0.0).reshape(B, n, b, H, D), 3, 1)  # [B, H, n, b, D]
    thetas = [jnp.moveaxis(theta[..., layer].reshape(B, n, b, H), 3, 1) for layer in range(depth)]
    rows = jnp.stack(thetas + [getattr(coef, name) for name in ROWS], axis=3)  # [B, H, n, L+4, b]
    flags = jnp.broadcast_to(completes.astype(coef.d0_end.dtype), (B, H, n))
    ends = jnp.stack([getattr(coef, name) for name in ENDS] + [flags], axis=-1)  # [B, H, n, 4]
    by_group = lambda x: jnp.moveaxis(x.reshape(B, H, groups, group, *x.shape[3:]), 2, 0)
    xs = tuple(map(by_group, (tokens(q), tokens(k), tokens(v), rows, coef.gamma, ends)))

    static = (group, activation, residual_norm, matmul_dtype, interpret)
    carry = (state.weights, state.momentum, state.anchor)
    carry, ys = jax.lax.scan(lambda c, x: _group(c, x, static), carry, xs)  # ys [G, B, H, g, b, D]
    y = jnp.moveaxis(ys, 0, 2).reshape(B, H, n * b, D).transpose(0, 2, 1, 3)
    return kernel_result(y, carry, offset, T, b)
