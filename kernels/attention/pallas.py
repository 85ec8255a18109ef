"""Sliding-window flash attention in Pallas (Triton on NVIDIA): the window part of
`sliding_window_attention`, forward and backward, never materialising a logit matrix in HBM.

One program per (batch row, head, query block) runs the online softmax over the key blocks its
window can reach (about `(window + block) / block` of them), so the work is O(T * (w + block)).
The kernel returns the output and the log-sum-exp of every query row; `api.py` merges the
persistent slots (a handful of keys every query sees) in XLA through that log-sum-exp, which is
why a cuDNN window kernel, which returns no log-sum-exp, could not serve here.

Backward (`jax.custom_vjp`): with `delta_i = sum_d dO_i O_i - dlse_i`, `dS = P * (dP - delta)`:
one kernel per query block for dq (the forward's key loop), one per key block for dk and dv (a
loop over the query blocks whose window covers it). The cotangent of the log-sum-exp enters
through `delta` only (d lse_i / d s_ij = P_ij), so the XLA merge differentiates exactly.

Tiles are `[block, head_dim]`; Triton's dots need powers of two >= 16 for both (`supported`).
Float32 inputs multiply at full precision (the same numbers as the XLA paths); bf16 inputs use
the tensor cores with float32 accumulation, softmax statistics in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from titans.kernels.attention.blockwise import MASKED

NUM_WARPS = 8
NUM_STAGES = 2
# The largest query/key tile each kernel compiles without spilling at 8 warps, by input itemsize
# (head dim 64; BENCHMARKS.md "Compile proof"): bf16 [64, 64] tiles, float32 [32, 64]. A larger
# `block` (the presets ask 128-256, which suit XLA's blockwise impl) is run as these tiles: the
# block is only a tile size here, the result is the same up to summation order.
MAX_BLOCK = {2: 64, 4: 32}


def supported(head_dim: int, block: int) -> str | None:
    """Why the compiled (GPU) kernel cannot run a shape, or None if it can."""
    for name, x in (("head_dim", head_dim), ("block", block)):
        if x < 16 or x & (x - 1):
            return f"{name} is {x}; the Triton kernel needs a power of two >= 16"
    return None


def _dot(a, b, contract):
    """a . b over axes `contract` ((a axis,), (b axis,)) -> float32."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)


_NT = ((1,), (1,))  # a [m, d] . b [n, d] -> [m, n]
_NN = ((1,), (0,))  # a [m, k] . b [k, n]
_TN = ((0,), (0,))  # a [k, m] . b [k, n] -> [m, n]


def _visible(q_block, k_block, *, prefix, window, bq, bk, first):
    """`[bq, bk]` bool: query row r of q_block (key index prefix + q_block*bq + r) sees key c of k_block."""
    q_idx = prefix + q_block * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_idx = k_block * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return (k_idx <= q_idx) & (k_idx > q_idx - window) & (k_idx >= first)


def _key_blocks(q_block, *, prefix, window, bq, bk):
    """The key blocks [lo, hi) that query block `q_block`'s windows reach."""
    lo = jnp.maximum(prefix + q_block * bq - window + 1, 0) // bk
    return lo, (prefix + q_block * bq + bq - 1) // bk + 1


def _scores(q, k, qi, kb, first_ref, scale, geometry):
    """Scaled logits of query block qi against key block kb, masked: `[bq, bk]` float32, and the mask."""
    ok = _visible(qi, kb, first=first_ref[0], **geometry)
    return jnp.where(ok, _dot(q, k, _NT) * scale, MASKED), ok


def _forward_kernel(first_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, geometry):
    bq, bk = geometry["bq"], geometry["bk"]
    qi = pl.program_id(2)
    q = q_ref[...]
    lo, hi = _key_blocks(qi, **geometry)

    def body(kb, carry):
        m, l, acc = carry
        keys = pl.ds(kb * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s, ok = _scores(q, k, qi, kb, first_ref, scale, geometry)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        rescale = jnp.exp(m - m_new)
        return m_new, l * rescale + jnp.sum(p, axis=1), acc * rescale[:, None] + _dot(p.astype(v.dtype), v, _NN)

    init = (jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(first_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, geometry):
    bk = geometry["bk"]
    qi = pl.program_id(2)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    lo, hi = _key_blocks(qi, **geometry)

    def body(kb, dq):
        keys = pl.ds(kb * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s, ok = _scores(q, k, qi, kb, first_ref, scale, geometry)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, _NT) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, _NN)

    dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(first_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, geometry,
                q_blocks):
    bq, bk, prefix, window = geometry["bq"], geometry["bk"], geometry["prefix"], geometry["window"]
    kb = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    # Query rows r see this block's keys when prefix + r lies in [kb*bk, kb*bk + bk - 1 + window - 1].
    lo = jnp.maximum(kb * bk - prefix, 0) // bq
    hi = jnp.clip((kb * bk + bk + window - 2 - prefix) // bq + 1, lo, q_blocks)

    def body(qi, carry):
        dk, dv = carry
        rows = pl.ds(qi * bq, bq)
        q, do, lse, delta = q_ref[rows, :], do_ref[rows, :], lse_ref[rows], delta_ref[rows]
        s, ok = _scores(q, k, qi, kb, first_ref, scale, geometry)
        p = jnp.where(ok, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
        dv = dv + _dot(p.astype(do.dtype), do, _TN)
        ds = p * (_dot(do, v, _NT) - delta[:, None])
        return dk + _dot(ds.astype(q.dtype), q, _TN), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _tile(shape, block):
    """Grid (B, H, i) reads rows [i*block, (i+1)*block) of head h of `[B, T, H, D]`."""
    return pl.BlockSpec((None, block, None, shape[3]), lambda b, h, i: (b, i, h, 0))


def _whole(shape):
    """Grid (B, H, i) reads all rows of head h of `[B, T, H, D]` (sliced in the kernel)."""
    return pl.BlockSpec((None, shape[1], None, shape[3]), lambda b, h, i: (b, 0, h, 0))


def _row_tile(block):
    return pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))


def _row_whole(length):
    return pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))


