"""Sampling from a `TitansLM` through its streaming state: prefill the prompt, then one token per step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits `[batch, vocab]` -> token ids `[batch]`: greedy at temperature 0, else nucleus (top-p)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def generate(model, prompt: np.ndarray, max_new_tokens: int, key: jax.Array, *, temperature: float = 0.8,
             top_p: float = 0.95, stop_token: int | None = None, on_token=None,
             prefill_piece: int | None = None) -> np.ndarray:
    """prompt `[batch, n]` int (n >= 1) -> the new tokens `[batch, <= max_new_tokens]`.

    `on_token(ids [batch])` is called after each new token (streaming output); generation stops early
    when every row has produced `stop_token`. `prefill_piece` feeds a long prompt in pieces of that
    many tokens (memory then stays flat at any prompt length; the pieces start at multiples of it,
    so every full piece reuses one compiled step).
    """
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be token ids [batch, n] with n >= 1, got shape {prompt.shape}")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"max_new_tokens and temperature must be >= 0 and top_p in (0, 1], got {max_new_tokens}, "
                         f"{temperature}, {top_p}")
    state = model.init_state(prompt.shape[0])
    piece = prefill_piece or prompt.shape[1]
    for start in range(0, prompt.shape[1], piece):
        logits, state = model.extend(prompt[:, start : start + piece], state)
    last = logits[:, -1]
    out, done = [], np.zeros(prompt.shape[0], bool)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = sample_token(last, sub, temperature, top_p)
        ids = np.asarray(token)
        out.append(ids)
        if on_token is not None:
            on_token(ids)
        if stop_token is not None:
            done |= ids == stop_token
            if done.all():
                break
        logits, state = model.extend(token[:, None], state)
        last = logits[:, -1]
    return np.stack(out, axis=1) if out else np.zeros((prompt.shape[0], 0), np.int32)
