"""Compare training runs: `python scripts/report_runs.py runs/small-swa runs/small-mac [--write SECTION]`.

Prints (and with --write, puts into BENCHMARKS.md under SECTION) a markdown table of each run's
training loss, held-out loss and bits per byte at every evaluation, and tokens/s.
"""

from __future__ import annotations

from pathlib import Path

from titans.train import cli


def main(argv=None) -> str:
    p = cli.parser(__doc__)
    p.add_argument("runs", nargs="+")
    p.add_argument("--write", metavar="SECTION", help="write the table into BENCHMARKS.md under this section name")
    args = p.parse_args(argv)

    from titans.train.bench.runs import report

    text = report([Path(d) for d in args.runs], args.write)
    print(text)
    return text


if __name__ == "__main__":
    cli.run("report_runs", main)
