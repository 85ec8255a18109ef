"""Mixed precision end to end: `model.dtype=bfloat16` with float32 master weights (`param_dtype`,
the default) against the float32 model with the same parameters, every variant on `tiny` shapes,
through the XLA paths (`chunked` memory, `blockwise` attention) and the Pallas kernels in interpret
mode. Spec section 1 "Precision": the memory state and its products stay float32 whatever the
compute dtype; activations are bf16; parameters, gradients, logits and the loss float32.

Relative errors of bf16 against float32, measured on CPU (one block, 64 tokens; every variant and
impl below), and the bounds, about 3x above the worst:
- logits, max |bf16 - f32| / max |f32|: 1.1e-2 (swa) .. 2.3e-2 (mac); bound 7e-2. Above 1e-3, so
  bf16 is really in use (float32 compute would agree to ~1e-6);
- the training loss's parameter gradients, ||bf16 - f32|| / ||f32|| over all of them:
  1.3e-2 .. 1.8e-2; bound 6e-2;
- the first block's memory weights after the sequence, max |bf16 - f32| / max |f32|:
  3.1e-4 .. 3.7e-4; bound 1.5e-3. A memory kept in bf16 (rounded at every chunk boundary)
  is off by 1.6e-2 .. 2.1e-2 there, while it moves the logits and gradients by less than their
  spread over variants: the dense layers' bf16 round-off dominates those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import titans
from titans.kernels.memory import MemoryState
from titans.mixers.mac import MACState
from titans.model import TitansLM
from titans.train.steps import cross_entropy

B, T = 2, 64
# One block: a second adds nothing a first does not exercise (the residual stream is bf16 from the
# embedding on) and costs a third more compile time.
N_LAYERS = 1
LOGITS_TOL, GRAD_TOL, STATE_TOL = 7e-2, 6e-2, 1.5e-3
BF16_IN_USE = 1e-3  # float32 compute would agree to ~1e-6
PALLAS = dict(impl="pallas", attn_impl="pallas")  # interpret mode on CPU
MEMORY_KEYS = ("impl", "matmul_dtype")


@functools.cache
def loss_and_grads(variant: str, dtype: str, **impls):
    """The tiny model of `variant` computing in `dtype` (float32 parameters, seed 0) on fixed tokens
    `[B, T + 1]`: (params, training loss `[]`, its gradients, logits `[B, T, vocab]`, the state after
    the tokens). `impls`: model fields (`attn_impl`) and the memory's `impl`, `matmul_dtype`."""
    memory = {k: impls.pop(k) for k in MEMORY_KEYS if k in impls}
    cfg = titans.load_preset("tiny", variant=variant, n_layers=N_LAYERS, dtype=dtype, memory=memory, **impls)
    model = TitansLM(cfg, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model)
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 256)

    def loss(p):
        logits, state = nnx.merge(graph, p).run(toks[:, :-1])
        return jnp.mean(cross_entropy(logits, toks[:, 1:])), (logits, state)

    (value, (logits, state)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return params, value, grads, logits, state


def split_state(state) -> tuple[list, list]:
    """A model state's leaves: (the memory's: every `MemoryState` and MAC's `M_{s-1}`; the others)."""
    is_memory = lambda node: isinstance(node, MemoryState)
    memory, rest = [], []
    for layer in state.layers:
        if isinstance(layer, MACState):
            memory.append(layer.segment_weights)
            layer = layer._replace(segment_weights=())
        leaves = jax.tree.leaves(layer, is_leaf=is_memory)
        memory += [x for x in leaves if is_memory(x)]
        rest += [x for x in leaves if not is_memory(x)]
    return memory, rest


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def max_rel(got, want) -> float:
    return float(np.max(np.abs(flat(got) - flat(want))) / np.max(np.abs(flat(want))))


def errors(variant: str, **impls) -> dict[str, float]:
    """bf16 compute against float32 (both with `impls`): relative errors of logits, gradients, memory state."""
    p32, _, g32, l32, s32 = loss_and_grads(variant, "float32", **impls)
    p16, _, g16, l16, s16 = loss_and_grads(variant, "bfloat16", **impls)
    np.testing.assert_array_equal(flat(p16), flat(p32))  # the same parameters, only the compute differs
    g16, g32 = flat(g16), flat(g32)
    # The first block's memory (the only one here): its inputs are a bf16 embedding and norm away
    # from the float32 model's, so its error is the memory's own, not the dense layers' round-off.
    w16, w32 = ([m.weights for m in split_state(s)[0] if isinstance(m, MemoryState)][:1] for s in (s16, s32))
    return {"logits": max_rel(l16, l32), "grads": float(np.linalg.norm(g16 - g32) / np.linalg.norm(g32)),
            "state": max_rel(w16, w32) if w32 else 0.0}


def check_dtypes(variant: str, **impls) -> None:
    """float32 parameters, gradients, logits, loss and memory state; the rest of the state (attention
    caches, conv tails) in bf16: activations stay in the compute dtype."""
    params, value, grads, logits, state = loss_and_grads(variant, "bfloat16", **impls)
    floats = lambda tree: {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats(params) == floats(grads) == {jnp.dtype(jnp.float32)}
    assert value.dtype == logits.dtype == jnp.float32
    memory, rest = split_state(state)
    assert floats(memory) == ({jnp.dtype(jnp.float32)} if variant != "swa" else set())
    assert floats(rest) == {jnp.dtype(jnp.bfloat16)}


def check_errors(variant: str, **impls) -> None:
    err = errors(variant, **impls)
    assert BF16_IN_USE < err["logits"] < LOGITS_TOL, err
    assert err["grads"] < GRAD_TOL, err
    assert err["state"] < STATE_TOL, err


@pytest.mark.parametrize("variant", titans.config.VARIANTS)
def test_bfloat16_compute_against_float32(variant):
    check_dtypes(variant)
    check_errors(variant)


def test_bfloat16_compute_against_float32_pallas_kernels():
    """The Pallas memory scan and attention (interpret mode on CPU) on bf16 activations: the same
    tolerances as the XLA paths."""
    check_dtypes("mag", **PALLAS)
    check_errors("mag", **PALLAS)


def test_bfloat16_compute_against_float32_pallas_and_bfloat16_matmuls():
    """The Triton memory kernel (interpreted) with bf16 matmuls (`memory.matmul_dtype`, in both
    models) beside the Pallas attention, in mal: bf16 compute keeps the same tolerances. (The TPU
    kernel's bf16 matmuls are held to `chunked`'s in test_memory_scan.py; its interpreter is a host
    callback per op, minutes at model level.)"""
    impls = dict(impl="pallas", matmul_dtype="bfloat16", attn_impl="pallas")
    check_dtypes("mal", **impls)
    check_errors("mal", **impls)
