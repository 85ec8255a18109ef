"""Compile proof of the Triton kernels without a GPU: Triton and ptxas seconds, registers, spills and
shared memory per kernel, shape and architecture (sm_80, sm_90a).

    python scripts/bench_compile.py                           # every shape; minutes to hours of CPU
    python scripts/bench_compile.py --shapes small            # the default preset's kernels
    python scripts/bench_compile.py --shapes 170m --families memory --num-warps 4,8 --archs 90
    python scripts/bench_compile.py --write                   # ... written to BENCHMARKS.md

Needs `pip install -e ".[gpu-compile]"` (triton; no GPU) and a ptxas (CUDA toolkit, else the triton wheel's).
Shapes and kernels: `titans.train.bench.compile`.
"""

from __future__ import annotations

from titans.train import cli
from titans.train.bench.common import add_grid_args, grid_values

GRID = {"shapes": (str, "comma-separated: small,170m,170m-b64,340m"),
        "families": (str, "comma-separated: memory,attention"),
        "matmul_dtypes": (str, "comma-separated memory matmul inputs: float32,bfloat16"),
        "archs": (int, "comma-separated compute capabilities: 80,90"),
        "num_warps": (int, "comma-separated warps per program to compile with (default: each kernel's own)")}


def main(argv=None):
    p = cli.parser(__doc__)
    add_grid_args(p, GRID, iters=False)
    p.add_argument("--timeout", type=float, help="seconds a Triton or ptxas stage may take (default 300)")
    p.add_argument("--ptxas", help="the ptxas to run (default: PATH, /usr/local/cuda/bin, the triton wheel's)")
    args = p.parse_args(argv)

    from titans.train.bench import compile as compile_bench

    kw = grid_values(args, GRID) | ({"timeout_s": args.timeout} if args.timeout else {})
    return compile_bench.main(compile_bench.CompileConfig(**kw, ptxas=args.ptxas or ""))


if __name__ == "__main__":
    cli.run("bench_compile", main)
