"""Train a Titans model: `python scripts/train.py [--config small] [--set section.field=value ...]`.

Rerunning the same command with the same --out resumes from its newest checkpoint. SIGTERM or
Ctrl-C saves and exits with 128 + the signal's number (143, 130): a scheduler sees "stopped, run me
again", not "done" (0) or "failed" (1). `titans.train.run_dir` says what the run folder holds.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from titans.train import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    cli.add_config_args(p)
    p.add_argument("--out", help="run folder (default runs/<config>-<variant>)")
    p.add_argument("--steps", type=int, help="total steps (default: train.steps of the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--distributed", action="store_true",
                   help="several processes, found by JAX (SLURM, TPU pod slices, Open MPI); automatic when "
                        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are set (README, Several hosts)")
    args = p.parse_args(argv)

    from titans.train import hosts
    from titans.train.config import load_run_config
    from titans.train.trainer import train

    run = load_run_config(args.config, args.overrides)
    hosts.split_cpu_cores(run.train.batch_size, run.train.grad_accum, args.distributed)
    hosts.initialize(args.distributed, run.train.heartbeat_timeout)
    out = Path(args.out or f"runs/{Path(str(args.config)).stem}-{run.model.variant}")
    summary = train(run, out, steps=args.steps, progress=not args.no_progress)
    if hosts.is_main():  # one report for the run, not one per process
        line = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                         if k != "sample")
        print(f"{out}: {line}")
        if "sample" in summary:
            print(f"sample:\n{summary['sample']}")
    return summary


if __name__ == "__main__":
    summary = cli.run("train", main)
    if "signal" in summary:
        sys.exit(128 + signal.Signals[summary["signal"]].value)
