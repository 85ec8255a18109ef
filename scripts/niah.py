"""Needle-in-a-haystack evaluation, passkey, RULER-style S-NIAH-1/2/3 and BABILong-style
babi-qa1/qa2/count (train/data/babi.py), up to 2M tokens.

    python scripts/niah.py --checkpoint runs/niah-mac --tasks passkey,s-niah-2 --lengths 1K,4K,16K,64K
    python scripts/niah.py --model EXPORTED_DIR --tasks passkey --lengths 2M --depths 5
    python scripts/niah.py --preset tiny --lengths 1K,2K      # random weights: a smoke test
    python scripts/niah.py --checkpoint runs/niah-mac --tasks babi-qa1,babi-qa2,babi-count --lengths 1K,4K

Lengths count the model's tokens (bytes for the byte tokenizer); each prompt is exactly that long.
The real-text haystack (s-niah-2/3, babi-*) is the held-out Austen text of the default corpus
unless `--haystack FILE` is given. For the babi tasks the depth axis is how much of the filler the
story's facts spread over (1: all of it; 0: back to back at its start). Writes OUT/results.json
(every sample), OUT/results.md (accuracy by task x length and by depth x length) and
OUT/heatmap.png (needs matplotlib), and prints the table, tokens/s and the peak resident memory.
`--float64` runs the model in float64, to tell whether precision is what limits a length.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titans.train import cli
from titans.train.data.needles import TASKS
from titans.train.eval import niah


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    cli.add_model_args(p, preset=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="preset override (with --preset only)")
    p.add_argument("--tasks", default="passkey,s-niah-1,s-niah-2,s-niah-3", help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--lengths", default="1K,2K,4K,8K", help="comma list: 4096, 4K, 2M ...")
    p.add_argument("--depths", default="5", help="a count of evenly spaced depths 0..100%%, or a comma list of fractions")
    p.add_argument("--samples", type=int, default=1, help="samples per length and depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack",
                   help="a text file (or folder of .txt/.jsonl) for s-niah-2/3 and babi-* instead of Austen")
    p.add_argument("--batch", type=int, default=4, help="prompts of one length streamed together")
    p.add_argument("--piece", type=int, default=4096, help="prefill piece in tokens")
    p.add_argument("--out", help="results folder (default niah/<model name>)")
    p.add_argument("--float64", action="store_true",
                   help="run the model in float64 (parameters, state, compute): does precision limit a length?")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    tasks = cli.split_list(args.tasks, name="--tasks")
    grid = niah.Grid(tasks, cli.split_list(args.lengths, niah.parse_length, "--lengths"), niah.parse_depths(args.depths),
                     args.samples, args.seed)
    if args.batch < 1 or args.piece < 1:
        raise ValueError("--batch and --piece must be >= 1")
    model, tokenizer, source = cli.load_model(args, log=lambda s: print(s, file=sys.stderr))
    if args.float64:
        import jax

        from titans.model import recast

        jax.config.update("jax_enable_x64", True)  # this process only evaluates, so the switch is global
        model, source = recast(model, "float64", "float64"), f"{source}, float64"
    niah.check_lengths(grid, tokenizer)
    haystack, haystack_name = niah.load_haystack(tokenizer, tasks, args.haystack)
    out = Path(args.out or Path("niah") / Path(args.model or args.checkpoint or args.preset).name)
    summary, table = niah.evaluate(model, tokenizer, grid, out, source=source, haystack=haystack,
                                   haystack_name=haystack_name, batch=args.batch, piece=args.piece,
                                   progress=not args.no_progress)
    print(table)
    print(f"{grid.total_tokens():,} prompt tokens in {summary['seconds']:.1f} s ({summary['tokens_per_s']:,.0f} "
          f"tokens/s), peak RSS {summary['peak_rss_mb']:.0f} MB; results in {out}")
    return summary


if __name__ == "__main__":
    cli.run("niah", main)
