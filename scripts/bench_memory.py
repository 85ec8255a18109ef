"""Throughput and peak memory of the memory layer (training = forward + backward, and inference).

    python scripts/bench_memory.py                  # quick run (about a minute), prints a table
    python scripts/bench_memory.py --full --write   # the whole grid, written to BENCHMARKS.md
    python scripts/bench_memory.py --full --peer-python $PEER_VENV/bin/python --write
                                                    # + titans-pytorch back to back, with ratios

Shapes, FLOP counts and the peer comparison: `titans.train.bench.memory`. Run from the checkout
(BENCHMARKS.md and ../shared/peers are found from the working directory).
"""

from __future__ import annotations

from titans.train import cli
from titans.train.bench.common import add_grid_args, grid_values

GRID = {"heads": (str, "comma-separated <heads>x<head_dim>, e.g. 4x64,1x256"),
        "seq_lens": (int, "comma-separated token counts, e.g. 1024,4096"),
        "impls": (str, "comma-separated: chunked,reference"),
        "modes": (str, "comma-separated: train,infer")}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--full", action="store_true", help="heads 4x64 and 1x256 at 1K, 4K and 16K tokens")
    p.add_argument("--devices", type=int, default=1, help="host devices; memory heads are sharded over them")
    p.add_argument("--peer-python", help="python of a venv with titans-pytorch 0.5.5 (see ../shared/peers)")
    add_grid_args(p, GRID)
    args = p.parse_args(argv)

    from titans.train.bench import memory

    kw = dict(heads=("4x64", "1x256"), seq_lens=(1024, 4096, 16384)) if args.full else {}
    kw |= grid_values(args, GRID)
    return memory.main(memory.BenchConfig(devices=args.devices, peer_python=args.peer_python, **kw))


if __name__ == "__main__":
    cli.run("bench_memory", main)
