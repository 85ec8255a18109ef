"""Causal sliding-window attention with RoPE and persistent memory slots (spec section 4).

The query at absolute position `p` sees the keys at `p - window + 1 .. p` (itself included) and
all `N_p` persistent key/value slots of its layer (learned, no RoPE), computed by
`kernels.attention.sliding_window_attention` (blockwise XLA, or the Pallas flash kernel on GPU).
Streaming carries the last `w` keys/values (`AttentionCache`), a fixed size, in a ring: a one-token
step (decode) attends to the ring and its own key (`kernels.attention.decode_attention`), then
writes its slot in place; a longer piece unrolls the ring, oldest first, for the sequence kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.kernels.attention import decode_attention, sliding_window_attention
from titans.layers import dense
from titans.sharding import sharded_init

# RoPE angles are taken as (p // _ROPE_SPLIT) * (_ROPE_SPLIT * f mod 2 pi) + (p % _ROPE_SPLIT) * f:
# in float32, p * f at p ~ 2M has an absolute error of ~0.1 rad; the split keeps it ~1e-3 rad.
_ROPE_SPLIT = 4096


class AttentionCache(NamedTuple):
    """Post-RoPE keys and values of the last `S` tokens, `[batch, heads, S, dim]`, in a ring: the token
    at absolute position p sits in slot `p % S`.

    A decode step writes its token's slot first and then attends to the whole ring: the write is a
    `dynamic_update_slice` that XLA does in place on the loop-carried buffer (were the old ring read
    after it, XLA would copy the ring every step to keep it; hence `S` is the full window, not the
    `window - 1` keys before a query). Heads come first so that the step's batched products read the
    ring as stored (no per-step transpose).
    """

    k: jax.Array
    v: jax.Array


def ring_positions(position, size: int) -> jax.Array:
    """The absolute position each slot of a ring of `size` holds once the token at `position` is
    written (int32 `[size]`): the latest p <= position with p % size == slot; negative if never written."""
    return position - jnp.mod(position - jnp.arange(size, dtype=jnp.int32), size)


def ring_seen(position, size: int, first) -> jax.Array:
    """The slots `[size]` bool that the token at `position` sees in a ring of its predecessors (before
    its own write): written, within its window of `size` (its own slot holds position - size) and
    at positions >= `first`."""
    held = ring_positions(position - 1, size)
    return (held > position - size) & (held >= first)


def unroll(cache: AttentionCache, position) -> tuple[jax.Array, jax.Array]:
    """The ring before the token at `position` as keys, values `[batch, S, heads, dim]`, oldest first
    (positions `position - S .. position - 1`), the layout of `sliding_window_attention`."""
    shift = -jnp.mod(position, cache.k.shape[2])
    return tuple(jnp.roll(x, shift, axis=2).transpose(0, 2, 1, 3) for x in cache)


def roll_up(k: jax.Array, v: jax.Array, position) -> AttentionCache:
    """keys, values `[batch, S, heads, dim]` of positions `position - S .. position - 1` (oldest first)
    -> the ring (`unroll`'s inverse)."""
    shift = jnp.mod(position, k.shape[1])
    return AttentionCache(*(jnp.roll(x.transpose(0, 2, 1, 3), shift, axis=2) for x in (k, v)))


def write_slot(cache: AttentionCache, k: jax.Array, v: jax.Array, position) -> AttentionCache:
    """The ring with the key, value `[batch, heads, dim]` of the token at `position` written in its slot."""
    slot = jnp.mod(position, cache.k.shape[2])
    return AttentionCache(*(jax.lax.dynamic_update_slice_in_dim(c, u[:, :, None].astype(c.dtype), slot, axis=2)
                            for c, u in zip(cache, (k, v))))


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


def persistent_slots(n: int, heads: int, dim: int, param_dtype, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """Learned persistent keys and values `[n, heads, dim]`, unit normal like the projected keys;
    (None, None) for n = 0 (a checkpoint cannot hold an empty array)."""
    if n == 0:
        return None, None
    init = sharded_init(nnx.initializers.normal(1.0), None, "heads", None)
    return (nnx.Param(init(rngs.params(), (n, heads, dim), param_dtype)),
            nnx.Param(init(rngs.params(), (n, heads, dim), param_dtype)))


def persistent_values(keys: nnx.Param | None, values: nnx.Param | None) -> tuple[jax.Array, jax.Array] | None:
    """The attention kernels' `persistent` argument from `persistent_slots`' parameters."""
    return None if keys is None else (keys[...], values[...])


class SlidingWindowAttention(nnx.Module):
    """Multi-head causal sliding-window attention with RoPE and persistent slots.

    `heads(x, cache, start)` returns the merged head outputs `[batch, seq, heads*dim]` before the
    output projection (MAG gates them); `__call__` applies the projection.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        width, dtype, pdtype = cfg.attn_width, cfg.jnp_dtype, cfg.jnp_param_dtype
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.q_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.k_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.v_proj = dense(cfg.d_model, width, ("embed", "heads"), **kw)
        self.out_proj = dense(width, cfg.d_model, ("heads", "embed"), **kw)
        self.persistent_k, self.persistent_v = persistent_slots(cfg.n_persistent, cfg.attn_heads, cfg.attn_dim,
                                                                pdtype, rngs)

    def init_state(self, batch_size: int) -> AttentionCache:
        cfg = self.cfg
        zeros = jnp.zeros((batch_size, cfg.attn_heads, cfg.window, cfg.attn_dim), cfg.jnp_dtype)
        return AttentionCache(zeros, zeros)

    def heads(self, x: jax.Array, cache: AttentionCache | None, start) -> tuple[jax.Array, AttentionCache]:
        """x `[batch, seq, d_model]` at positions `start ..` -> (`[batch, seq, heads*dim]`, new cache).

        `cache=None` is a sequence start: no keys before x (cheaper than an all-masked cache).
        """
        cfg = self.cfg
        batch, length, _ = x.shape
        split = lambda u: u.reshape(batch, length, cfg.attn_heads, cfg.attn_dim)
        cos, sin = rope_angles(start + jnp.arange(length), cfg.attn_dim, cfg.rope_base)
        q = apply_rope(split(self.q_proj(x)), cos, sin)
        k = apply_rope(split(self.k_proj(x)), cos, sin)
        v = split(self.v_proj(x))
        persistent = persistent_values(self.persistent_k, self.persistent_v)
        fresh = cache is None
        if fresh:
            cache = self.init_state(batch)
        if length == 1 and not fresh:  # decode: attend to the ring and this token, then write its slot
            out = decode_attention(q[:, 0], [tuple(cache)], ring_seen(start, cfg.window, 0), persistent,
                                   current=[(k[:, 0], v[:, 0])])
            return out.reshape(batch, length, cfg.attn_width), write_slot(cache, k[:, 0], v[:, 0], start)
        # The ring holds the `window` tokens before x; the query at `start` sees the last window - 1.
        past_k, past_v = (u[:, 1:] for u in unroll(cache, start))
        full_k, full_v = jnp.concatenate([past_k, k], axis=1), jnp.concatenate([past_v, v], axis=1)
        keys, values = (k, v) if fresh else (full_k, full_v)
        out = sliding_window_attention(q, keys, values, window=cfg.window, start=start, persistent=persistent,
                                       block=cfg.attn_block, impl=cfg.attn_impl)
        new_cache = roll_up(full_k[:, -cfg.window :], full_v[:, -cfg.window :], start + length)
        return out.reshape(batch, length, cfg.attn_width), new_cache

    def __call__(self, x: jax.Array, cache: AttentionCache | None, start) -> tuple[jax.Array, AttentionCache]:
        out, cache = self.heads(x, cache, start)
        return self.out_proj(out), cache
