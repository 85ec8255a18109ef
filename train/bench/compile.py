"""Compile proof of the Triton kernels without a GPU: the kernels as JAX lowers them for CUDA,
compiled to PTX by the `triton` package's compiler and to machine code by `ptxas`.

Per kernel, shape and architecture (sm_80, sm_90a): seconds in Triton (TTIR -> TTGIR -> LLVM IR ->
PTX) and in ptxas, the PTX size, registers per thread, stack frame and spill stores/loads (bytes
per thread, from `ptxas -v`) and the shared memory Triton allocates against the architecture's
per-block limit. A stage that runs past `timeout_s` is reported as a timeout.

Kernels: the memory scan's forward, its recompute that saves the chunk-start states and its
backward (`kernels/memory/pallas.py`, from the gradient of `memory_scan`) and the sliding-window
attention's forward, dq and dk/dv kernels (`kernels/attention/pallas.py`, from the gradient of
`sliding_window_attention`). Shapes: a preset's memory and attention (`SHAPES`), the memory with
float32 or bf16 matmul inputs.

Each Triton compile runs in a child process (a timeout kills it); ptxas runs from the parent.
Needs the `triton` package (pip, no GPU) and a `ptxas` (the CUDA toolkit's, else the one
the triton wheel bundles). XLA feeds the same IR through its own copy of these passes on a GPU, so
the numbers are what a user's first step would compile, up to version differences.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from titans.train.bench.common import check_lists, child_main, command_line, machine_line, publish, run_in_child

SECTION = "bench_compile"

# Largest shared memory one block can opt into, bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# name: (preset, memory chunk size or None for the preset's). 170m is the paper's memory (head dim
# 64, expansion 4, depth 2, chunk 16); 340m and 760m share its memory shape.
SHAPES = {"small": ("small", None), "170m": ("170m", None), "170m-b64": ("170m", 64), "340m": ("340m", None)}
FAMILIES = ("memory", "attention")


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    shapes: tuple[str, ...] = ("small", "170m", "170m-b64")
    families: tuple[str, ...] = FAMILIES
    matmul_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # the memory's; attention has one
    archs: tuple[int, ...] = (80, 90)
    num_warps: tuple[int, ...] = ()  # () = each kernel's own (pallas.NUM_WARPS)
    timeout_s: float = 300.0
    ptxas: str = ""  # "" = find_ptxas()
    write: bool = False

    def __post_init__(self):
        check_lists(self, {"shapes": tuple(SHAPES), "families": FAMILIES,
                           "matmul_dtypes": ("float32", "bfloat16")})
        if set(self.archs) - set(SHARED_LIMIT) or any(w < 1 or w & (w - 1) for w in self.num_warps):
            raise ValueError(f"--archs must be among {sorted(SHARED_LIMIT)} and --num-warps powers of two")
        if self.timeout_s <= 0:
            raise ValueError("--timeout must be positive")


def find_ptxas(given: str = "") -> str | None:
    """`given`, else `ptxas` on PATH, the CUDA toolkit's, or the one bundled with the triton wheel."""
    candidates = [given] if given else [shutil.which("ptxas") or "", "/usr/local/cuda/bin/ptxas"]
    spec = importlib.util.find_spec("triton")
    if not given and spec and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "backends/nvidia/bin/ptxas"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


def versions(ptxas: str) -> str:
    """jaxlib, triton and ptxas versions (`machine_line` has jax's), one line."""
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release [\d.]+, V[\d.]+", out)
    return (f"jaxlib {importlib.metadata.version('jaxlib')}, triton {importlib.metadata.version('triton')}, "
            f"ptxas {release.group(0) if release else '?'} ({ptxas})")


