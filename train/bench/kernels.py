"""GPU/TPU benchmark of the memory-scan kernels: `chunked` (XLA) vs `pallas`, forward and forward+backward.
On a TPU `pallas` is the Mosaic kernel (`mosaic.py`) and `fla` is skipped (GPU only).

Memory scan alone (no projections), memory depth 2 at expansion 4 (and depth 1, "linear memory"),
float32 matmuls (exact) and bf16 matmul inputs with float32 accumulation (`matmul_dtype`),
width 1024 as 16 heads x 64 and 8 x 128, chunks 16/64/256, 8K and 64K tokens. The batch is chosen
so that batch x heads >= 2 x the device's parallel units (a GPU's SMs, a TPU chip's TensorCores):
one program per (batch, head) and a sequential chunk loop give no other parallelism. Inputs bf16, state float32; the loss for forward+backward is
sum(y^2), gradients w.r.t. the initial state and every input. Each case runs in its own process
(an out-of-memory case fails alone) and checks its output against `chunked` on the same inputs.
FLOPs are analytic (`titans.kernels.memory.scan_flops_per_token`; forward+backward counts 3x the forward, the
recompute is not counted) and are reported against the device's dense bf16 peak. With depth 1 and
flash-linear-attention installed (PyTorch), `chunk_gated_delta_rule` runs on the same shapes.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys

from titans.kernels.memory import layer_shapes, scan_flops_per_token
from titans.train.bench.common import (PARALLEL_UNITS, check_lists, child_main, device_kind, gpu_only_row, lookup,
                                       max_rel_err, repeat, run_gpu_grid, speed_table)

SECTION = "bench_kernels"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    heads: tuple[str, ...] = ("16x64", "8x128")  # "<heads>x<head_dim>"
    chunks: tuple[int, ...] = (16, 64, 256)
    seq_lens: tuple[int, ...] = (8192, 65536)
    depths: tuple[int, ...] = (2, 1)
    impls: tuple[str, ...] = ("chunked", "pallas", "fla")
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    matmul_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    expansion: int = 4
    batch: int = 0  # 0: fill the GPU (batch x heads >= 2 x SMs)
    interpret: bool = False
    iters: int = 5
    budget_s: float = 30.0
    write: bool = False

    def __post_init__(self):
        check_lists(self, {"impls": ("chunked", "pallas", "fla"), "modes": ("fwd", "fwdbwd"),
                           "matmul_dtypes": ("float32", "bfloat16")})
        if any(x < 1 for x in self.chunks + self.seq_lens + self.depths) or self.batch < 0:
            raise ValueError("--chunks, --seq-lens, --depths must be positive and --batch >= 0")

    def cases(self) -> list[dict]:
        return [
            dict(heads=h, chunk=b, seq=t, depth=depth, mode=mode, matmul=mm, impl=impl)
            for depth in self.depths for h in self.heads for b in self.chunks for t in self.seq_lens
            for mode in self.modes for mm in self.matmul_dtypes for impl in self.impls
            # the delta rule is a linear (depth-1) memory with bf16 matmuls
            if impl != "fla" or (depth == 1 and mm == "bfloat16")
        ]


def _batch(cfg: BenchConfig, heads: int) -> int:
    if cfg.batch:
        return cfg.batch
    return math.ceil(2 * (lookup(PARALLEL_UNITS, device_kind()) or 132) / heads)


def _inputs(case: dict, batch: int, cfg: BenchConfig):
    import jax
    import jax.numpy as jnp


    heads, dim = map(int, case["heads"].split("x"))
    depth, hidden = case["depth"], cfg.expansion * dim
    keys = iter(jax.random.split(jax.random.key(0), 8 + depth))
    weights = tuple(
        jax.random.normal(next(keys), (batch, heads, n_in, n_out), jnp.float32) / math.sqrt(n_in)
        for n_in, n_out in layer_shapes(dim, hidden, depth)
    )
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    shape = (batch, case["seq"], heads, dim)
    q, k, v = (unit(jax.random.normal(next(keys), shape)).astype(jnp.bfloat16) for _ in range(3))
    gates = (
        0.01 * jax.random.uniform(next(keys), shape[:3]),
        0.9 + 0.1 * jax.random.uniform(next(keys), shape[:3]),
        0.01 * jax.random.uniform(next(keys), shape[:3]),
    )
    return weights, (q, k, v, *gates)


def _jax_step(case: dict, cfg: BenchConfig):
    import jax
    import jax.numpy as jnp

    from titans.kernels.memory import MemoryState, memory_scan

    def forward(impl, weights, *args):
        interpret = cfg.interpret if impl == "pallas" else None
        return memory_scan(
            MemoryState.create(weights), *args, chunk_size=case["chunk"], residual_norm=False, impl=impl,
            interpret=interpret, matmul_dtype=case["matmul"],
        )[0]

    def step(impl):
        if case["mode"] == "fwd":
            return jax.jit(lambda *a: forward(impl, *a))
        loss = lambda *a: jnp.sum(jnp.square(forward(impl, *a).astype(jnp.float32)))
        return jax.jit(jax.grad(loss, argnums=tuple(range(7))))

    return step


def _fla_step(case: dict, batch: int):
    """flash-linear-attention's chunk_gated_delta_rule on the same shapes (bf16, PyTorch)."""
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    heads, dim = map(int, case["heads"].split("x"))
    shape = (batch, case["seq"], heads, dim)
    make = lambda: torch.nn.functional.normalize(torch.randn(shape, device="cuda"), dim=-1).bfloat16()
    q, k, v = (make().requires_grad_(case["mode"] == "fwdbwd") for _ in range(3))
    g = (-0.01 * torch.rand(shape[:3], device="cuda")).requires_grad_(case["mode"] == "fwdbwd")
    beta = (0.01 * torch.rand(shape[:3], device="cuda")).bfloat16().requires_grad_(case["mode"] == "fwdbwd")

    def run():
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
        if case["mode"] == "fwdbwd":
            o.float().square().sum().backward()
        torch.cuda.synchronize()

    return run


