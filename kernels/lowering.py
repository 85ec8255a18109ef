"""Lower a function for an NVIDIA GPU (or a TPU, `lower_for_tpu`) on a machine without one
(jax.export, platforms=["cuda"] / ["tpu"]).

Nothing runs: lowering proves that every Pallas kernel in the function lowers through Triton
(power-of-two tiles, supported primitives), which interpret mode on CPU does not. Each kernel
becomes one `__gpu$xla.gpu.triton` custom call whose backend config carries the kernel's Triton IR
(MLIR bytecode) and launch parameters; `triton_kernels` reads them back as text, which the
`triton` package's compiler takes (`titans.train.bench.compile`: PTX, ptxas, spills). XLA compiles
that same IR to PTX on a GPU (../shared/notes/stack.md, s10).
"""

from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

from titans.kernels import platform
from titans.kernels.memory.common import layer_shapes

F32 = jnp.float32
_GPU_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call")


def _abstract_gpu():
    # jax >= 0.11 asks the mesh for the GPU's properties; 0.10 does not need one.
    if hasattr(jax.sharding, "AbstractDevice"):
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))
    return contextlib.nullcontext()


def lower_for_cuda(fn, *args) -> str:
    """The StableHLO text of `jit(fn)(*args)` exported for CUDA (args may be ShapeDtypeStructs)."""
    disabled = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _GPU_CALLS]
    with _abstract_gpu(), platform.target("gpu"):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)
    return exported.mlir_module()


def memory_scan_specs(batch, seq, heads, dim, hidden, depth, dtype=jnp.bfloat16):
    """Abstract arguments of `memory_scan` (the initial weights, then q, k, v `[batch, seq, heads,
    dim]` in `dtype`, theta `[..., depth]`, eta, alpha `[batch, seq, heads]`), for lowering."""
    weights = tuple(jax.ShapeDtypeStruct((batch, heads, *shape), F32) for shape in layer_shapes(dim, hidden, depth))
    x = jax.ShapeDtypeStruct((batch, seq, heads, dim), dtype)
    gate = jax.ShapeDtypeStruct((batch, seq, heads), F32)
    return weights, (x, x, x, jax.ShapeDtypeStruct((batch, seq, heads, depth), F32), gate, gate)


def triton_calls(text: str) -> int:
    return text.count(_GPU_CALLS[0])


def lower_for_tpu(fn, *args) -> str:
    """The StableHLO text of `jit(fn)(*args)` exported for TPU: each Pallas kernel lowers through
    Mosaic (its block shapes and primitives checked) into one `tpu_custom_call`."""
    with platform.target("tpu"):
        return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def mosaic_calls(text: str) -> int:
    return text.count("tpu_custom_call")


def mosaic_kernels(text: str) -> set[str]:
    """The kernel names of a TPU-lowered module's Mosaic calls (a kernel that XLA calls from
    several places, e.g. every layer of a model, is one name)."""
    return set(re.findall(r'kernel_name\s*=\s*"([^"]+)"', text))


class TritonKernel(NamedTuple):
    """One Triton custom call of a lowered module: its kernel name, Triton IR as MLIR text (the
    `tt` dialect, before any GPU-specific pass) and launch parameters."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int


def triton_kernels(text: str) -> list[TritonKernel]:
    """The Triton kernels of `lower_for_cuda`'s text, in program order."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect

    kernels = []

    def visit(op):
        target = op.attributes["call_target_name"] if op.name == "stablehlo.custom_call" else None
        if target is not None and ir.StringAttr(target).value == _GPU_CALLS[0]:
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            kernels.append((ir.StringAttr(config["name"]).value, ir.StringAttr(config["ir"]).value_bytes,
                            ir.IntegerAttr(config["num_warps"]).value, ir.IntegerAttr(config["num_stages"]).value))
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    visit(child.operation)

    with mlir.make_ir_context():
        visit(ir.Module.parse(text).operation)
    # The IR is bytecode of jaxlib's Triton dialect: it parses only where that dialect is registered.
    context = mlir.make_ir_context()
    dialect.register_dialect(context)
    with context:
        return [TritonKernel(name, ir.Module.parse(code).operation.get_asm(enable_debug_info=False), warps, stages)
                for name, code, warps, stages in kernels]