def lowered_kernels(shape: str, family: str, matmul_dtype: str):
    """The `TritonKernel`s (`titans.kernels.lowering`) of one family at a named shape: the
    gradient's kernels, batch 1 and a few chunks / key blocks (the IR does not depend on either)."""
    import jax
    import jax.numpy as jnp

    from titans.config import load_preset
    from titans.kernels.attention import sliding_window_attention
    from titans.kernels.lowering import lower_for_cuda, memory_scan_specs, triton_kernels
    from titans.kernels.memory import MemoryState, memory_scan

    preset, chunk = SHAPES[shape]
    cfg = load_preset(preset)
    dtype = jnp.dtype(cfg.dtype)
    if family == "memory":
        mem = cfg.memory
        chunk = chunk or mem.chunk_size
        weights, args = memory_scan_specs(1, 4 * chunk, mem.heads, mem.head_dim, mem.expansion * mem.head_dim,
                                          mem.depth, dtype)

        def loss(weights, *args):
            y, _ = memory_scan(MemoryState.create(weights), *args, chunk_size=chunk, activation=mem.activation,
                               residual_norm=bool(mem.residual_norm), impl="pallas", interpret=False,
                               matmul_dtype=matmul_dtype)
            return jnp.sum(jnp.square(y.astype(jnp.float32)))

        return triton_kernels(lower_for_cuda(jax.grad(loss, argnums=tuple(range(7))), weights, *args))
    heads, block = cfg.attn_heads, cfg.attn_block
    head_dim = cfg.attn_head_dim or cfg.d_model // heads
    x = jax.ShapeDtypeStruct((1, 2 * block, heads, head_dim), dtype)
    slots = jax.ShapeDtypeStruct((cfg.n_persistent, heads, head_dim), jnp.float32)

    def attention_loss(q, k, v, k_p, v_p):
        y = sliding_window_attention(q, k, v, window=cfg.window, start=0, persistent=(k_p, v_p), block=block,
                                     impl="pallas", interpret=False)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    return triton_kernels(lower_for_cuda(jax.grad(attention_loss, argnums=tuple(range(5))), x, x, x, slots, slots))


def triton_to_ptx(case: dict, cfg: CompileConfig) -> dict:
    """Child process: Triton's pipeline on `case["ttir"]` (a file) up to PTX, the stages of
    `triton.compile` without its cache and without ptxas (timed apart, by the parent)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler.compiler import IRSource, make_backend
    from triton._C.libtriton import ir

    t0 = time.perf_counter()
    target = GPUTarget("cuda", case["arch"], 32)
    backend = make_backend(target)
    context = ir.context()
    source = IRSource(case["ttir"], context, backend)
    options = backend.parse_options({"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
    metadata = {"target": target, **options.__dict__}
    stages: dict = {}
    backend.add_stages(stages, options, source.language)
    module = source.make_ir(target, options, None, None, context)
    # From the TTIR stage itself (triton.compile skips it for a .ttir file): XLA runs these
    # cleanup passes on the IR JAX emits, and so does this.
    for ext, stage in stages.items():
        if ext == "cubin":
            break
        module = stage(module, metadata)
    ptx = Path(case["ttir"]).with_suffix(f".sm{case['arch']}.w{case['num_warps']}.ptx")
    ptx.write_text(module)
    return dict(ptx=str(ptx), triton_s=round(time.perf_counter() - t0, 2), shared=metadata["shared"],
                gpu_name=sm_arch_from_capability(case["arch"]))


_PTXAS_STATS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
}


def run_ptxas(ptxas: str, ptx: str, gpu_name: str, timeout_s: float) -> dict:
    """`ptxas -v` as Triton calls it (line info, fused multiply-add): seconds and the per-thread stats."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={gpu_name}", ptx, "-o", ptx + ".cubin"],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(status=f"ptxas timeout (> {timeout_s:.0f} s)")
    seconds = round(time.perf_counter() - t0, 2)
    if proc.returncode:
        return dict(status=f"ptxas failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}", ptxas_s=seconds)
    stats = {key: int(m.group(1)) for key, pat in _PTXAS_STATS.items() if (m := re.search(pat, proc.stderr))}
    return dict(status="ok", ptxas_s=seconds, **stats)


