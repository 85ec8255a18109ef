"""Sliding-window attention, every impl (the dense reference, blockwise XLA, the Pallas flash kernel
and the TPU (splash) kernel in interpret mode) against a plain masked softmax (numpy, float64, a
full T x T mask), with persistent slots, a streaming cache and negative positions; gradients of
blockwise, pallas and mosaic against the reference; RoPE's precision at 2M tokens; the blockwise pass never builds a T x T array."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from titans.kernels.attention import sliding_window_attention
from titans.kernels.attention.blockwise import sliding_window_attention_blockwise
from titans.attention import apply_rope, rope_angles

IMPLS = ("reference", "blockwise", "pallas", "mosaic")


def softmax_reference(q, k, v, q_pos, k_pos, window, persistent):
    """q [B, P, H, D] at q_pos, k/v [B, K, H, D] at k_pos; key visible iff 0 <= k_pos, q-w < k_pos <= q."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window) & (k_pos >= 0)[None]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(visible[None, None], logits, -np.inf)
    values = v
    if persistent is not None:
        pk, pv = (np.asarray(a, np.float64) for a in persistent)
        slots = np.einsum("bqhd,nhd->bhqn", q, pk) / np.sqrt(q.shape[-1])
        logits = np.concatenate([slots, logits], axis=-1)
        values = np.concatenate([np.broadcast_to(pv, (v.shape[0],) + pv.shape), v], axis=1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, values)


def draw(length, prefix, n_persistent, heads=2, dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (2, length, heads, dim))
    k = jax.random.normal(keys[1], (2, prefix + length, heads, dim))
    v = jax.random.normal(keys[2], (2, prefix + length, heads, dim))
    persistent = None
    if n_persistent is not None:
        persistent = (jax.random.normal(keys[3], (n_persistent, heads, dim)),
                      jax.random.normal(keys[4], (n_persistent, heads, dim)))
    return q, k, v, persistent