def run_case(case: dict, cfg: BenchConfig) -> dict:
    """One case, in this (child) process."""
    import jax

    heads, dim = map(int, case["heads"].split("x"))
    batch = _batch(cfg, heads)
    if (row := gpu_only_row(case)) is not None:
        return row | dict(batch=batch)
    try:
        if case["impl"] == "fla":
            run = _fla_step(case, batch)
            err = None
        else:
            weights, args = _inputs(case, batch, cfg)
            step = _jax_step(case, cfg)
            compiled = step(case["impl"]).lower(weights, *args).compile()
            run = lambda: jax.block_until_ready(compiled(weights, *args))
            err = None
            if case["impl"] != "chunked":
                err = max_rel_err(run(), step("chunked")(weights, *args))
        first, times = repeat(run, cfg.iters, cfg.budget_s)
    except ImportError as e:
        return dict(case, batch=batch, status=f"not installed ({e.name})")
    median = statistics.median(times)
    tokens = batch * case["seq"]
    flops = scan_flops_per_token(heads, dim, cfg.expansion * dim, case["depth"], case["chunk"]) * tokens
    flops *= 3 if case["mode"] == "fwdbwd" else 1
    return dict(
        case, batch=batch, status="ok", first_call_s=round(first, 3), median_s=round(median, 5),
        tokens_per_s=round(tokens / median, 1), tflops=round(flops / median / 1e12, 3),
        max_rel_err=None if err is None else float(f"{err:.2e}"),
    )


def table(rows: list[dict], peak: float | None) -> str:
    head = ("| depth | heads x d_h | chunk | tokens | batch | mode | matmuls | impl | tokens/s | TFLOP/s | % bf16 peak "
            "| vs chunked | max rel err vs chunked |")
    return speed_table(head, rows, peak, "chunked", ("depth", "heads", "chunk", "seq", "mode", "matmul"),
                       ("depth", "heads", "chunk", "seq", "batch", "mode", "matmul", "impl"))


def main(cfg: BenchConfig) -> list[dict]:
    return run_gpu_grid(__name__, cfg, SECTION, (
        f"Memory scan only, expansion {cfg.expansion}, bf16 inputs, float32 state; matmuls float32 or bf16 "
        "inputs with float32 accumulation (`matmul_dtype`); "
        "forward+backward = gradients of sum(y^2) w.r.t. state and inputs; FLOPs analytic (3x forward)."), table)


# Tiny shapes with Pallas interpreted: the whole benchmark on a CPU (scripts/bench_kernels.py --smoke).
SMOKE = dict(heads=("2x16",), chunks=(16,), seq_lens=(48,), depths=(2,), impls=("chunked", "pallas"),
             matmul_dtypes=("float32",), batch=1, interpret=True, iters=1)


if __name__ == "__main__":
    child_main(sys.argv, run_case, BenchConfig)