def compile_kernel(kernel, arch: int, num_warps: int, cfg: CompileConfig, workdir: Path, ptxas: str) -> dict:
    """One lowered kernel (`TritonKernel`) for one architecture: Triton in a child, then ptxas."""
    ttir = workdir / f"{kernel.name}.ttir"
    ttir.write_text(kernel.ttir)
    case = dict(ttir=str(ttir), arch=arch, num_warps=num_warps, num_stages=kernel.num_stages)
    row = dict(kernel=kernel.name, arch=arch, num_warps=num_warps)
    out = run_in_child(__name__, case, dataclasses.asdict(cfg), timeout_s=cfg.timeout_s)
    if "ptx" not in out:
        return row | dict(status=out["status"].replace("timeout", "triton timeout"))
    ptx = Path(out["ptx"]).read_text()
    row |= dict(triton_s=out["triton_s"], shared=out["shared"], ptx_kb=round(len(ptx) / 1024),
                ptx_lines=ptx.count("\n"))
    return row | run_ptxas(ptxas, out["ptx"], out["gpu_name"], cfg.timeout_s)


def cases(cfg: CompileConfig):
    """(shape, family, matmul dtype) to lower: attention once per shape (it has no matmul dtype)."""
    for shape in cfg.shapes:
        for family in cfg.families:
            for mm in (cfg.matmul_dtypes if family == "memory" else ("-",)):
                yield shape, family, mm


def _kb(x) -> str:
    return f"{x / 1024:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| shape | kernel | matmuls | arch | warps | PTX KB | triton s | ptxas s | regs | stack B "
             "| spill st/ld B | shared KB / limit | status |", "|" + "---|" * 13]
    for r in rows:
        cells = [r["shape"], r["kernel"], r["matmul"], f"sm_{r['arch']}", r["num_warps"], r.get("ptx_kb", ""),
                 r.get("triton_s", ""), r.get("ptxas_s", ""), r.get("registers", ""), r.get("stack", "")]
        cells.append(f"{r['spill_stores']} / {r['spill_loads']}" if "spill_stores" in r else "")
        cells.append(f"{_kb(r['shared'])} / {_kb(SHARED_LIMIT[r['arch']])}" if "shared" in r else "")
        cells.append(verdict(r))
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def verdict(row: dict) -> str:
    """`ok`, or what is wrong with a compiled kernel (spills, shared memory) or why it did not compile."""
    problems = [row["status"]] if row["status"] != "ok" else []
    problems += ["spills"] if row.get("spill_stores") or row.get("spill_loads") else []
    problems += ["shared memory over the limit"] if row.get("shared", 0) > SHARED_LIMIT[row["arch"]] else []
    return ", ".join(problems) or "ok"


def run(cfg: CompileConfig, ptxas: str, log=print) -> list[dict]:
    """Every case of `cfg`, compiled one at a time with `ptxas`; returns the rows (also `log`ged as
    they finish)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="titans-compile-") as tmp:
        for shape, family, mm in cases(cfg):
            for kernel in lowered_kernels(shape, family, "float32" if mm == "-" else mm):
                for arch in cfg.archs:
                    for warps in cfg.num_warps or (kernel.num_warps,):
                        row = dict(shape=shape, matmul=mm) | compile_kernel(kernel, arch, warps, cfg, Path(tmp), ptxas)
                        log(json.dumps(row))
                        rows.append(row)
    return rows


def main(cfg: CompileConfig) -> list[dict]:
    ptxas = find_ptxas(cfg.ptxas)
    if ptxas is None:
        raise FileNotFoundError("no ptxas: install the CUDA toolkit or the triton wheel, or pass --ptxas")
    rows = run(cfg, ptxas, log=lambda line: print(line, file=sys.stderr, flush=True))
    text = (f"Command: {command_line()}  \n{machine_line()}; {versions(ptxas)}; timeout {cfg.timeout_s:.0f} s "
            "a stage  \nregs: registers per thread; stack, spills: bytes per thread (`ptxas -v`); shared: "
            "Triton's shared memory per block against the architecture's opt-in limit.\n\n" + table(rows))
    publish(text, SECTION if cfg.write else None)
    return rows


if __name__ == "__main__":
    child_main(sys.argv, triton_to_ptx, CompileConfig)