@pytest.mark.parametrize(
    "length, window, block, n_persistent",
    [
        (37, 8, 8, 3),    # blockwise, window == block, ragged last block
        (37, 9, 8, 3),    # window one past a block
        (37, 20, 8, 0),   # window spans 3 blocks; no slots
        (40, 1, 8, 2),    # window 1: self only (plus slots)
        (37, 64, 8, None),  # window longer than the sequence
        (6, 8, 8, 3),     # one block: the dense path
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_fresh_sequence_matches_masked_softmax(length, window, block, n_persistent, impl):
    q, k, v, persistent = draw(length, 0, n_persistent)
    got = sliding_window_attention(q, k, v, window=window, start=0, persistent=persistent, block=block, impl=impl)
    pos = np.arange(length)
    want = softmax_reference(q, k, v, pos, pos, window, persistent)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("length, block", [(1, 8), (5, 8), (29, 8)])
@pytest.mark.parametrize("start", [0, 4, 50])
@pytest.mark.parametrize("impl", IMPLS)
def test_with_cache_matches_masked_softmax(length, block, start, impl):
    """Keys = a window-1 cache (partly at negative positions when start < window-1) + the piece."""
    window = 12
    q, k, v, persistent = draw(length, window - 1, 3, seed=start + length)
    got = jax.jit(lambda q, k, v, s: sliding_window_attention(q, k, v, window=window, start=s,
                                                              persistent=persistent, block=block, impl=impl))(
        q, k, v, jnp.int32(start))
    q_pos = start + np.arange(length)
    k_pos = start - (window - 1) + np.arange(window - 1 + length)
    want = softmax_reference(q, k, v, q_pos, k_pos, window, persistent)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl", ["blockwise", "pallas", "mosaic"])
@pytest.mark.parametrize("prefix, start", [(0, 0), (6, 3), (6, 40)])
def test_gradients_match_reference(impl, prefix, start):
    """Gradients of q, k (cache included), v and both slot arrays, against autodiff of the dense reference."""
    q, k, v, persistent = draw(21, prefix, 2, seed=prefix + start)
    window, block = 7, 4
    w = jax.random.normal(jax.random.key(9), q.shape)

    def loss(impl):
        return lambda q, k, v, pk, pv: jnp.sum(w * sliding_window_attention(
            q, k, v, window=window, start=start, persistent=(pk, pv), block=block, impl=impl))

    args = (q, k, v) + persistent
    got = jax.grad(loss(impl), argnums=range(5))(*args)
    want = jax.grad(loss("reference"), argnums=range(5))(*args)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(np.max(np.abs(r))), rtol=0)


@pytest.mark.parametrize("length, prefix, start", [(13, 0, 0), (5, 7, 3), (13, 7, 40)])
@pytest.mark.parametrize("impl", IMPLS)
def test_aligned_stream_is_one_softmax_over_both_streams(impl, length, prefix, start):
    """`aligned_kv`: a second key/value stream at the same positions as k, v (MAC's retrievals beside
    its tokens): the masked softmax over [slots | k | k2], values and gradients (of both streams)."""
    window, block = 8, 4
    q, k, v, persistent = draw(length, prefix, 3, seed=length + start)
    _, k2, v2, _ = draw(length, prefix, None, seed=100 + length + start)
    q_pos = start + np.arange(length)
    k_pos = start - prefix + np.arange(prefix + length)
    want = softmax_reference(q, np.concatenate([k, k2], 1), np.concatenate([v, v2], 1), q_pos,
                             np.concatenate([k_pos, k_pos]), window, persistent)
    attend = lambda impl: lambda q, k, v, k2, v2: sliding_window_attention(
        q, k, v, window=window, start=start, persistent=persistent, aligned_kv=(k2, v2), block=block, impl=impl)
    np.testing.assert_allclose(np.asarray(attend(impl)(q, k, v, k2, v2)), want, atol=2e-6, rtol=0)
    w = jax.random.normal(jax.random.key(9), q.shape)
    grads = lambda impl: jax.grad(lambda *a: jnp.sum(w * attend(impl)(*a)), argnums=range(5))(q, k, v, k2, v2)
    for g, r in zip(grads(impl), grads("reference")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(np.max(np.abs(r))), rtol=0)


def test_bad_shapes_and_impls_fail_in_one_line():
    q, k, v, _ = draw(5, 0, None)
    with pytest.raises(ValueError, match="keys hold 12 tokens before the queries, expected 0 .. window - 1 = 7"):
        sliding_window_attention(q, jnp.pad(k, ((0, 0), (12, 0), (0, 0), (0, 0))), jnp.pad(v, ((0, 0), (12, 0), (0, 0), (0, 0))),
                                 window=8, start=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        sliding_window_attention(q, k, v, window=8, start=0, impl="cudnn")
    with pytest.raises(ValueError, match="aligned_kv must be shaped like k, v"):
        sliding_window_attention(q, k, v, window=8, start=0, aligned_kv=(k[:, 1:], v[:, 1:]))
    with pytest.raises(ValueError, match="impl='pallas'\\) cannot compile this shape: head_dim is 8"):
        sliding_window_attention(q, k, v, window=8, start=0, impl="pallas", interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Pallas kernel needs a GPU")
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_compiled_pallas_matches_blockwise_on_gpu(dtype, tol):
    """At a Triton-sized shape after a full cache, values and gradients of the compiled kernel against
    the blockwise XLA path (bf16: both round the probabilities to bf16 before the value product)."""
    q, k, v, persistent = draw(300, 127, 16, heads=4, dim=64, seed=5)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    w = jax.random.normal(jax.random.key(9), q.shape)

    def loss(impl):
        return lambda q, k, v, pk, pv: jnp.sum(w * sliding_window_attention(
            q, k, v, window=128, start=1000, persistent=(pk, pv), block=64, impl=impl).astype(jnp.float32))

    args = (q, k, v) + persistent
    for impl_args in ((), tuple(range(5))):
        get = (lambda impl: jax.jit(loss(impl))(*args)) if not impl_args else (
            lambda impl: jax.jit(jax.grad(loss(impl), argnums=impl_args))(*args))
        for g, r in zip(jax.tree.leaves(get("pallas")), jax.tree.leaves(get("blockwise"))):
            g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
            np.testing.assert_allclose(g, r, atol=tol * float(np.max(np.abs(r))), rtol=0)


def test_no_quadratic_intermediate():
    """Every array the blockwise pass (and its gradient) builds is O(T * (window + block)), not T x T."""
    length, window, block, heads, dim = 1024, 32, 16, 1, 4
    q, k, v, persistent = draw(length, 0, 2, heads=heads, dim=dim)
    fn = lambda q, k, v: jnp.sum(sliding_window_attention_blockwise(q, k, v, window=window, start=0,
                                                                    persistent=persistent, block=block))
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, k, v)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    largest = max(sizes(jaxpr.jaxpr))
    assert largest <= 2 * q.shape[0] * length * (window + 2 * block) * max(heads, dim), largest
    assert largest < length * length // 4, largest


def test_rope_is_relative_and_precise_at_2m_tokens():
    dim, base = 64, 10000.0
    positions = np.array([0, 1, 4095, 4096, 2_097_151, 2_097_152 - 7, 1_000_003])
    cos, sin = rope_angles(jnp.asarray(positions), dim, base)
    freq = base ** (-np.arange(dim // 2) / (dim // 2))
    exact = positions[:, None].astype(np.float64) * freq
    # Compare on the circle: the split angles differ from p * f by multiples of 2 pi only.
    err = np.abs(np.angle(np.exp(1j * exact) * (np.asarray(cos) - 1j * np.asarray(sin))))
    assert err.max() < 2e-3, err.max()
    # q . k depends on the position difference only.
    x = jax.random.normal(jax.random.key(0), (1, 1, 1, dim))
    y = jax.random.normal(jax.random.key(1), (1, 1, 1, dim))

    def score(p_q, p_k):
        cq, sq = rope_angles(jnp.array([p_q]), dim, base)
        ck, sk = rope_angles(jnp.array([p_k]), dim, base)
        return float(jnp.sum(apply_rope(x, cq, sq) * apply_rope(y, ck, sk)))

    np.testing.assert_allclose(score(2_000_017, 2_000_000), score(17, 0), atol=5e-3)


@pytest.mark.parametrize("position", [3, 9, 20])
def test_decode_reading_the_ring_before_its_write_equals_after(position):
    """A decode step that reads the ring before writing its own slot (`ring_seen`, `current`) sees
    exactly what it sees after the write, for a ring not yet full, just full and wrapped, with two
    streams (MAC's) and a first visible position (MAC's segment start)."""
    from titans.attention import AttentionCache, ring_positions, ring_seen, write_slot
    from titans.kernels.attention import decode_attention

    B, H, S, D = 2, 3, 8, 4
    keys = iter(jax.random.split(jax.random.key(position), 10))
    rings = [AttentionCache(*(jax.random.normal(next(keys), (B, H, S, D)) for _ in range(2))) for _ in range(2)]
    own = [tuple(jax.random.normal(next(keys), (B, H, D)) for _ in range(2)) for _ in range(2)]
    q = jax.random.normal(next(keys), (B, H, D))
    slots = (jax.random.normal(next(keys), (5, H, D)),) * 2
    first = position - position % 6  # a segment start, as MAC's
    after = [write_slot(r, *u, position) for r, u in zip(rings, own)]
    held = ring_positions(position, S)
    want = decode_attention(q, [tuple(r) for r in after], (held >= first) & (held > position - S), slots)
    got = decode_attention(q, [tuple(r) for r in rings], ring_seen(position, S, first), slots, current=own)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
