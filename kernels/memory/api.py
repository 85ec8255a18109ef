"""`memory_scan`: the one public entry point of the neural-memory recurrence (spec section 2)."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from titans.kernels import platform
from titans.kernels.memory.chunked import memory_scan_chunked
from titans.kernels.memory.common import ACTIVATIONS, MATMUL_DTYPES, MemoryState
from titans.kernels.memory.mosaic import memory_scan_mosaic
from titans.kernels.memory.pallas import memory_scan_pallas, supported
from titans.kernels.memory.reference import memory_scan_reference
from titans.kernels.sharding import over_batch

Impl = Literal["reference", "chunked", "pallas", "mosaic", "auto"]
IMPLS = ("reference", "chunked", "pallas", "mosaic", "auto")
MAX_DEPTH = 4


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_state(state: MemoryState, batch: int, heads: int, dim: int) -> jnp.dtype:
    if not isinstance(state, MemoryState):
        raise ValueError(f"state must be a MemoryState (build it with MemoryState.create), got {type(state).__name__}")
    weights = tuple(state.weights)
    depth = len(weights)
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"state.weights must hold 1 to {MAX_DEPTH} matrices (memory depth), got {depth}")
    for field in ("weights", "momentum", "anchor"):
        if not all(hasattr(w, "shape") and hasattr(w, "dtype") for w in tuple(getattr(state, field))):
            raise ValueError(f"state.{field} must be a tuple of arrays [batch, heads, in, out]")
    dtype = jnp.dtype(weights[0].dtype)
    if dtype not in (jnp.float32, jnp.float64):
        raise ValueError(f"state.weights must be float32 (float64 under jax_enable_x64), got {dtype}")
    hidden = weights[0].shape[-1] if depth > 1 else dim
    for field in ("weights", "momentum", "anchor"):
        mats = tuple(getattr(state, field))
        if len(mats) != depth:
            raise ValueError(f"state.{field} has {len(mats)} matrices, state.weights has {depth}")
        for layer, w in enumerate(mats):
            n_in = dim if layer == 0 else hidden
            n_out = dim if layer == depth - 1 else hidden
            want = (batch, heads, n_in, n_out)
            if tuple(w.shape) != want:
                raise ValueError(
                    f"state.{field}[{layer}] has shape {tuple(w.shape)}, expected {want} "
                    "([batch, heads, in, out] matching q)"
                )
            if jnp.dtype(w.dtype) != dtype:
                raise ValueError(f"state.{field}[{layer}] is {w.dtype}, state.weights[0] is {dtype}: use one dtype")
    if jnp.shape(state.offset) != () or not jnp.issubdtype(jnp.result_type(state.offset), jnp.integer):
        raise ValueError(f"state.offset must be an integer scalar, got shape {jnp.shape(state.offset)}")
    return dtype


def _check_inputs(q, k, v, theta, eta, alpha, mask, depth: int) -> None:
    if q.shape[1] < 1:
        raise ValueError("q must hold at least one token (seq >= 1)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} has shape {x.shape}, expected {q.shape} (same as q)")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    gate_shape = q.shape[:3]
    if theta.shape not in (gate_shape, gate_shape + (depth,)):
        raise ValueError(
            f"theta has shape {theta.shape}, expected {gate_shape} or {gate_shape + (depth,)} (one rate per memory layer)"
        )
    for name, x in (("eta", eta), ("alpha", alpha)):
        if x.shape != gate_shape:
            raise ValueError(f"{name} has shape {x.shape}, expected {gate_shape} ([batch, seq, heads])")
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if mask is not None:
        if mask.shape != q.shape[:2]:
            raise ValueError(f"mask has shape {mask.shape}, expected {q.shape[:2]} ([batch, seq])")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be bool, got {mask.dtype}")


def _check_ranges(theta, eta, alpha) -> None:
    """Gate ranges, only where the values are known (not under jit/grad) and local to this process."""
    for name, x, lo, hi in (("theta", theta, 0.0, np.inf), ("eta", eta, 0.0, 1.0), ("alpha", alpha, 0.0, 1.0)):
        if _concrete(x) and getattr(x, "is_fully_addressable", True):
            x = np.asarray(x, np.float64)
            ok = (x >= lo) & (x <= hi) & np.isfinite(x)  # NaN and inf fail too
            if not np.all(ok):
                raise ValueError(f"{name} must lie in [{lo}, {hi}] and be finite, found {x[~ok].ravel()[0]}")


def _interpret(interpret: bool | None, impl: str) -> bool:
    """Pallas interpret mode: as asked, else exactly where no compiled kernel can run (CPU; and for
    the TPU kernel, anything but a TPU)."""
    if interpret is not None:
        return bool(interpret)
    return platform.backend() != "tpu" if impl == "mosaic" else platform.backend() == "cpu"


def _resolve(impl: str, interpret: bool | None, chunk_size: int, head_dim: int, state: MemoryState, dtype) -> str:
    """`pallas` is the Mosaic kernel on TPU. `auto` -> the Mosaic kernel on TPU, the Triton one on
    GPU for the shapes it compiles, else `chunked`; a shape that an explicitly requested compiled
    Triton kernel cannot run is one clear error (the Mosaic kernel tiles every shape)."""
    backend = platform.backend()
    if impl in ("pallas", "auto") and backend == "tpu":
        return "mosaic"
    weights = tuple(state.weights)
    hidden = weights[0].shape[-1] if len(weights) > 1 else head_dim
    why_not = supported(chunk_size, head_dim, hidden, dtype)
    if impl == "auto":
        return "pallas" if backend == "gpu" and why_not is None else "chunked"
    if impl == "pallas" and not _interpret(interpret, impl) and why_not is not None:
        raise ValueError(f"memory_scan(impl='pallas') cannot compile this shape: {why_not}; use impl='chunked' or 'auto'")
    return impl


def memory_scan(
    state: MemoryState,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    theta: jax.Array,
    eta: jax.Array,
    alpha: jax.Array,
    *,
    chunk_size: int,
    activation: str = "gelu",
    residual_norm: bool,
    read_before_write: bool = False,
    mask: jax.Array | None = None,
    impl: Impl = "auto",
    interpret: bool | None = None,
    matmul_dtype: str = "float32",
) -> tuple[jax.Array, MemoryState]:
    """Run the Titans memory over `T` tokens from `state`.

    q, k, v: `[B, T, H, D]`; theta: `[B, T, H]` or `[B, T, H, L]`; eta, alpha: `[B, T, H]`;
    mask: `[B, T]` bool (False = the token does not write). Returns `y [B, T, H, D]` (dtype of q)
    and the state after the last token; splitting a call anywhere with the carried state equals
    one call. See `../../../shared/spec/titans.md` sections 1-2 and this folder's README.

    impl: "auto" (the Mosaic kernel on TPU, the Triton one on GPU where `pallas.supported`, else
    "chunked"), "chunked", "pallas" (Triton on GPU, Mosaic on TPU), "mosaic" (the TPU kernel;
    interpret mode elsewhere) or "reference" (the token loop, the oracle). interpret: run Pallas in
    interpret mode; None = only where nothing else can run it (CPU). matmul_dtype: "float32"
    (exact, the spec) or "bfloat16" (the chunk form's matmul inputs in bf16, float32 accumulation
    and state; every impl but the reference).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if matmul_dtype not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    for name, flag in (("residual_norm", residual_norm), ("read_before_write", read_before_write)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    q, k, v, theta, eta, alpha = map(jnp.asarray, (q, k, v, theta, eta, alpha))
    mask = None if mask is None else jnp.asarray(mask)
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq, heads, dim], got shape {q.shape}")
    dtype = _check_state(state, q.shape[0], q.shape[2], q.shape[3])
    depth = len(tuple(state.weights))
    _check_inputs(q, k, v, theta, eta, alpha, mask, depth)
    _check_ranges(theta, eta, alpha)
    if _concrete(state.offset) and not 0 <= int(state.offset) < chunk_size:
        raise ValueError(
            f"state.offset is {int(state.offset)}, must be in [0, chunk_size={chunk_size}): "
            "a state must be used with the chunk_size it was built with"
        )
    impl = _resolve(impl, interpret, chunk_size, q.shape[-1], state, dtype)
    if impl == "reference" and matmul_dtype != "float32":
        raise ValueError("impl='reference' is the exact float32 oracle; matmul_dtype='bfloat16' needs 'chunked', 'pallas' or 'mosaic'")

    if theta.ndim == 3:
        theta = jnp.broadcast_to(theta[..., None], theta.shape + (depth,))
    if mask is None:
        mask = jnp.ones(q.shape[:2], jnp.bool_)
    cast = lambda x: x.astype(dtype)
    if impl in ("pallas", "mosaic"):
        kernel = memory_scan_pallas if impl == "pallas" else memory_scan_mosaic
        fn = functools.partial(kernel, interpret=_interpret(interpret, impl), matmul_dtype=matmul_dtype)
    elif impl == "chunked":
        fn = functools.partial(memory_scan_chunked, matmul_dtype=matmul_dtype)
    else:
        fn = memory_scan_reference
    fn = functools.partial(fn, chunk_size=int(chunk_size), activation=activation, residual_norm=residual_norm,
                           read_before_write=read_before_write)
    args = (state, *map(cast, (q, k, v, theta, eta, alpha)), mask)
    # Every argument leads with the batch axis (the state's offset is a scalar, replicated).
    y, new_state = over_batch(fn, args, (True,) * len(args)) if impl in ("pallas", "mosaic") else fn(*args)
    return y.astype(q.dtype), new_state
