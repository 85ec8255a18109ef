"""One query per row against ring-buffer key/value caches: the decode step of the attention.

A decode step attends from one token to the cached keys of its window (its own among them) and
the persistent slots. The caches are head-major, `[batch, heads, S, dim]`, so both products of the step
(`q . k` over the slots, `probs . v`) are batched over (batch, heads) with the operands read as
stored: with the `[batch, S, heads, dim]` layout of the sequence kernels, XLA:CPU transposes the
whole cache every step. Which slot holds which position is the caller's business (`valid`), so
the slots may be in any order (a ring written in place).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from titans.kernels.attention.blockwise import MASKED


def decode_attention(q: jax.Array, caches: list[tuple[jax.Array, jax.Array]], valid: jax.Array,
                     persistent: tuple[jax.Array, jax.Array] | None = None,
                     current: list[tuple[jax.Array, jax.Array]] | None = None) -> jax.Array:
    """q `[batch, heads, dim]`, one query per row -> `[batch, heads, dim]`.

    caches: key/value streams `(k, v)`, each `[batch, heads, S, dim]`; valid `[batch, S]` or `[S]`
    bool: the slots the query sees, the same in every stream; current: the query's own key and
    value `[batch, heads, dim]` in each stream, when the caches do not hold them (read the ring
    before writing this token's slot: the write then has no reader but the next step, and XLA:CPU
    does it in place instead of copying the ring); persistent `(k_p, v_p)` `[N, heads, dim]`, seen
    by every query. One softmax over the slots, every stream and the current keys (as
    `blockwise.attend` does for MAC's aligned streams). Logits and softmax in float32.
    """
    f32, scale = jnp.float32, 1.0 / math.sqrt(q.shape[-1])
    logits, readers = [], []
    if persistent is not None and persistent[0].shape[0]:
        k_p, v_p = (p.astype(q.dtype) for p in persistent)
        logits.append(jnp.einsum("bhd,nhd->bhn", q, k_p, preferred_element_type=f32) * scale)
        readers.append(lambda p, v_p=v_p: jnp.einsum("bhn,nhd->bhd", p.astype(v_p.dtype), v_p, preferred_element_type=f32))
    mask = jnp.broadcast_to(valid, (q.shape[0], valid.shape[-1]))[:, None, :]
    for k, v in caches:
        logits.append(jnp.where(mask, jnp.einsum("bhd,bhsd->bhs", q, k, preferred_element_type=f32) * scale, MASKED))
        readers.append(lambda p, v=v: jnp.einsum("bhs,bhsd->bhd", p.astype(v.dtype), v, preferred_element_type=f32))
    for k, v in current or ():
        logits.append(jnp.einsum("bhd,bhd->bh", q, k, preferred_element_type=f32)[..., None] * scale)
        readers.append(lambda p, v=v: p.astype(f32) * v.astype(f32))
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    out, begin = 0.0, 0
    for part, read in zip(logits, readers):
        out = out + read(probs[..., begin : begin + part.shape[-1]])
        begin += part.shape[-1]
    return out.astype(q.dtype)
