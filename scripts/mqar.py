"""Multi-query associative recall (Zoology's MQAR): `python scripts/mqar.py [--rows swa,lmm,...] [--widths 64,128]`.

Trains each row (a variant, or lmm with a linear memory) at each width from scratch on MQAR rows
(`titans.train.eval.mqar`) and prints the held-out accuracy by row and width, with each model's
recurrent state per layer. Writes OUT/results.json, OUT/results.md and OUT/accuracy.png (needs
matplotlib). Rerunning the same command reuses the runs that finished.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titans.train import cli


def main(argv=None) -> str:
    p = cli.parser(__doc__)
    cli.add_config_args(p, default="mqar", help_extra="; applies to every row")
    p.add_argument("--rows", default="swa,lmm,lmm-linear,mag,mac", help="comma list of rows")
    p.add_argument("--widths", default="64,128", help="comma list of d_model values")
    p.add_argument("--vocab", type=int, default=256, help="token ids: keys from the lower half, values from the upper")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--pairs", type=int, default=8, help="key-value pairs per row, each queried once")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/mqar")
    args = p.parse_args(argv)

    from titans.train.eval import mqar

    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")
    task = mqar.Task(args.vocab, args.seq_len, args.pairs)
    out = Path(args.out)
    results = mqar.run_grid(args.config, cli.split_list(args.rows, name="--rows"),
                            cli.split_list(args.widths, int, "--widths"), task, out, steps=args.steps,
                            batch=args.batch, seed=args.seed, overrides=args.overrides)
    table = mqar.markdown(results)
    (out / "results.md").write_text(table)
    title = (f"MQAR: vocab {task.vocab}, {task.seq_len} tokens, {task.pairs} pairs, {args.steps} steps of "
             f"{args.batch} rows")
    try:
        mqar.plot(results, out / "accuracy.png", title)
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[plots]')", file=sys.stderr)
    print(f"{title}\n\n{table}")
    return table


if __name__ == "__main__":
    cli.run("mqar", main)
