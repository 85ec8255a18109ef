"""Outer-gradient norm at initialisation against sequence length, for memory settings side by side.

    python scripts/memory_stability.py --preset small --lengths 256,1024,4096

Prints one markdown row per memory setting (`titans.train.eval.stability`): the global gradient
norm of the next-token loss on random bytes at each length; one that grows with length means a
recurrence whose Jacobian expands (spec section 2, "Conditioning").
"""

from __future__ import annotations

from titans.train import cli


def main(argv=None) -> list[str]:
    p = cli.parser(__doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--variant", default="mac")
    p.add_argument("--lengths", default="256,1024,4096")
    args = p.parse_args(argv)

    from titans.train.eval import stability

    return stability.table(args.preset, args.variant, cli.split_list(args.lengths, int, "--lengths"),
                           emit=lambda row: print(row, flush=True))


if __name__ == "__main__":
    cli.run("memory_stability", main)
