"""Blockwise sliding-window attention in XLA: the portable path (any backend, any shape).

Queries in blocks of `block`, each block against the `ceil((w-1)/block) + 1` key blocks that can
hold its window, so time and memory are O(T * (w + block)), never T x T.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Masked logits: finite, so a row whose keys are all masked (padding) gives no NaN.
MASKED = -1e30


def attend(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
           persistent: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Softmax attention of q `[..., Q, H, D]` over k, v `[..., K, H, D]` where `valid [..., Q, K]`,
    plus persistent slots `(k_p, v_p)` `[N, H, D]` that every query sees. Logits and softmax in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    f32 = jnp.float32
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=f32) * scale
    logits = jnp.where(valid[..., None, :, :], logits, MASKED)
    if persistent is not None and persistent[0].shape[0]:
        k_p, v_p = (p.astype(q.dtype) for p in persistent)
        slots = jnp.einsum("...qhd,nhd->...hqn", q, k_p, preferred_element_type=f32) * scale
        probs = jax.nn.softmax(jnp.concatenate([slots, logits], axis=-1), axis=-1).astype(v.dtype)
        n = slots.shape[-1]
        return (jnp.einsum("...hqn,nhd->...qhd", probs[..., :n], v_p, preferred_element_type=f32)
                + jnp.einsum("...hqk,...khd->...qhd", probs[..., n:], v, preferred_element_type=f32)).astype(q.dtype)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v, preferred_element_type=f32).astype(q.dtype)


def sliding_window_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, start,
                                       persistent: tuple[jax.Array, jax.Array] | None = None,
                                       aligned_kv: tuple[jax.Array, jax.Array] | None = None,
                                       block: int = 128) -> jax.Array:
    """Causal sliding-window attention, blockwise (shapes and mask: `api.sliding_window_attention`)."""
    batch, length, heads, dim = q.shape
    prefix = k.shape[1] - length
    streams = [(k, v)] if aligned_kv is None else [(k, v), tuple(aligned_kv)]

    def joined(keys_of, valid):
        """Every stream's keys and values side by side on the key axis, each under the same mask."""
        k_all = jnp.concatenate([keys_of(ks) for ks, _ in streams], axis=-3)
        v_all = jnp.concatenate([keys_of(vs) for _, vs in streams], axis=-3)
        return k_all, v_all, jnp.concatenate([valid] * len(streams), axis=-1)

    if length <= block:
        # One block: every query against every key (decode and short pieces).
        rel = jnp.arange(prefix + length)[None, :] - (prefix + jnp.arange(length))[:, None]
        valid = (rel <= 0) & (rel > -window) & ((start - prefix + jnp.arange(prefix + length)) >= 0)[None, :]
        k_all, v_all, valid = joined(lambda x: x, valid)
        return attend(q, k_all, v_all, valid, persistent)

    n_blocks = -(-length // block)
    lookback = -(-(window - 1) // block)  # key blocks before a query block that its window can reach
    lead = lookback * block - prefix
    pad = ((0, 0), (lead, n_blocks * block - length), (0, 0), (0, 0))
    # Query block b sees key blocks b .. b + lookback of the padded keys: [batch, n_blocks, (lookback+1)*block, ...].
    def window_of(x):
        blocks = jnp.pad(x, pad).reshape(batch, lookback + n_blocks, block, heads, dim)
        return jnp.concatenate([blocks[:, j : j + n_blocks] for j in range(lookback + 1)], axis=2)

    q_blocks = jnp.pad(q, ((0, 0), (0, n_blocks * block - length), (0, 0), (0, 0)))
    q_blocks = q_blocks.reshape(batch, n_blocks, block, heads, dim)

    # Padded index of query (b, r) is lookback*block + b*block + r, of key (b, s) is b*block + s.
    r = jnp.arange(block)[:, None]
    s = jnp.arange((lookback + 1) * block)[None, :]
    rel = s - lookback * block - r
    key_pos = start - lookback * block + (jnp.arange(n_blocks) * block)[:, None, None] + s[None]
    valid = ((rel <= 0) & (rel > -window))[None] & (key_pos >= 0)
    out = attend(q_blocks, *joined(window_of, valid), persistent)
    return out.reshape(batch, n_blocks * block, heads, dim)[:, :length]
