"""Can a model learn to recall at all? A dense copy task, trained from scratch, at a chosen gap
(scripts/recall_probe.py).

Every row is a chain of episodes `KEY<filler> = KEY. ` where KEY is 8 random digits and the
filler is `gap` bytes of the grass/sky/sun noise (`titans.train.data.needles.recall_row`: the rows
that `data.recall_fraction` mixes into training). The first copy of KEY is
unpredictable, the second is a recall over `gap + 11` bytes: with the gap past the attention
window only the memory can carry it. This isolates the skill a needle task needs from the few
answer tokens per row that make retrieval so slow to learn in `configs/niah.yaml`, so a model
that cannot learn it here will not pass needle tests at this budget.

Reported every `log_every` steps on fresh rows: the loss on the recalled digits (nats; chance is
ln 10 = 2.30) and their top-1 accuracy (chance 10%). Loss weights are 1 on the recalled digits
and `other_weight` elsewhere. Writes `out/probe.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.model import TitansLM
from titans.train.config import RunConfig
from titans.train.data import needles
from titans.train.steps import cross_entropy, make_optimizer, train_step


def episode_rows(rng: np.random.Generator, batch: int, seq_len: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens `[batch, seq_len + 1]` int32 and `recalled [batch, seq_len]`: target t + 1 is a recalled digit."""
    rows = [needles.recall_row(rng, seq_len + 1, gap, gap) for _ in range(batch)]
    return np.stack([t for t, _ in rows]), np.stack([m for _, m in rows])[:, 1:]


@nnx.jit
def _measure(model, tokens, recalled):
    """Mean loss and top-1 accuracy on the recalled digits of `tokens`."""
    logits, _ = model.run(tokens[:, :-1])
    nll = cross_entropy(logits, tokens[:, 1:])
    hit = jnp.argmax(logits, axis=-1) == tokens[:, 1:]
    count = jnp.sum(recalled)
    return jnp.sum(jnp.where(recalled, nll, 0)) / count, jnp.sum(jnp.where(recalled, hit, 0)) / count


def fit(run: RunConfig, out: Path, make_rows: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]], *,
        name: str, chance: float, steps: int, other_weight: float = 1.0, log_every: int = 50, seed: int = 0,
        log: Callable[[str], None] = print) -> list[dict]:
    """Train `run.model` from scratch on rows `make_rows(rng)` -> (tokens `[batch, seq_len + 1]`,
    scored `[batch, seq_len]`: target t + 1 is scored); loss weight 1 on the scored targets and
    `other_weight` elsewhere. Every `log_every` steps (and the last) it measures the loss and top-1
    accuracy on the scored targets of fixed held-out rows (drawn with seed + 10,000) and writes a
    row `{step, loss, <name>_nll, <name>_acc, seconds}` to `out/probe.jsonl`; returns the rows.
    `chance`: the loss of a uniform guess among the answers, for the log line."""
    if steps < 1 or other_weight < 0:
        raise ValueError("--steps must be >= 1 and --other-weight >= 0")
    model = TitansLM(run.model, rngs=nnx.Rngs(seed))
    tx, schedule = make_optimizer(dataclasses.replace(run.train, steps=steps, warmup_steps=min(20, steps - 1)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    held_out = tuple(map(jnp.asarray, make_rows(np.random.default_rng(seed + 10_000))))
    rows, t0 = [], time.perf_counter()
    with (out / "probe.jsonl").open("w") as jsonl:
        for i in range(1, steps + 1):
            tokens, scored = make_rows(rng)
            weights = np.where(scored, 1.0, other_weight).astype(np.float32)
            batch_arrays = {"tokens": jnp.asarray(tokens), "weights": jnp.asarray(weights)}
            loss = train_step(model, optimizer, batch_arrays, float(schedule(i - 1)))[0]
            if i % log_every == 0 or i == steps:
                nll, acc = _measure(model, *held_out)
                row = {"step": i, "loss": round(float(loss), 4), f"{name}_nll": round(float(nll), 4),
                       f"{name}_acc": round(float(acc), 4), "seconds": round(time.perf_counter() - t0, 1)}
                jsonl.write(json.dumps(row) + "\n")
                jsonl.flush()
                log(f"step {i}: {name} nll {float(nll):.3f} (chance {chance:.2f}), "
                    f"{name} accuracy {100 * float(acc):.1f}%, {row['seconds']:.0f} s")
                rows.append(row)
    return rows


def probe(run: RunConfig, out: Path, *, gap: int, steps: int = 600, batch: int = 8, seq_len: int = 512,
          other_weight: float = 1.0, log_every: int = 50, seed: int = 0,
          log: Callable[[str], None] = print) -> list[dict]:
    """Train `run.model` from scratch on recall episodes with fillers of `gap`; the logged rows."""
    if gap < 0 or batch < 1:
        raise ValueError("--gap must be >= 0 and --batch >= 1")
    if seq_len < 2 * (gap + 2 * needles.RECALL_KEY_LEN + 5):
        raise ValueError(f"--seq-len {seq_len} holds less than two episodes of gap {gap}: "
                         f"use --seq-len >= {2 * (gap + 2 * needles.RECALL_KEY_LEN + 5)}")
    return fit(run, out, lambda rng: episode_rows(rng, batch, seq_len, gap), name="recall", chance=math.log(10),
               steps=steps, other_weight=other_weight, log_every=log_every, seed=seed, log=log)
