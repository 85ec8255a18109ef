"""GPU/TPU benchmark of the memory-scan kernels: `chunked` (XLA) vs `pallas` (the Mosaic kernel on a TPU),
forward and forward+backward.

    python scripts/bench_kernels.py                 # the grid of issue 7 on the visible GPU
    python scripts/bench_kernels.py --write         # ... written to BENCHMARKS.md
    python scripts/bench_kernels.py --smoke         # tiny shapes, Pallas interpreted: runs on CPU

Shapes, batch and FLOP counts: `titans.train.bench.kernels`.
"""

from __future__ import annotations

from titans.train import cli
from titans.train.bench.common import add_grid_args, grid_values

GRID = {"heads": (str, "comma-separated <heads>x<head_dim>, e.g. 16x64,8x128"),
        "chunks": (int, "comma-separated chunk sizes, e.g. 16,64,256"),
        "seq_lens": (int, "comma-separated token counts, e.g. 8192,65536"),
        "depths": (int, "comma-separated memory depths, e.g. 2,1"),
        "impls": (str, "comma-separated: chunked,pallas,fla"),
        "modes": (str, "comma-separated: fwd,fwdbwd"),
        "matmul_dtypes": (str, "comma-separated: float32,bfloat16")}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes with Pallas interpreted (CPU)")
    p.add_argument("--batch", type=int, help="rows per step (default: batch x heads >= 2 x SMs)")
    add_grid_args(p, GRID)
    args = p.parse_args(argv)

    from titans.train.bench import kernels

    kw = dict(kernels.SMOKE) if args.smoke else {}
    kw |= grid_values(args, GRID) | ({"batch": args.batch} if args.batch is not None else {})
    return kernels.main(kernels.BenchConfig(**kw))


if __name__ == "__main__":
    cli.run("bench_kernels", main)
