"""The platform the kernels' `impl` switches dispatch for: the default backend, or the platform a
program is being lowered for (`target`), so that a TPU or GPU program can be exported from a CPU
host with the kernels that platform runs (`lowering.lower_for_tpu` / `lower_for_cuda`)."""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("titans_kernel_platform", default=None)


def backend() -> str:
    """"cpu", "gpu" or "tpu": the lowering target inside `target(...)`, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target(platform: str):
    """Dispatch every kernel call traced inside as on `platform` ("gpu" or "tpu"): compiled kernels,
    no interpret mode."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"platform must be cpu, gpu or tpu, got {platform!r}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
