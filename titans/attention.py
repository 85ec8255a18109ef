"""Causal sliding-window attention with RoPE and persistent memory slots (spec section 4).

The query at absolute position `p` sees the keys at `p - window + 1 .. p` (itself included) and
all `N_p` persistent key/value slots of its layer (learned, no RoPE). `sliding_window_attention`
computes that blockwise: queries in blocks of `block`, each block against the `ceil((w-1)/block) + 1`
key blocks that can hold its window, so time and memory are O(T * (w + block)), never T x T.
Streaming carries the last `w - 1` keys/values (`AttentionCache`), a fixed size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.layers import dense
from titans.sharding import sharded_init

# Masked logits: finite, so a row whose keys are all masked (padding) gives no NaN.
_MASKED = -1e30
# RoPE angles are taken as (p // _ROPE_SPLIT) * (_ROPE_SPLIT * f mod 2 pi) + (p % _ROPE_SPLIT) * f:
# in float32, p * f at p ~ 2M has an absolute error of ~0.1 rad; the split keeps it ~1e-3 rad.
_ROPE_SPLIT = 4096


class AttentionCache(NamedTuple):
    """Post-RoPE keys and values of the last `window - 1` tokens, oldest first, `[batch, window-1, heads, dim]`."""

    k: jax.Array
    v: jax.Array


def rope_angles(positions: jax.Array, dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[len(positions), dim // 2]` (float32) of the rotary angles `p * base^(-2i/dim)`."""
    half = dim // 2
    freq = base ** (-np.arange(half, dtype=np.float64) / half)
    coarse = np.mod(_ROPE_SPLIT * freq, 2 * np.pi).astype(np.float32)
    positions = jnp.asarray(positions, jnp.int32)
    hi = (positions // _ROPE_SPLIT).astype(jnp.float32)[:, None]
    lo = (positions % _ROPE_SPLIT).astype(jnp.float32)[:, None]
    angles = jnp.mod(hi * coarse, 2 * np.pi) + lo * freq.astype(np.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x `[batch, seq, heads, dim]` by angles `[seq, dim // 2]` (rotate-half pairing)."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
           persistent: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Softmax attention of q `[..., Q, H, D]` over k, v `[..., K, H, D]` where `valid [..., Q, K]`,
    plus persistent slots `(k_p, v_p)` `[N, H, D]` that every query sees. Logits and softmax in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    f32 = jnp.float32
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=f32) * scale
    logits = jnp.where(valid[..., None, :, :], logits, _MASKED)
    if persistent is not None and persistent[0].shape[0]:
        k_p, v_p = (p.astype(q.dtype) for p in persistent)
        slots = jnp.einsum("...qhd,nhd->...hqn", q, k_p, preferred_element_type=f32) * scale
        probs = jax.nn.softmax(jnp.concatenate([slots, logits], axis=-1), axis=-1).astype(v.dtype)
        n = slots.shape[-1]
        return (jnp.einsum("...hqn,nhd->...qhd", probs[..., :n], v_p, preferred_element_type=f32)
                + jnp.einsum("...hqk,...khd->...qhd", probs[..., n:], v, preferred_element_type=f32)).astype(q.dtype)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v, preferred_element_type=f32).astype(q.dtype)


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, start,
                             persistent: tuple[jax.Array, jax.Array] | None = None,
                             block: int = 128) -> jax.Array:
    """Causal sliding-window attention, blockwise.

    q: `[batch, P, heads, dim]`, the queries at absolute positions `start .. start + P - 1`.
    k, v: `[batch, S + P, heads, dim]`: the keys of the `S <= window - 1` tokens before q's first
    (a streaming cache; `S = 0` at a sequence start), then q's own. Keys at negative absolute
    positions (an unfilled cache) are masked. `start` may be traced. Returns `[batch, P, heads, dim]`.
    """
    batch, length, heads, dim = q.shape
    prefix = k.shape[1] - length
    if not 0 <= prefix <= window - 1:
        raise ValueError(f"keys hold {prefix} tokens before the queries, expected 0 .. window - 1 = {window - 1}")
    if length <= block:
        # One block: every query against every key (decode and short pieces).
        rel = jnp.arange(prefix + length)[None, :] - (prefix + jnp.arange(length))[:, None]
        valid = (rel <= 0) & (rel > -window) & ((start - prefix + jnp.arange(prefix + length)) >= 0)[None, :]
        return attend(q, k, v, valid, persistent)

    n_blocks = -(-length // block)
    lookback = -(-(window - 1) // block)  # key blocks before a query block that its window can reach
    lead = lookback * block - prefix
    pad = ((0, 0), (lead, n_blocks * block - length), (0, 0), (0, 0))
    k_blocks = jnp.pad(k, pad).reshape(batch, lookback + n_blocks, block, heads, dim)
    v_blocks = jnp.pad(v, pad).reshape(batch, lookback + n_blocks, block, heads, dim)
    # Query block b sees key blocks b .. b + lookback of the padded keys: [batch, n_blocks, (lookback+1)*block, ...].
    window_of = lambda blocks: jnp.concatenate([blocks[:, j : j + n_blocks] for j in range(lookback + 1)], axis=2)
    q_blocks = jnp.pad(q, ((0, 0), (0, n_blocks * block - length), (0, 0), (0, 0)))
    q_blocks = q_blocks.reshape(batch, n_blocks, block, heads, dim)

    # Padded index of query (b, r) is lookback*block + b*block + r, of key (b, s) is b*block + s.
    r = jnp.arange(block)[:, None]
    s = jnp.arange((lookback + 1) * block)[None, :]
    rel = s - lookback * block - r
    key_pos = start - lookback * block + (jnp.arange(n_blocks) * block)[:, None, None] + s[None]
    valid = ((rel <= 0) & (rel > -window))[None] & (key_pos >= 0)
    out = attend(q_blocks, window_of(k_blocks), window_of(v_blocks), valid, persistent)
    return out.reshape(batch, n_blocks * block, heads, dim)[:, :length]


def persistent_slots(n: int, heads: int, dim: int, param_dtype, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """Learned persistent keys and values `[n, heads, dim]`, unit normal like the projected keys."""
    init = sharded_init(nnx.initializers.normal(1.0), None, "heads", None)
    return (nnx.Param(init(rngs.params(), (n, heads, dim), param_dtype)),
            nnx.Param(init(rngs.params(), (n, heads, dim), param_dtype)))


class SlidingWindowAttention(nnx.Module):
    """Multi-head causal sliding-window attention with RoPE and persistent slots.

    `heads(x, cache, start)` returns the merged head outputs `[batch, seq, heads*dim]` before the
    output projection (MAG gates them); `__call__` applies the projection.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        width, dtype, pdtype = cfg.attn_width, cfg.compute_dtype, cfg.params_dtype
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.q_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.k_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.v_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.out_proj = dense(width, cfg.d_model, ("heads", "embed"), **kw)
        self.persistent_k, self.persistent_v = persistent_slots(cfg.n_persistent, cfg.attn_heads, cfg.head_dim,
                                                                pdtype, rngs)

    def init_state(self, batch_size: int) -> AttentionCache:
        cfg = self.cfg
        zeros = jnp.zeros((batch_size, cfg.window - 1, cfg.attn_heads, cfg.head_dim), cfg.compute_dtype)
        return AttentionCache(zeros, zeros)

    def heads(self, x: jax.Array, cache: AttentionCache | None, start) -> tuple[jax.Array, AttentionCache]:
        """x `[batch, seq, d_model]` at positions `start ..` -> (`[batch, seq, heads*dim]`, new cache).

        `cache=None` is a sequence start: no keys before x (cheaper than an all-masked cache).
        """
        cfg = self.cfg
        batch, length, _ = x.shape
        split = lambda u: u.reshape(batch, length, cfg.attn_heads, cfg.head_dim)
        cos, sin = rope_angles(start + jnp.arange(length), cfg.head_dim, cfg.rope_base)
        q = apply_rope(split(self.q_proj(x)), cos, sin)
        k = apply_rope(split(self.k_proj(x)), cos, sin)
        v = split(self.v_proj(x))
        fresh = cache is None
        if fresh:
            cache = self.init_state(batch)
        full_k, full_v = jnp.concatenate([cache.k, k], axis=1), jnp.concatenate([cache.v, v], axis=1)
        keys, values = (k, v) if fresh else (full_k, full_v)
        out = sliding_window_attention(q, keys, values, window=cfg.window, start=start,
                                       persistent=(self.persistent_k[...], self.persistent_v[...]),
                                       block=cfg.attn_block)
        keep = full_k.shape[1] - (cfg.window - 1)
        new_cache = AttentionCache(full_k[:, keep:], full_v[:, keep:])
        return out.reshape(batch, length, cfg.attn_width), new_cache

    def __call__(self, x: jax.Array, cache: AttentionCache | None, start) -> tuple[jax.Array, AttentionCache]:
        out, cache = self.heads(x, cache, start)
        return self.out_proj(out), cache
