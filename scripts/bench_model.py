"""Throughput and peak memory of the Titans models: training steps, streaming prefill and decode.

    python scripts/bench_model.py                    # quick: tiny, every variant, 1K tokens (~2 min)
    python scripts/bench_model.py --full --write     # tiny and small at 1K/4K/16K, prefill 8K and 64K,
                                                     # decode after 16K (old loop; compiled loop at
                                                     # batch 1 and 16); written to BENCHMARKS.md

What each mode times: `titans.train.bench.model`. Run from the checkout (BENCHMARKS.md).
"""

from __future__ import annotations

from titans.train import cli
from titans.train.bench.common import add_grid_args, grid_values

GRID = {"presets": (str, "comma-separated preset names, e.g. tiny,small"),
        "variants": (str, "comma-separated: swa,lmm,mag,mal,mac"),
        "modes": (str, "comma-separated: train,prefill,decode,generate"),
        "decode_contexts": (int, "context lengths before decoding, multiples of --piece"),
        "decode_batches": (int, "rows of the compiled decode loop (generate), e.g. 1,16"),
        "seq_lens": (int, "training lengths, e.g. 1024,4096"),
        "prefill_lens": (int, "prefill lengths, multiples of --piece")}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--full", action="store_true", help="tiny and small, 1K/4K/16K, prefill 8K/64K, decode after 16K")
    p.add_argument("--piece", type=int, default=2048)
    add_grid_args(p, GRID)
    args = p.parse_args(argv)

    from titans.train.bench import model

    kw = {}
    if args.full:
        kw.update(presets=("tiny", "small"), seq_lens=(1024, 4096, 16384), prefill_lens=(8192, 65536),
                  decode_contexts=(16384,), decode_batches=(1, 16))
    kw |= grid_values(args, GRID)
    return model.main(model.BenchModelConfig(piece=args.piece, **kw))


if __name__ == "__main__":
    cli.run("bench_model", main)
