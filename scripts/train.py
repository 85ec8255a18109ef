"""Train a Titans model: `python scripts/train.py [--config small] [--set section.field=value ...]`.

Rerunning the same command with the same --out resumes from its newest checkpoint. SIGTERM or
Ctrl-C saves and exits. See train/trainer.py for what the run folder holds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# This script is named like the package `train`: take its folder off the import path so that
# `import train` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from titans.config import ConfigError  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.data.corpus import CorpusError  # noqa: E402
from train.trainer import TrainError, train  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="small", help="preset name (tiny, small, 170m, ...) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set model.variant=swa (repeatable)")
    p.add_argument("--out", help="run folder (default runs/<config>-<variant>)")
    p.add_argument("--steps", type=int, help="total steps (default: train.steps of the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (automatic when JAX_COORDINATOR_ADDRESS is set)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    run = load_run_config(args.config, args.overrides)
    if args.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        import jax

        jax.distributed.initialize()  # detects SLURM / TPU pods / Open MPI, or reads JAX_* variables
    out = Path(args.out or f"runs/{Path(str(args.config)).stem}-{run.model.variant}")
    summary = train(run, out, steps=args.steps, progress=not args.no_progress)
    line = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items() if k != "sample")
    print(f"{out}: {line}")
    if "sample" in summary:
        print(f"sample:\n{summary['sample']}")
    return summary


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ConfigError, CorpusError, TrainError, ValueError) as err:
        sys.exit(f"train: {err}")
