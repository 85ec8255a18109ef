"""GPU/TPU benchmark of sliding-window attention: `blockwise` (XLA) vs the `pallas` flash kernel (the
Mosaic path on a TPU), forward and forward+backward, with cuDNN's windowed attention (no persistent
slots; GPU only) as a yardstick.

    python scripts/bench_attention.py              # the grid on the visible GPU
    python scripts/bench_attention.py --write      # ... written to BENCHMARKS.md
    python scripts/bench_attention.py --smoke      # tiny shapes, Pallas interpreted: runs on CPU

Shapes and FLOP counts: `titans.train.bench.attention`.
"""

from __future__ import annotations

from titans.train import cli
from titans.train.bench.common import add_grid_args, grid_values

GRID = {"heads": (str, "comma-separated <heads>x<head_dim>, e.g. 16x64,8x128"),
        "windows": (int, "comma-separated window lengths, e.g. 512,2048"),
        "seq_lens": (int, "comma-separated token counts, e.g. 8192,65536"),
        "impls": (str, "comma-separated: blockwise,pallas,cudnn"),
        "modes": (str, "comma-separated: fwd,fwdbwd")}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny shapes with Pallas interpreted (CPU)")
    p.add_argument("--block", type=int, help="query/key tile (default 128)")
    add_grid_args(p, GRID)
    args = p.parse_args(argv)

    from titans.train.bench import attention

    kw = dict(attention.SMOKE) if args.smoke else {}
    kw |= grid_values(args, GRID) | ({"block": args.block} if args.block is not None else {})
    return attention.main(attention.BenchConfig(**kw))


if __name__ == "__main__":
    cli.run("bench_attention", main)
