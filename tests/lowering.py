"""Lower a function for an NVIDIA GPU or a TPU on a machine without one (jax.export, platforms=
["cuda"] or ["tpu"]).

Nothing runs: this proves that every Pallas kernel in the function lowers through Triton (power-
of-two tiles, supported primitives) or Mosaic, which interpret mode on CPU does not. PTX (or TPU
binary) compilation happens in XLA on the device and is not covered (../shared/notes/stack.md, s10).
"""

from __future__ import annotations

import contextlib

import jax

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
    with _abstract_gpu():
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)
    return exported.mlir_module()


def triton_calls(text: str) -> int:
    return text.count(_GPU_CALLS[0])


def lower_for_tpu(fn, *args) -> str:
    """The StableHLO text of `jit(fn)(*args)` exported for TPU."""
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()


def mosaic_calls(text: str) -> int:
    return text.count("tpu_custom_call")
