"""Sliding-window attention on TPU: JAX's splash attention kernel (Pallas, Mosaic), forward and
backward, as JAX ships it.

Splash runs one softmax over one key sequence under a static block-sparse mask, and skips the
blocks the mask leaves empty (so a window costs O(T * (w + block))). Everything our attention
adds fits that: the persistent slots, the keys (cache and own) and, for MAC, the aligned stream
become one key sequence `[slots | keys | aligned keys | padding]` under one static mask (the window
band once per stream, every slot visible), and the keys before the sequence start, which depend on
the traced `start`, are masked by key segment ids, which splash compares at run time. One softmax
over that sequence is exactly the reference's, so nothing is merged outside the kernel: splash
returns its log-sum-exp only from a forward that has no gradient, which rules out the log-sum-exp
merge the Triton kernel uses (`pallas.py`). Its gradient is splash's own dq and dk/dv kernels.

Lengths are padded to the block (`block`, 128 by default, a multiple of TPU's 128-lane tiles);
padded keys are masked, padded queries see the first key and are cut from the output. The mask is
built in numpy at trace time, once per shape (`_kernel` is cached): `[P, slots + streams x (S + P)]`
booleans, so a call's piece should stay in the thousands of tokens (the model's prefill pieces do).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask


def _padded(queries: int, keys: int, block: int) -> tuple[int, int]:
    """(query rows, key columns) of the kernel: `queries` and `keys` rounded up to the block."""
    return -(-queries // block) * block, -(-keys // block) * block


@functools.cache
def _kernel(queries: int, prefix: int, slots: int, streams: int, window: int, heads: int, block: int,
            interpret: bool) -> splash.SplashAttentionKernel:
    """The splash kernel of one shape: queries `[heads, round_up(queries), dim]` against the key
    sequence `[slots | streams x (prefix + queries) keys | padding]` (see the module docstring)."""
    keys = prefix + queries
    rows, cols = _padded(queries, slots + streams * keys, block)
    q_idx = prefix + np.arange(rows)[:, None]
    k_idx = np.arange(keys)[None, :]
    band = (k_idx <= q_idx) & (k_idx > q_idx - window)
    mask = np.zeros((rows, cols), bool)
    mask[:, :slots] = True
    for s in range(streams):
        mask[:, slots + s * keys : slots + (s + 1) * keys] = band
    mask[queries:, 0] = True  # padded queries see a key (rows cut from the output; splash masks with a finite value)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # the mask's arrays are constants, not values of a trace being cached
        return splash.make_splash_mha(splash_mask.MultiHeadMask([splash_mask.NumpyMask(mask)] * heads), head_shards=1,
                                      q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def sliding_window_attention_mosaic(q, k, v, *, window: int, start, persistent=None, aligned_kv=None,
                                    block: int = 128, interpret: bool = False) -> jax.Array:
    """q `[B, P, H, D]`, k, v `[B, S + P, H, D]`, persistent `(k_p, v_p)` `[N, H, D]`, aligned_kv
    `(k2, v2)` like k, v -> `[B, P, H, D]` (`api.sliding_window_attention` has the semantics)."""
    batch, queries, heads, dim = q.shape
    prefix = k.shape[1] - queries
    streams = [(k, v)] + ([tuple(aligned_kv)] if aligned_kv is not None else [])
    slots = 0 if persistent is None else persistent[0].shape[0]
    kernel = _kernel(queries, prefix, slots, len(streams), window, heads, block, bool(interpret))
    rows, cols = _padded(queries, slots + len(streams) * k.shape[1], block)

    def sequence(parts):  # [B, L, H, D] pieces -> [B, H, cols, D]
        seq = jnp.concatenate(parts, axis=1)
        seq = jnp.pad(seq, ((0, 0), (0, cols - seq.shape[1]), (0, 0), (0, 0)))
        return seq.transpose(0, 2, 1, 3)

    lead = [] if persistent is None else [persistent]
    keys = sequence([jnp.broadcast_to(p[0].astype(k.dtype), (batch, *p[0].shape)) for p in lead] + [s[0] for s in streams])
    values = sequence([jnp.broadcast_to(p[1].astype(v.dtype), (batch, *p[1].shape)) for p in lead] + [s[1] for s in streams])
    scaled = (q.astype(jnp.float32) / math.sqrt(dim)).astype(q.dtype)
    queries_ = jnp.pad(scaled, ((0, 0), (0, rows - queries), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    # Key segment 1 (the queries' segment) where a key exists: every slot, and the keys whose
    # position `start - prefix + j` is >= 0; 0 for the keys before the sequence start and padding.
    valid = jnp.asarray(start, jnp.int32) - prefix + jnp.arange(prefix + queries) >= 0
    key_segment = jnp.concatenate([jnp.ones(slots, jnp.int32)] + [valid.astype(jnp.int32)] * len(streams))
    segments = splash.SegmentIds(q=jnp.ones(rows, jnp.int32),
                                 kv=jnp.pad(key_segment, (0, cols - key_segment.shape[0])))
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(queries_, keys, values)
    return out[:, :, :queries].transpose(0, 2, 1, 3)
