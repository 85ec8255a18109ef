"""The data path's speed and memory: tokenization MB/s, the token-store loader, and the peak RSS of
preparing and of training on a small and a large store.

    python scripts/bench_data.py                      # 50 MB and 2 GB stores (about 15 min, 5 GB of disk)
    python scripts/bench_data.py --store-mbs 50 --write

What each case measures: `titans.train.bench.data`. Run from the checkout (BENCHMARKS.md, scripts/).
"""

from __future__ import annotations

from titans.train import cli
from titans.train.bench.common import add_grid_args, grid_values

GRID = {"store_mbs": (int, "generated corpus sizes in MB of text, e.g. 50,2048"),
        "tokenizers": (str, "comma-separated: byte,bpe-32k"),
        "threads": (int, "tokenizer threads, e.g. 1,2")}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--work", default="/tmp/titans-bench-data", help="folder for the generated corpora and stores")
    add_grid_args(p, GRID)
    args = p.parse_args(argv)

    from titans.train.bench import data

    values = grid_values(args, GRID)
    values.pop("iters", None)
    return data.main(data.BenchDataConfig(work=args.work, **values))


if __name__ == "__main__":
    cli.run("bench_data", main)
