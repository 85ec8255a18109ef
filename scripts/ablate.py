"""The paper's ablations at small scale: `python scripts/ablate.py [--rows swa,lmm,...] [--seeds 0,1]`.

Trains every row of the grid (`titans.train.eval.ablate.ROWS`: the five variants, then lmm with one
part of its memory switched off or changed, and mac without persistent memory) for every seed, with
equal tokens per run, and prints the held-out bits per byte table (mean, spread over seeds, params,
tokens/s). Rerunning the same command continues an interrupted grid. Writes OUT/results.json and
OUT/results.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from titans.train import cli


def main(argv=None) -> str:
    p = cli.parser(__doc__)
    cli.add_config_args(p, default="ablate", help_extra="; applies to every row")
    p.add_argument("--rows", help="comma list of rows (default: all of them)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds; each row trains once per seed")
    p.add_argument("--out", default="runs/ablate", help="the grid's folder")
    args = p.parse_args(argv)

    from titans.train import hosts
    from titans.train.eval import ablate

    rows = ablate.check_rows(cli.split_list(args.rows, name="--rows") if args.rows else tuple(ablate.ROWS))
    seeds = cli.split_list(args.seeds, int, "--seeds")
    from titans.train.config import load_run_config

    base = load_run_config(args.config, args.overrides, log=lambda line: None)
    hosts.split_cpu_cores(base.train.batch_size, base.train.grad_accum)
    out = Path(args.out)
    results = ablate.run_grid(args.config, rows, seeds, out, overrides=args.overrides)
    table = ablate.markdown(results, rows)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    cli.run("ablate", main)
