"""`sliding_window_attention`: the one public entry point of the attention op (spec section 4)."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from titans.kernels import platform
from titans.kernels.attention.blockwise import sliding_window_attention_blockwise
from titans.kernels.attention.mosaic import sliding_window_attention_mosaic
from titans.kernels.attention.pallas import sliding_window_attention_pallas, supported
from titans.kernels.attention.reference import sliding_window_attention_reference
from titans.kernels.sharding import over_batch

Impl = Literal["reference", "blockwise", "pallas", "mosaic", "auto"]
IMPLS = ("reference", "blockwise", "pallas", "mosaic", "auto")
MOSAIC_BLOCK = 128  # splash's query and key tiles: TPU's 128 lanes


def _resolve(impl: str, interpret: bool | None, head_dim: int, length: int, block: int) -> tuple[str, bool]:
    """(impl, interpret). `pallas` is the Mosaic kernel on TPU. `auto` -> the Pallas kernel on GPU
    (for shapes it compiles) or TPU, for pieces longer than one block (a decode step or short piece
    is one dense XLA block already), else `blockwise`."""
    backend = platform.backend()
    if impl == "pallas" and backend == "tpu":
        impl = "mosaic"
    if interpret is None:  # interpret exactly where the kernel cannot compile
        interpret = backend != "tpu" if impl == "mosaic" else backend == "cpu"
    interpret = bool(interpret)
    why_not = supported(head_dim, block)
    if impl == "auto":
        if backend == "tpu" and length > MOSAIC_BLOCK:
            return "mosaic", False
        return ("pallas" if backend == "gpu" and why_not is None and length > block else "blockwise"), False
    if impl == "pallas" and not interpret and why_not is not None:
        raise ValueError(f"sliding_window_attention(impl='pallas') cannot compile this shape: {why_not}; "
                         "use impl='blockwise' or 'auto'")
    return impl, interpret


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, start,
                             persistent: tuple[jax.Array, jax.Array] | None = None,
                             aligned_kv: tuple[jax.Array, jax.Array] | None = None, block: int = 128,
                             impl: Impl = "auto", interpret: bool | None = None) -> jax.Array:
    """Causal sliding-window attention with persistent slots.

    q: `[batch, P, heads, dim]`, the queries at absolute positions `start .. start + P - 1`.
    k, v: `[batch, S + P, heads, dim]`: the keys of the `S <= window - 1` tokens before q's first
    (a streaming cache; `S = 0` at a sequence start), then q's own. Query i sees key j when
    `0 <= (S + i) - j < window` and key j's position `start - S + j` is >= 0, plus every
    persistent slot `(k_p, v_p)` `[N, heads, dim]`. `start` may be traced. `aligned_kv = (k2, v2)`,
    shaped like k, v, is a second key/value stream at the same positions: query i sees key j of both
    streams under the same mask, and one softmax runs over both streams and the slots (MAC's segments
    attend so to the memory's retrievals beside the tokens). Returns `[batch, P, heads, dim]`.

    impl: "blockwise" (XLA, O(T * (window + block))), "pallas" (flash kernel, Triton on GPU, the
    Mosaic kernel on TPU; interpret mode on CPU), "mosaic" (JAX's splash attention, Mosaic on TPU;
    interpret mode elsewhere; its tiles are 128 whatever `block`), "reference" (dense T x (S + T)
    mask, the oracle) or "auto" (pallas on GPU where `pallas.supported` and P > block, mosaic on TPU
    where P > 128, else blockwise). block: the query (and, in pallas, key) tile.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if q.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q must be [batch, P, heads, dim] and k, v [batch, S + P, heads, dim], got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    prefix = k.shape[1] - q.shape[1]
    if not 0 <= prefix <= window - 1:
        raise ValueError(f"keys hold {prefix} tokens before the queries, expected 0 .. window - 1 = {window - 1}")
    if aligned_kv is not None and any(x.shape != k.shape for x in aligned_kv):
        raise ValueError(f"aligned_kv must be shaped like k, v {k.shape}, got {[x.shape for x in aligned_kv]}")
    impl, interpret = _resolve(impl, interpret, q.shape[-1], q.shape[1], block)
    kernels = {"pallas": (sliding_window_attention_pallas, block), "mosaic": (sliding_window_attention_mosaic, MOSAIC_BLOCK)}
    if impl in kernels:
        fn = functools.partial(kernels[impl][0], window=window, block=kernels[impl][1], interpret=interpret)
        kernel = lambda q, k, v, start, persistent, aligned_kv: fn(q, k, v, start=start, persistent=persistent,
                                                                   aligned_kv=aligned_kv)
        return over_batch(kernel, (q, k, v, jnp.asarray(start, jnp.int32), persistent, aligned_kv),
                          (True, True, True, False, False, True))
    fn = {
        "reference": sliding_window_attention_reference,
        "blockwise": functools.partial(sliding_window_attention_blockwise, block=block),
    }[impl]
    return fn(q, k, v, window=window, start=start, persistent=persistent, aligned_kv=aligned_kv)
