"""Can a model learn to recall at all? A dense copy task, trained from scratch, at a chosen gap.

    python scripts/recall_probe.py --config niah --set model.variant=swa --gap 0
    python scripts/recall_probe.py --config niah --set model.variant=lmm --gap 256 --steps 1500

Every row is a chain of episodes `KEY<filler> = KEY. ` where KEY is 8 random digits and the
filler is `gap` bytes of the grass/sky/sun noise (`train/data/niah.py`, `recall_row`: the rows
that `data.recall_fraction` mixes into training). The first copy of KEY is
unpredictable, the second is a recall over `gap + 11` bytes: with the gap past the attention
window only the memory can carry it. This isolates the skill a needle task needs from the few
answer tokens per row that make retrieval so slow to learn in `configs/niah.yaml`, so a model
that cannot learn it here will not pass needle tests at this budget.

Reported every `--log-every` steps on fresh rows: the loss on the recalled digits (nats; chance is
ln 10 = 2.30) and their top-1 accuracy (chance 10%). Loss weights are 1 on the recalled digits
and `--other-weight` elsewhere. Writes `OUT/probe.jsonl`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from titans.config import ConfigError  # noqa: E402
from titans.model import TitansLM  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.data import niah  # noqa: E402
from train.trainer import make_optimizer, train_step  # noqa: E402

def episode_rows(rng: np.random.Generator, batch: int, seq_len: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens `[batch, seq_len + 1]` int32 and `recalled [batch, seq_len]`: target t + 1 is a recalled digit."""
    rows = [niah.recall_row(rng, seq_len + 1, gap, gap) for _ in range(batch)]
    return np.stack([t for t, _ in rows]), np.stack([m for _, m in rows])[:, 1:]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="niah", help="preset name or YAML file (its model and optimizer)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--gap", type=int, default=0, help="filler bytes between a key and its recall")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--other-weight", type=float, default=1.0, help="loss weight of the tokens that are not recalled")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for probe.jsonl (default runs/probe-<variant>-gap<gap>)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    if args.gap < 0 or args.steps < 1 or args.batch < 1 or args.other_weight < 0:
        raise ValueError("--gap and --other-weight must be >= 0, --steps and --batch >= 1")
    if args.seq_len < 2 * (args.gap + 2 * niah.RECALL_KEY_LEN + 5):
        raise ValueError(f"--seq-len {args.seq_len} holds less than two episodes of gap {args.gap}: "
                         f"use --seq-len >= {2 * (args.gap + 2 * niah.RECALL_KEY_LEN + 5)}")
    run = load_run_config(args.config, args.overrides)
    model = TitansLM(run.model, rngs=nnx.Rngs(args.seed))
    tx, _ = make_optimizer(dataclasses.replace(run.train, steps=args.steps, warmup_steps=min(20, args.steps - 1)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def measure(model, tokens, recalled):
        logits = model(tokens[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
        hit = jnp.argmax(logits, axis=-1) == tokens[:, 1:]
        count = jnp.sum(recalled)
        return jnp.sum(jnp.where(recalled, nll, 0)) / count, jnp.sum(jnp.where(recalled, hit, 0)) / count

    out = Path(args.out or f"runs/probe-{run.model.variant}-gap{args.gap}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    held_out = episode_rows(np.random.default_rng(args.seed + 10_000), args.batch, args.seq_len, args.gap)
    rows, t0 = [], time.perf_counter()
    with (out / "probe.jsonl").open("w") as log:
        for i in range(1, args.steps + 1):
            tokens, recalled = episode_rows(rng, args.batch, args.seq_len, args.gap)
            weights = np.where(recalled, 1.0, args.other_weight).astype(np.float32)
            loss = train_step(model, optimizer, {"tokens": jnp.asarray(tokens), "weights": jnp.asarray(weights)})[0]
            if i % args.log_every == 0 or i == args.steps:
                nll, acc = measure(model, *map(jnp.asarray, held_out))
                row = {"step": i, "loss": round(float(loss), 4), "recall_nll": round(float(nll), 4),
                       "recall_acc": round(float(acc), 4), "seconds": round(time.perf_counter() - t0, 1)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"step {i}: recall nll {row['recall_nll']:.3f} (chance {math.log(10):.2f}), "
                      f"recall accuracy {100 * row['recall_acc']:.1f}%, {row['seconds']:.0f} s", flush=True)
                rows.append(row)
    return {"variant": run.model.variant, "gap": args.gap, **rows[-1]}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ConfigError, ValueError) as err:
        sys.exit(f"recall_probe: {err}")
