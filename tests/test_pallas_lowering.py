"""The Pallas kernels (memory scan, sliding-window attention) lower for NVIDIA GPUs (Triton) and
TPUs (Mosaic) at the paper's shapes, forward and backward, on a CPU-only machine; a shape Triton
cannot tile fails here rather than on a GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from titans.kernels.attention import sliding_window_attention
from titans.kernels.attention.pallas import sliding_window_attention_pallas
from titans.kernels.lowering import (
    lower_for_cuda, lower_for_tpu, memory_scan_specs, mosaic_calls, mosaic_kernels, triton_calls,
)
from titans.kernels.memory import MemoryState, memory_scan
from titans.kernels.memory.pallas import memory_scan_pallas

F32 = jnp.float32


def _forward(weights, *args, impl="pallas", **kw):
    return memory_scan(MemoryState.create(weights), *args, impl=impl, interpret=False, **kw)


def _loss(weights, *args, **kw):
    y, state = _forward(weights, *args, **kw)
    return jnp.sum(y.astype(F32) ** 2) + sum(jnp.sum(w) for w in state.weights)


# Width 1024 as 16 heads x 64 and 8 x 128 (expansion 4) at the chunk sizes of issue 7, plus the
# variants of the math (depth, activation, no LayerNorm, read-before-write).
SHAPES = [
    dict(heads=16, dim=64, chunk=16, depth=2, activation="gelu", residual_norm=True, read_before_write=False),
    dict(heads=16, dim=64, chunk=64, depth=2, activation="silu", residual_norm=False, read_before_write=True),
    dict(heads=16, dim=64, chunk=64, depth=2, activation="silu", residual_norm=False, read_before_write=False,
         matmul_dtype="bfloat16"),
    dict(heads=8, dim=128, chunk=64, depth=2, activation="gelu", residual_norm=True, read_before_write=False),
    dict(heads=8, dim=128, chunk=256, depth=2, activation="gelu", residual_norm=False, read_before_write=False),
    dict(heads=8, dim=128, chunk=256, depth=2, activation="gelu", residual_norm=False, read_before_write=False,
         matmul_dtype="bfloat16"),
    dict(heads=16, dim=64, chunk=64, depth=1, activation="gelu", residual_norm=False, read_before_write=False),
    dict(heads=16, dim=64, chunk=32, depth=3, activation="silu", residual_norm=True, read_before_write=True),
]


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: f"{s['heads']}x{s['dim']}-b{s['chunk']}-L{s['depth']}-{s.get('matmul_dtype', 'float32')}"
)
def test_memory_scan_lowers_for_cuda_forward_and_backward(shape):
    weights, args = memory_scan_specs(2, 3 * shape["chunk"] + 5, shape["heads"], shape["dim"], 4 * shape["dim"],
                                      shape["depth"])
    kw = dict(
        chunk_size=shape["chunk"], activation=shape["activation"], residual_norm=shape["residual_norm"],
        read_before_write=shape["read_before_write"], matmul_dtype=shape.get("matmul_dtype", "float32"),
    )
    assert triton_calls(lower_for_cuda(functools.partial(_forward, **kw), weights, *args)) == 1
    grad = jax.grad(functools.partial(_loss, **kw), argnums=tuple(range(7)))
    # forward, the group recompute that saves chunk-start states, and the backward kernel
    assert triton_calls(lower_for_cuda(grad, weights, *args)) == 3


def test_lowering_check_catches_a_tile_triton_cannot_run():
    """The check is live: a chunk of 24 interprets fine on CPU but is not a power of two."""
    weights, (q, k, v, theta, eta, alpha) = memory_scan_specs(1, 48, 2, 64, 256, 2, F32)
    mask = jax.ShapeDtypeStruct((1, 48), jnp.bool_)

    def forward(weights, *args):
        return memory_scan_pallas(
            MemoryState.create(weights), *args, chunk_size=24, activation="gelu", residual_norm=True,
            read_before_write=False,
        )

    with pytest.raises(ValueError, match="power of 2"):
        lower_for_cuda(forward, weights, q, k, v, theta, eta, alpha, mask)
    # the same for the attention kernel's tiles (the api refuses block 24 before lowering)
    x = jax.ShapeDtypeStruct((1, 48, 2, 64), F32)
    with pytest.raises(ValueError, match="power of 2"):
        lower_for_cuda(functools.partial(sliding_window_attention_pallas, window=32, start=0, block=24), x, x, x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, F32], ids=["bf16", "f32"])
@pytest.mark.parametrize("heads, dim, prefix, block, length", [(16, 64, 0, 64, 1000), (8, 128, 511, 128, 700)])
def test_sliding_window_attention_lowers_for_cuda(heads, dim, prefix, block, length, dtype):
    """Window 512 with 16 slots, ragged last blocks (700 queries pad to 6 blocks of 128: rows that
    are not a power of two), fresh or after a full cache: the forward is one kernel, the gradient
    adds the dq and dk/dv kernels."""
    q = jax.ShapeDtypeStruct((2, length, heads, dim), dtype)
    k = jax.ShapeDtypeStruct((2, prefix + length, heads, dim), dtype)
    slots = jax.ShapeDtypeStruct((16, heads, dim), F32)
    start = jax.ShapeDtypeStruct((), jnp.int32)

    def attention(q, k, v, k_p, v_p, start, block=block):
        return sliding_window_attention(q, k, v, window=512, start=start, persistent=(k_p, v_p), block=block,
                                        impl="pallas", interpret=False)

    assert triton_calls(lower_for_cuda(attention, q, k, k, slots, slots, start)) == 1
    grad = jax.grad(lambda *a: jnp.sum(attention(*a).astype(F32) ** 2), argnums=tuple(range(5)))
    assert triton_calls(lower_for_cuda(grad, q, k, k, slots, slots, start)) == 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, F32], ids=["bf16", "f32"])
@pytest.mark.parametrize("prefix, aligned", [(0, False), (511, True)])
def test_sliding_window_attention_lowers_for_tpu(prefix, aligned, dtype):
    """The TPU kernel (JAX's splash attention) at the 170m shapes (16 heads of 48, window 2048 and
    16 slots), fresh or after a full cache, with MAC's aligned stream: the forward is one Mosaic
    kernel, the gradient the forward, dq and dk/dv kernels."""
    length, heads, dim = 700, 16, 48  # 700 queries: padded to the 128-row tiles
    q = jax.ShapeDtypeStruct((2, length, heads, dim), dtype)
    k = jax.ShapeDtypeStruct((2, prefix + length, heads, dim), dtype)
    slots = jax.ShapeDtypeStruct((16, heads, dim), F32)
    start = jax.ShapeDtypeStruct((), jnp.int32)

    def attention(q, k, v, k_p, v_p, start):
        return sliding_window_attention(q, k, v, window=2048, start=start, persistent=(k_p, v_p),
                                        aligned_kv=(k, v) if aligned else None, impl="mosaic", interpret=False)

    assert mosaic_calls(lower_for_tpu(attention, q, k, k, slots, slots, start)) == 1
    grad = jax.grad(lambda *a: jnp.sum(attention(*a).astype(F32) ** 2), argnums=tuple(range(5)))
    assert mosaic_calls(lower_for_tpu(grad, q, k, k, slots, slots, start)) == 3


# The memory at the 170m preset's shapes (12 heads of 64, expansion 4, depth 2, chunk 16, plain MLP
# memory), bf16 and float32 tokens, float32 and bf16 matmuls; and the `small` preset's (4 heads of
# 64, expansion 2); and a shape whose tiles are no (8, 128) multiples (chunk 12, 3 heads of 48).
TPU_SHAPES = {
    "170m-bf16": dict(heads=12, dim=64, expansion=4, chunk=16, dtype=jnp.bfloat16, matmul_dtype="bfloat16"),
    "170m-f32": dict(heads=12, dim=64, expansion=4, chunk=16, dtype=F32, matmul_dtype="float32"),
    "small": dict(heads=4, dim=64, expansion=2, chunk=16, dtype=F32, matmul_dtype="float32"),
    "untiled": dict(heads=3, dim=48, expansion=2, chunk=12, dtype=F32, matmul_dtype="float32", residual_norm=True,
                    read_before_write=True),
}


@pytest.mark.parametrize("name", list(TPU_SHAPES))
def test_memory_scan_lowers_for_tpu_forward_and_backward(name):
    """`impl="mosaic"` (what pallas/auto run on TPU) exported for TPU: the forward is one Mosaic
    kernel; the gradient is the forward, the forward again saving the chunk-start states, and the
    backward kernel. 3 chunks and 5 tokens: ragged, two groups."""
    shape = TPU_SHAPES[name]
    weights, args = memory_scan_specs(2, 3 * shape["chunk"] + 5, shape["heads"], shape["dim"],
                                      shape["expansion"] * shape["dim"], 2, shape["dtype"])
    kw = dict(chunk_size=shape["chunk"], activation="gelu", residual_norm=shape.get("residual_norm", False),
              read_before_write=shape.get("read_before_write", False), matmul_dtype=shape["matmul_dtype"], impl="mosaic")
    assert mosaic_calls(lower_for_tpu(functools.partial(_forward, **kw), weights, *args)) == 1
    grad = jax.grad(functools.partial(_loss, **kw), argnums=tuple(range(7)))
    assert mosaic_calls(lower_for_tpu(grad, weights, *args)) == 3


@pytest.mark.parametrize("variant", ["mac", "mal"])
def test_training_step_of_small_lowers_for_tpu(variant):
    """A whole optimizer step of the `small` preset (forward, backward, AdamW) with both kernels
    asked as `impl="pallas"`, exported for TPU from this CPU host: `platform.target("tpu")`, which
    `lower_for_tpu` sets, makes every call dispatch as on a TPU, so the module holds the memory's
    three Mosaic kernels and splash attention's three (MAC's with its aligned stream) and nothing
    interpreted."""
    import optax
    from flax import nnx

    import titans
    from titans.train.steps import train_step

    cfg = titans.load_preset("small", variant=variant, attn_impl="pallas", memory={"impl": "pallas"})
    model = titans.TitansLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, *_ = train_step(model, optimizer, batch, jnp.float32(1e-3))
        return loss, nnx.state((model, optimizer))

    T = 2 * cfg.attn_block + 33  # ragged: padded to whole chunks and attention tiles
    batch = {"tokens": jax.ShapeDtypeStruct((2, T + 1), jnp.int32), "weights": jax.ShapeDtypeStruct((2, T), F32)}
    text = lower_for_tpu(step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), batch)
    kernels = {name.split("_segmented")[0] for name in mosaic_kernels(text)}
    assert kernels == {"titans_memory_forward", "titans_memory_forward_save", "titans_memory_backward",
                       "splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"}, kernels
    assert mosaic_calls(text) >= len(kernels)

