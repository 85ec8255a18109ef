"""The Triton kernels' chunk math for a depth-2 memory, with the state streamed in hidden tiles.

A depth-2 memory of head dim D and hidden width h holds `W_1 [D, h]` and `W_2 [h, D]` for each of
weights, momentum and anchor. Whole, that is far more than a GPU thread block's registers (3 x 128
KiB at D = 64, h = 256), so the state stays in global memory (L2) and each chunk walks it in tiles
of `t` hidden units: `W_1[:, tile]` and `W_2[tile, :]`, `[D, t]` and `[t, D]`. The tile loops are
rolled (`fori_loop`), so the compiler sees each once.

Everything that mixes the hidden units goes through sums over tiles of `[b, D]` or `[b, b]`
values, which stay in registers. The same equations as `chunked.chunk_forward` /
`chunk_backward` (spec appendix A), with `a^(1) = k`, `u^(1) = q`:

forward, per chunk
  pass 1, per tile:  z1 = k A1,  a2 = act(z1),  z2 += a2 A2               (z2: [b, D])
  then               delta2 = d loss / d z2 (the LayerNorm and the loss need whole rows)
  pass 2, per tile:  delta1 = (delta2 A2^T) * act'(z1),
                     zeta1 = d0 (q W1) + c (q S1) - (P1 * G * theta1) delta1,  u2 = act(zeta1),
                     P2 += u2 a2^T,  q W2 += u2 W2,  q S2 += u2 S2,
                     the tile's chunk-end W, S (and anchor) written in place
  then               zeta2 = d0 (u2 W2) + c (u2 S2) - (P2 * G * theta2) delta2,  y = out(q, zeta2)

backward, per chunk (from the saved chunk-start state; the state's cotangent streamed the same
way, in place): passes 1 and 2 again (values only), the readout's cotangent for layer 2, then
  pass A, per tile: every term of `chunk_backward` that one tile determines: the tile's W and S
                    cotangents (complete), its anchor cotangent's terms so far, and sums over tiles
                    (d delta2, d u1, d a1, the [b, b] score cotangent of layer 1, coefficient sums);
                    the tile's partial d a2 and d z1 `[b, t]` go to a scratch buffer
  then              the key error's VJP: d z2, d k, d v (needs the whole d delta2)
  pass B, per tile: the first-order key terms that need d z2: the anchor cotangent's rest, d a1.

On a GPU the threads of a program share the tiles in global memory, so a barrier separates each
tile's loads from its in-place stores, and each chunk (and pass) from the next; interpret mode runs
sequentially and needs none.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from titans.kernels.memory.chunked import Coefficients, derivative, end_state, key_error, readout
from titans.kernels.memory.common import ACTIVATIONS, memory_output, split_refs

# Hidden units per tile on GPU, and warps per program: chosen by `scripts/bench_compile.py` (the
# "Compile proof" table of BENCHMARKS.md): 16 x 8 is the widest tile that 8 warps hold without
# spilling; 32-wide tiles or 4 warps spill, 16 warps cap a thread at 128 registers and spill.
HIDDEN_TILE = 16
NUM_WARPS = 8
# Interpret mode (CPU tests) walks small tiles, so every test shape runs the loops several times.
INTERPRET_TILE = 4


def hidden_tile(hidden: int, interpret: bool) -> int:
    return math.gcd(hidden, INTERPRET_TILE if interpret else HIDDEN_TILE)


class _Tiles:
    """Tile j of a depth-2 matrix pair: W_1 `[D, h]` by columns, W_2 `[h, D]` by rows; `at(i)`
    reads chunk i of a saved pair `[n, in, out]` the same way."""

    def __init__(self, t: int, barrier, lead=()):
        self.t, self.barrier, self.lead = t, barrier, lead

    def at(self, i) -> _Tiles:
        return _Tiles(self.t, self.barrier, (i,))

    def get(self, pair, j):
        cols = pl.ds(j * self.t, self.t)
        return pair[0][(*self.lead, slice(None), cols)], pair[1][(*self.lead, cols, slice(None))]

    def set(self, pair, j, values):
        cols = pl.ds(j * self.t, self.t)
        pair[0][(*self.lead, slice(None), cols)] = values[0]
        pair[1][(*self.lead, cols, slice(None))] = values[1]

    def loop(self, count, body, init):
        """`fori_loop` over the tiles, then a barrier (its stores before anyone's later loads)."""
        out = jax.lax.fori_loop(0, count, body, init)
        self.barrier()
        return out


def _barrier(interpret: bool):
    return (lambda: None) if interpret else pltriton.debug_barrier


def load_chunk(i, b, q_ref, k_ref, v_ref, theta_refs, coef_refs):
    """Chunk i's inputs (q, k, v `[b, D]`, theta per layer `[b]`) and coefficients from a program's
    refs (rows `[i*b, (i+1)*b)`); the whole-state kernels of `pallas.py` read them the same way."""
    t = pl.ds(i * b, b)
    c = coef_refs
    coef = Coefficients(
        c.d0[t], c.c[t], c.gamma[t, :], c.d0_end[i], c.c_end[i], c.h0_end[i], c.gamma_end[t], c.mom_end[t]
    )
    return (q_ref[t, :], k_ref[t, :], v_ref[t, :], tuple(r[t] for r in theta_refs)), coef


def store_chunk_cotangents(i, b, qkv_refs, theta_refs, coef_refs, qkv_bar, theta_bar, coef_bar):
    """Chunk i's input cotangents into a program's refs, in `load_chunk`'s layout: q, k, v and theta
    per token; the coefficients per chunk (scalars), per token or per token x b."""
    rows = pl.ds(i * b, b)
    for ref, x in zip(qkv_refs, qkv_bar):
        ref[rows, :] = x
    for ref, x in zip(theta_refs, theta_bar):
        ref[rows] = x
    for ref, x in zip(coef_refs, coef_bar):
        if x.ndim == 0:
            ref[i] = x
        elif x.ndim == 2:
            ref[rows, :] = x
        else:
            ref[rows] = x


def _keys(tiles, anchor, j, k, act, ops):
    """The keys through tile j of the anchor: z1 `[b, t]`, a2 = act(z1), and the anchor's tiles."""
    a1_tile, a2_tile = tiles.get(anchor, j)
    z1 = ops.matmul(k, a1_tile)
    return z1, act(z1), a1_tile, a2_tile


def _tile(tiles, state, j, inputs, coef, delta2, config):
    """Tile j's values of pass 2 (and of the backward's pass A): its state, keys and readout."""
    activation, _, ops = config
    act, act_grad = ACTIVATIONS[activation], derivative(ACTIVATIONS[activation])
    weights, momentum, anchor = state
    q, k, _, (th1, _) = inputs
    z1, a2, a1_tile, a2_tile = _keys(tiles, anchor, j, k, act, ops)
    w, m = tiles.get(weights, j), tiles.get(momentum, j)
    s1 = ops.matmul_nt(delta2, a2_tile)  # [b, t]
    delta1 = s1 * act_grad(z1)
    uw1, us1 = ops.matmul(q, w[0]), ops.matmul(q, m[0])
    # (q . k) theta1 is the same for every tile, yet recomputed here: hoisted out of the tile loop,
    # the [b, b] value stays live across it and the float32 kernels spill (100-160 B per thread).
    zeta1 = readout(coef, uw1, us1, ops.matmul_nt(q, k) * th1[None, :], delta1, ops)
    return dict(w=w, m=m, anchor=(a1_tile, a2_tile), z1=z1, a2=a2, s1=s1, delta1=delta1,
                uw1=uw1, us1=us1, zeta1=zeta1, u2=act(zeta1))


def _forward_passes(tiles, count, state, inputs, coef, config, write=None):
    """Passes 1 and 2 of a chunk from `state`, ((W1, W2), (S1, S2), (A1, A2)) ref pairs.

    `write(j, tile_values, delta2)` runs at the end of each pass-2 step (the forward kernel writes
    the tile's new state there). Returns the chunk's full-width values.
    """
    activation, residual_norm, ops = config
    act = ACTIVATIONS[activation]
    q, k, v, (_, th2) = inputs
    b, D = q.shape

    def pass1(j, z2):
        _, a2, _, a2_tile = _keys(tiles, state[2], j, k, act, ops)
        return z2 + ops.matmul(a2, a2_tile)

    zeros = jnp.zeros((b, D), q.dtype)
    z2 = tiles.loop(count, pass1, zeros)
    delta2 = key_error(z2, k, v, residual_norm, ops)

    def pass2(j, sums):
        p2, uw2, us2 = sums
        x = _tile(tiles, state, j, inputs, coef, delta2, config)
        if write is not None:
            write(j, x, delta2)
        u2, (w2, m2) = x["u2"], (x["w"][1], x["m"][1])
        return p2 + ops.matmul_nt(u2, x["a2"]), uw2 + ops.matmul(u2, w2), us2 + ops.matmul(u2, m2)

    p2, uw2, us2 = tiles.loop(count, pass2, (jnp.zeros((b, b), q.dtype), zeros, zeros))
    zeta2 = readout(coef, uw2, us2, p2 * th2[None, :], delta2, ops)
    return dict(z2=z2, delta2=delta2, p2=p2, uw2=uw2, us2=us2, zeta2=zeta2)


def forward_kernel(*refs, b, n, t, config, save, interpret):
    """Refs as `pallas._forward_kernel` for depth 2: start state (W, S, A pairs), q, k, v, theta (2),
    coefficients (8), completes; outputs y, the final state (its buffers carry the state across
    chunks) and, with `save`, every chunk's start state `[n, in, out]`."""
    (w0, s0, a0, (q_ref, k_ref, v_ref), thetas, coef_refs, (completes,), (y_ref,), *outs) = split_refs(
        refs, [2, 2, 2, 3, 2, 8, 1, 1] + [2] * (6 if save else 3))
    coef_refs = Coefficients(*coef_refs)
    state, saved = tuple(outs[:3]), tuple(outs[3:])
    tiles = _Tiles(t, _barrier(interpret))
    count = w0[0].shape[1] // t
    ops = config[2]

    def copy(j, carry):
        for src, dst in zip((w0, s0, a0), state):
            tiles.set(dst, j, tiles.get(src, j))
        return carry

    tiles.loop(count, copy, 0)

    def chunk(i, carry):
        inputs, coef = load_chunk(i, b, q_ref, k_ref, v_ref, thetas, coef_refs)
        k, (th1, th2) = inputs[1], inputs[3]
        done = completes[i] != 0

        def write(j, x, delta2):
            tiles.barrier()  # every thread has read the tile before any thread overwrites it
            if save:
                for dst, values in zip(saved, (x["w"], x["m"], x["anchor"])):
                    tiles.at(i).set(dst, j, values)
            w1, m1 = end_state(coef, x["w"][0], x["m"][0], k, x["delta1"], th1, ops)
            w2, m2 = end_state(coef, x["w"][1], x["m"][1], x["a2"], delta2, th2, ops)
            tiles.set(state[0], j, (w1, w2))
            tiles.set(state[1], j, (m1, m2))
            tiles.set(state[2], j, (jnp.where(done, w1, x["anchor"][0]), jnp.where(done, w2, x["anchor"][1])))

        full = _forward_passes(tiles, count, state, inputs, coef, config, write)
        y_ref[pl.ds(i * b, b), :] = memory_output(inputs[0], full["zeta2"], config[1], ops).astype(y_ref.dtype)
        return carry

    jax.lax.fori_loop(0, n, chunk, 0)


def backward_kernel(*refs, b, n, t, config, interpret):
    """Refs as `pallas._backward_kernel` for depth 2: chunk-start states (W, S, A pairs) `[n, in,
    out]`, q, k, v, theta (2), coefficients (8), completes, y_bar, the final state's cotangent (3
    pairs); outputs the cotangents of q, k, v, theta (2), the coefficients (8), the start state (3
    pairs; its buffers carry the cotangent across chunks) and a scratch `[2, b, h]`."""
    (sw, ss, sa, (q_ref, k_ref, v_ref), thetas, coef_refs, (completes,), (y_bar_ref,), wb0, mb0, ab0,
     qkv_bar, theta_bar_refs, coef_bar_refs, wb, mb, ab, (scratch,)) = split_refs(
        refs, [2, 2, 2, 3, 2, 8, 1, 1, 2, 2, 2, 3, 2, 8, 2, 2, 2, 1])
    coef_refs = Coefficients(*coef_refs)
    activation, residual_norm, ops = config
    act_grad = derivative(ACTIVATIONS[activation])
    tiles = _Tiles(t, _barrier(interpret))
    count = sw[0].shape[2] // t
    rows_sum = lambda x: jnp.sum(x, axis=-1)  # [b, x] -> [b]
    total = lambda x: jnp.sum(jnp.sum(x, axis=-1), axis=-1)  # nested: Triton has no 2-axis sum

    def copy(j, carry):
        for src, dst in zip((wb0, mb0, ab0), (wb, mb, ab)):
            tiles.set(dst, j, tiles.get(src, j))
        return carry

    tiles.loop(count, copy, 0)

    def chunk(jj, carry):
        i = n - 1 - jj
        rows = pl.ds(i * b, b)
        inputs, coef = load_chunk(i, b, q_ref, k_ref, v_ref, thetas, coef_refs)
        q, k, v, (th1, th2) = inputs
        done = completes[i] != 0
        start, saved = (sw, ss, sa), tiles.at(i)  # the chunk's start state, read at chunk i
        full = _forward_passes(saved, count, start, inputs, coef, config)
        delta2, p2 = full["delta2"], full["p2"]
        _, out_vjp = jax.vjp(lambda zz, qq: memory_output(qq, zz, residual_norm, ops), full["zeta2"], q)
        zeta2_bar, q_bar = out_vjp(y_bar_ref[rows, :].astype(q.dtype))

        # Layer 2's readout: zeta2 = d0 (u2 W2) + c (u2 S2) - (P2 * G * theta2) delta2.
        zd2, zc2 = coef.d0[:, None] * zeta2_bar, coef.c[:, None] * zeta2_bar
        scores_bar2 = -ops.matmul_nt(zeta2_bar, delta2)  # [b, b]
        pm2 = scores_bar2 * p2
        p2_bar = scores_bar2 * coef.gamma * th2[None, :]
        sc1 = ops.matmul_nt(q, k) * coef.gamma * th1[None, :]  # layer 1's P1 * G * theta1
        ge1, gm1 = (coef.gamma_end * th1)[:, None], (coef.mom_end * th1)[:, None]
        ge2, gm2 = (coef.gamma_end * th2)[:, None], (coef.mom_end * th2)[:, None]
        bD, bb, vb = jnp.zeros_like(q), jnp.zeros((b, b), q.dtype), jnp.zeros((b,), q.dtype)
        s0 = jnp.zeros((), q.dtype)

        def pass_a(j, sums):
            (delta2_bar, u1_bar, a1_bar, scores_bar1, cw1, cm1, cw2, cm2, d0_bar, c_bar,
             d0e_bar, ce_bar, h0e_bar) = sums
            x = _tile(saved, start, j, inputs, coef, delta2, config)
            (w1, w2), (m1, m2), (an1, an2) = x["w"], x["m"], x["anchor"]
            a2, delta1, u2 = x["a2"], x["delta1"], x["u2"]
            wbt, mbt, abt = tiles.get(wb, j), tiles.get(mb, j), tiles.get(ab, j)
            tiles.barrier()  # every thread has read the tile before any thread overwrites it
            # new_anchor = where(done, new_weights, anchor)
            wb1, wb2 = (wbt[0] + jnp.where(done, abt[0], 0.0), wbt[1] + jnp.where(done, abt[1], 0.0))
            mb1, mb2 = mbt
            an_bar1, an_bar2 = jnp.where(done, 0.0, abt[0]), jnp.where(done, 0.0, abt[1])
            # The chunk-end state: W' = d0e W + ce S - a^T diag(G_b theta) delta, S' = h0e S - ...
            d0e_bar += total(wb1 * w1) + total(wb2 * w2)
            ce_bar += total(wb1 * m1) + total(wb2 * m2)
            h0e_bar += total(mb1 * m1) + total(mb2 * m2)
            a_wb1, a_mb1 = ops.matmul(k, wb1), ops.matmul(k, mb1)  # [b, t]
            a1_bar -= ge1 * ops.matmul_nt(delta1, wb1) + gm1 * ops.matmul_nt(delta1, mb1)
            delta1_bar = -(ge1 * a_wb1 + gm1 * a_mb1)
            cw1 -= rows_sum(a_wb1 * delta1)
            cm1 -= rows_sum(a_mb1 * delta1)
            a_wb2, a_mb2 = ops.matmul(a2, wb2), ops.matmul(a2, mb2)  # [b, D], summed over tiles
            delta2_bar -= ge2 * a_wb2 + gm2 * a_mb2
            cw2 -= rows_sum(a_wb2 * delta2)
            cm2 -= rows_sum(a_mb2 * delta2)
            a2_bar = -(ge2 * ops.matmul_nt(delta2, wb2) + gm2 * ops.matmul_nt(delta2, mb2))
            # Layer 2's readout, the tile's share.
            w_bar2 = coef.d0_end * wb2 + ops.matmul_tn(u2, zd2)
            m_bar2 = coef.c_end * wb2 + coef.h0_end * mb2 + ops.matmul_tn(u2, zc2)
            u2_bar = ops.matmul_nt(zd2, w2) + ops.matmul_nt(zc2, m2) + ops.matmul(p2_bar, a2)
            a2_bar += ops.matmul_tn(p2_bar, u2)
            # Layer 1's readout: zeta1 = d0 (q W1) + c (q S1) - (P1 * G * theta1) delta1.
            zeta1_bar = u2_bar * act_grad(x["zeta1"])
            d0_bar += rows_sum(zeta1_bar * x["uw1"])
            c_bar += rows_sum(zeta1_bar * x["us1"])
            zd1, zc1 = coef.d0[:, None] * zeta1_bar, coef.c[:, None] * zeta1_bar
            w_bar1 = coef.d0_end * wb1 + ops.matmul_tn(q, zd1)
            m_bar1 = coef.c_end * wb1 + coef.h0_end * mb1 + ops.matmul_tn(q, zc1)
            u1_bar += ops.matmul_nt(zd1, w1) + ops.matmul_nt(zc1, m1)
            scores_bar1 -= ops.matmul_nt(zeta1_bar, delta1)
            delta1_bar -= ops.matmul_tn(sc1, zeta1_bar)
            # Keys, second order: delta1 = s1 * act'(z1), s1 = delta2 A2^T.
            _, chain_vjp = jax.vjp(lambda s, z: s * act_grad(z), x["s1"], x["z1"])
            s1_bar, z1_bar = chain_vjp(delta1_bar)
            delta2_bar += ops.matmul(s1_bar, an2)
            tiles.set(wb, j, (w_bar1, w_bar2))
            tiles.set(mb, j, (m_bar1, m_bar2))
            tiles.set(ab, j, (an_bar1, an_bar2 + ops.matmul_tn(s1_bar, delta2)))
            cols = pl.ds(j * t, t)
            scratch[0, :, cols] = a2_bar
            scratch[1, :, cols] = z1_bar
            return (delta2_bar, u1_bar, a1_bar, scores_bar1, cw1, cm1, cw2, cm2, d0_bar, c_bar,
                    d0e_bar, ce_bar, h0e_bar)

        d0_bar, c_bar = rows_sum(zeta2_bar * full["uw2"]), rows_sum(zeta2_bar * full["us2"])
        init = (-ops.matmul_tn(p2 * coef.gamma * th2[None, :], zeta2_bar), bD, bD, bb, vb, vb, vb, vb,
                d0_bar, c_bar, s0, s0, s0)
        (delta2_bar, u1_bar, a1_bar, scores_bar1, cw1, cm1, cw2, cm2, d0_bar, c_bar,
         d0e_bar, ce_bar, h0e_bar) = tiles.loop(count, pass_a, init)

        # The rest of layer 1's readout terms, which need the whole score cotangent.
        p1 = ops.matmul_nt(q, k)
        pm1 = scores_bar1 * p1
        p1_bar = scores_bar1 * coef.gamma * th1[None, :]
        u1_bar += ops.matmul(p1_bar, k)
        a1_bar += ops.matmul_tn(p1_bar, q)
        q_bar += u1_bar
        theta1_bar = cw1 * coef.gamma_end + cm1 * coef.mom_end + jnp.sum(pm1 * coef.gamma, axis=-2)
        theta2_bar = cw2 * coef.gamma_end + cm2 * coef.mom_end + jnp.sum(pm2 * coef.gamma, axis=-2)
        _, error_vjp = jax.vjp(lambda o, kk, vv: key_error(o, kk, vv, residual_norm, ops), full["z2"], k, v)
        z2_bar, k_bar, v_bar = error_vjp(delta2_bar)

        def pass_b(j, a1_bar):
            # Keys, first order: z1 = k A1, a2 = act(z1), z2 = a2 A2.
            z1, a2, a1_tile, a2_tile = _keys(saved, start[2], j, k, ACTIVATIONS[activation], ops)
            abt = tiles.get(ab, j)
            cols = pl.ds(j * t, t)
            a2_bar = scratch[0, :, cols] + ops.matmul_nt(z2_bar, a2_tile)
            z1_bar = scratch[1, :, cols] + a2_bar * act_grad(z1)
            tiles.barrier()
            tiles.set(ab, j, (abt[0] + ops.matmul_tn(k, z1_bar), abt[1] + ops.matmul_tn(a2, z2_bar)))
            return a1_bar + ops.matmul_nt(z1_bar, a1_tile)

        a1_bar = tiles.loop(count, pass_b, a1_bar)
        coef_bar = Coefficients(
            d0_bar, c_bar, pm1 * th1[None, :] + pm2 * th2[None, :], d0e_bar, ce_bar, h0e_bar,
            cw1 * th1 + cw2 * th2, cm1 * th1 + cm2 * th2)
        store_chunk_cotangents(i, b, qkv_bar, theta_bar_refs, coef_bar_refs, (q_bar, k_bar + a1_bar, v_bar),
                               (theta1_bar, theta2_bar), coef_bar)
        return carry

    jax.lax.fori_loop(0, n, chunk, 0)
