"""Can a model learn to recall at all? A dense copy task, trained from scratch, at a chosen gap.

    python scripts/recall_probe.py --config niah --set model.variant=swa --gap 0
    python scripts/recall_probe.py --config niah --set model.variant=lmm --gap 256 --steps 1500

Rows are chains of `KEY<filler> = KEY` episodes; it reports the loss and accuracy on the recalled
digits every --log-every steps and writes OUT/probe.jsonl (`titans.train.eval.recall`).
"""

from __future__ import annotations

from pathlib import Path

from titans.train import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    cli.add_config_args(p, default="niah")
    p.add_argument("--gap", type=int, default=0, help="filler bytes between a key and its recall")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--other-weight", type=float, default=1.0, help="loss weight of the tokens that are not recalled")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for probe.jsonl (default runs/probe-<variant>-gap<gap>)")
    args = p.parse_args(argv)

    from titans.train.config import load_run_config
    from titans.train.eval.recall import probe

    run = load_run_config(args.config, args.overrides)
    out = Path(args.out or f"runs/probe-{run.model.variant}-gap{args.gap}")
    rows = probe(run, out, gap=args.gap, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                 other_weight=args.other_weight, log_every=args.log_every, seed=args.seed,
                 log=lambda s: print(s, flush=True))
    return {"variant": run.model.variant, "gap": args.gap, **rows[-1]}


if __name__ == "__main__":
    cli.run("recall_probe", main)
