"""The oracle of `sliding_window_attention`: every query against every key, one dense mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def window_mask(queries: int, keys: int, *, window: int, start) -> jax.Array:
    """`[queries, keys]` bool: query i (key index `keys - queries + i`, absolute position `start + i`)
    sees key j when `0 <= (keys - queries + i) - j < window` and key j's absolute position is >= 0."""
    prefix = keys - queries
    q_idx = prefix + jnp.arange(queries)[:, None]
    k_idx = jnp.arange(keys)[None, :]
    return (k_idx <= q_idx) & (k_idx > q_idx - window) & (start - prefix + k_idx >= 0)


def sliding_window_attention_reference(q, k, v, *, window: int, start, persistent=None, aligned_kv=None) -> jax.Array:
    """q `[B, P, H, D]`, k, v `[B, S + P, H, D]`, persistent `(k_p, v_p)` `[N, H, D]`, aligned_kv
    `(k2, v2)` like k, v -> `[B, P, H, D]`."""
    f32 = jnp.float32
    mask = window_mask(q.shape[1], k.shape[1], window=window, start=start)
    if aligned_kv is not None:  # the second stream's keys sit at the same positions: the same mask
        k, v = (jnp.concatenate([a, b], axis=1) for a, b in zip((k, v), aligned_kv))
        mask = jnp.concatenate([mask, mask], axis=1)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=f32) / math.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, -jnp.inf)
    values = v
    if persistent is not None:
        k_p, v_p = persistent
        slots = jnp.einsum("bqhd,nhd->bhqn", q, k_p.astype(q.dtype), preferred_element_type=f32) / math.sqrt(q.shape[-1])
        logits = jnp.concatenate([slots, logits], axis=-1)
        values = jnp.concatenate([jnp.broadcast_to(v_p.astype(v.dtype), (v.shape[0], *v_p.shape)), v], axis=1)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, values.astype(f32)).astype(q.dtype)