_FIRST = pl.BlockSpec((1,), lambda b, h, i: (0,))


def _call(kernel, grid, in_specs, out_shape, out_specs, interpret, name, *args):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret, name=name,
    )(*args)


def _forward(q, k, v, first, static):
    block, prefix, window, interpret = static
    B, P, H, D = q.shape
    geometry = dict(prefix=prefix, window=window, bq=block, bk=block)
    kernel = functools.partial(_forward_kernel, scale=D**-0.5, geometry=geometry)
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, P), jnp.float32))
    return _call(kernel, (B, H, P // block), [_FIRST, _tile(q.shape, block), _whole(k.shape), _whole(v.shape)],
                 out_shape, (_tile(q.shape, block), _row_tile(block)), interpret, "titans_swa_forward", first, q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def window_attention(q, k, v, first, static):
    """Padded inputs: q `[B, P, H, D]` (P a multiple of block), k, v `[B, K, H, D]` (K a multiple of
    block, K >= prefix + P), first `[1]` int32 (the first key index at a position >= 0); static =
    (block, prefix, window, interpret). Returns o `[B, P, H, D]` and lse `[B, H, P]` (float32)."""
    return _forward(q, k, v, first, static)


def _window_attention_fwd(q, k, v, first, static):
    o, lse = _forward(q, k, v, first, static)
    return (o, lse), (q, k, v, first, o, lse)


def _window_attention_bwd(static, residuals, cotangents):
    block, prefix, window, interpret = static
    q, k, v, first, o, lse = residuals
    do, dlse = cotangents
    B, P, H, D = q.shape
    delta = jnp.einsum("bphd,bphd->bhp", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    do = do.astype(q.dtype)
    geometry = dict(prefix=prefix, window=window, bq=block, bk=block)
    scale = D**-0.5
    rows = (_row_tile(block), _row_tile(block))
    dq = _call(functools.partial(_dq_kernel, scale=scale, geometry=geometry), (B, H, P // block),
               [_FIRST, _tile(q.shape, block), _whole(k.shape), _whole(v.shape), _tile(q.shape, block), *rows],
               jax.ShapeDtypeStruct(q.shape, q.dtype), _tile(q.shape, block), interpret, "titans_swa_dq",
               first, q, k, v, do, lse, delta)
    rows = (_row_whole(P), _row_whole(P))
    kernel = functools.partial(_dkv_kernel, scale=scale, geometry=geometry, q_blocks=P // block)
    like = jax.ShapeDtypeStruct(k.shape, k.dtype)
    dk, dv = _call(kernel, (B, H, k.shape[1] // block),
                   [_FIRST, _whole(q.shape), _tile(k.shape, block), _tile(v.shape, block), _whole(q.shape), *rows],
                   (like, like), (_tile(k.shape, block), _tile(v.shape, block)), interpret, "titans_swa_dkv",
                   first, q, k, v, do, lse, delta)
    return dq, dk, dv, np.zeros(first.shape, jax.dtypes.float0)


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


def sliding_window_attention_pallas(q, k, v, *, window: int, start, persistent=None, aligned_kv=None,
                                    block: int = 64, interpret: bool = False):
    """q `[B, P, H, D]`, k, v `[B, S + P, H, D]` (S <= window - 1 cached keys first), persistent
    `(k_p, v_p)` `[N, H, D]`, aligned_kv `(k2, v2)` like k, v -> `[B, P, H, D]`. The kernel runs the
    window part of each key stream; the parts and the slots are merged here through their
    log-sum-exps: `o = sum_s exp(lse_s - L) o_s` with `L = logsumexp_s lse_s`."""
    B, P, H, D = q.shape
    if not interpret:
        block = min(block, MAX_BLOCK.get(jnp.dtype(q.dtype).itemsize, min(MAX_BLOCK.values())))
    prefix = k.shape[1] - P
    P_pad = -(-P // block) * block
    K_pad = -(-(prefix + P_pad) // block) * block
    rows = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    first = jnp.maximum(prefix - jnp.asarray(start, jnp.int32), 0).reshape(1)
    parts = []  # (o [B, P, H, D] float32, lse [B, P, H])
    for keys, values in [(k, v)] if aligned_kv is None else [(k, v), aligned_kv]:
        o, lse = window_attention(rows(q, P_pad), rows(keys, K_pad), rows(values, K_pad), first,
                                  (block, prefix, window, bool(interpret)))
        parts.append((o[:, :P].astype(jnp.float32), jnp.moveaxis(lse[:, :, :P], 1, 2)))
    if persistent is not None and persistent[0].shape[0]:
        k_p, v_p = (x.astype(q.dtype) for x in persistent)
        slots = jnp.einsum("bphd,nhd->bphn", q, k_p, preferred_element_type=jnp.float32) * D**-0.5
        lse_p = jax.nn.logsumexp(slots, axis=-1)
        parts.append((jnp.einsum("bphn,nhd->bphd", jnp.exp(slots - lse_p[..., None]).astype(v_p.dtype), v_p,
                                 preferred_element_type=jnp.float32), lse_p))
    if len(parts) == 1:
        return parts[0][0].astype(q.dtype)
    total = jax.nn.logsumexp(jnp.stack([lse for _, lse in parts]), axis=0)
    return sum(jnp.exp(lse - total)[..., None] * o for o, lse in parts).astype(q.dtype)
