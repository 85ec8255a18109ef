"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv 2312.04927): how many
key-value pairs a model recalls, against its width and the size of its recurrent state.

A row follows Zoology's generator (`multiquery_ar`): `pairs` key-value pairs `k_1 v_1 ... k_P v_P`
(keys distinct, from ids [1, V/2); values distinct, from [V/2, V)), then the query region, where
each key appears once more, at an even offset drawn without replacement with probability
proportional to `gap ** (power - 1)` (power 0.01: short gaps are likelier), and every other token is
random in [0, V). The target after a queried key is its value, and only those `pairs` targets per
row are trained on and scored (Zoology's labels). One difference from Zoology: the value also follows its queried key in the input
(next-token training shifts targets into inputs); each key is queried once, so no query has seen
its own answer. With an attention window shorter than the row, pairs beyond the window of their
query can only be recalled through the memory.

`run_grid` trains each (row, width) from scratch (`titans.train.eval.recall.fit`) and reports the
held-out accuracy; `state_floats` is the recurrent state per layer that a row's model carries at
inference: the memory's weights and momentum, and the attention's key/value ring.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from titans.config import ModelConfig
from titans.train.config import RunConfig, load_run_config
from titans.train.eval.recall import fit

POWER = 0.01  # Zoology's power_a


@dataclasses.dataclass(frozen=True)
class Task:
    vocab: int
    seq_len: int  # the model's sequence: a row is seq_len + 1 tokens, its targets the last seq_len
    pairs: int

    def __post_init__(self):
        if self.pairs < 1:
            raise ValueError(f"MQAR needs pairs >= 1, got {self.pairs}")
        if self.vocab < 2 * self.pairs + 2:
            raise ValueError(f"{self.pairs} MQAR pairs need a vocabulary of at least {2 * self.pairs + 2} ids "
                             f"(distinct keys and values), got {self.vocab}")
        if self.seq_len < 4 * self.pairs:
            raise ValueError(f"an MQAR row of {self.seq_len} tokens cannot hold {self.pairs} pairs and their queries: "
                             f"use a length >= {4 * self.pairs}")


def rows(rng: np.random.Generator, task: Task, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens `[batch, seq_len + 1]` int32 and `scored [batch, seq_len]` (target t + 1 is a value)."""
    v, p, n = task.vocab, task.pairs, task.seq_len + 1
    space = (n - 2 * p) // 2  # query slots: even offsets of the query region
    weights = np.arange(1, space + 1) ** (POWER - 1.0)
    weights /= weights.sum()
    tokens = rng.integers(0, v, (batch, n)).astype(np.int32)
    scored = np.zeros((batch, n - 1), bool)
    for b in range(batch):
        keys = rng.choice(np.arange(1, v // 2), p, replace=False)
        values = rng.choice(np.arange(v // 2, v), p, replace=False)
        tokens[b, 0 : 2 * p : 2], tokens[b, 1 : 2 * p : 2] = keys, values
        at = 2 * p + 2 * rng.choice(space, p, replace=False, p=weights)
        tokens[b, at], tokens[b, at + 1] = keys, values
        scored[b, at] = True
    return tokens, scored


def state_floats(cfg: ModelConfig) -> int:
    """Floats of recurrent state per layer at inference: memory weights and momentum (variants with
    a memory), and the attention's key/value ring of `window` tokens (variants with attention)."""
    memory = 2 * cfg.memory.heads * sum(a * b for a, b in cfg.memory.layer_shapes()) if cfg.variant != "swa" else 0
    ring = 2 * cfg.window * cfg.attn_width if cfg.variant != "lmm" else 0
    return memory + ring


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]


ROWS = {r.name: r for r in (
    Row("swa", ("model.variant=swa",)),
    Row("lmm", ("model.variant=lmm",)),
    Row("lmm-linear", ("model.variant=lmm", "model.memory.depth=1")),
    Row("mag", ("model.variant=mag",)),
    Row("mac", ("model.variant=mac",)),
)}


def width_overrides(width: int, heads: int) -> tuple[str, ...]:
    """A model of `width`: d_model, and attention and memory heads of width / heads each (equal, as
    MAG and MAC need)."""
    if width % (2 * heads):
        raise ValueError(f"width {width} must be a multiple of 2 * heads ({2 * heads})")
    dim = width // heads
    return (f"model.d_model={width}", f"model.attn_heads={heads}", f"model.memory.heads={heads}",
            f"model.memory.head_dim={dim}")


def run_grid(config: str, names: tuple[str, ...], widths: tuple[int, ...], task: Task, out: Path, *, steps: int,
             batch: int, heads: int = 2, seed: int = 0, overrides=(), log: Callable[[str], None] = print) -> list[dict]:
    """Train every (row, width) not yet done into `out/<row>-d<width>` and score it on held-out rows:
    one result each (row, width, params, state_floats, accuracy, nll). Writes `out/results.json`."""
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown MQAR row {unknown[0]!r}: choose from {', '.join(ROWS)}")
    from titans.model import count_params

    plan = []  # width by width, so that a grid cut short has every row at the smaller widths
    for width in widths:
        for name in names:
            run: RunConfig = load_run_config(config, (*overrides, *ROWS[name].overrides,
                                                      *width_overrides(width, heads)), log)
            if run.model.vocab_size < task.vocab:
                raise ValueError(f"model.vocab_size {run.model.vocab_size} is below the task's vocabulary {task.vocab}")
            plan.append((name, width, run))
    results = []
    for name, width, run in plan:
        run_dir = out / f"{name}-d{width}"
        probe = run_dir / "probe.jsonl"
        done = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
        if not done or done[-1]["step"] != steps:
            log(f"mqar: {name}, width {width} -> {run_dir}")
            done = fit(run, run_dir, lambda rng: rows(rng, task, batch), name="mqar", chance=math.log(task.vocab // 2),
                       steps=steps, other_weight=0.0, log_every=max(steps // 4, 1), seed=seed, log=lambda line: None)
        last = done[-1]
        results.append({"row": name, "width": width, "params": count_params(run.model),
                        "state_floats": state_floats(run.model), "accuracy": last["mqar_acc"], "nll": last["mqar_nll"]})
        log(f"mqar: {name}, width {width}: accuracy {100 * last['mqar_acc']:.1f}%")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({"task": dataclasses.asdict(task), "steps": steps, "batch": batch, "results": results},
                              indent=1))
    os.replace(tmp, out / "results.json")
    return results


def markdown(results: list[dict]) -> str:
    """Accuracy % by row (rows) and width (columns), with each cell's state floats per layer."""
    widths = sorted({r["width"] for r in results})
    names = list(dict.fromkeys(r["row"] for r in results))
    lines = ["| row | " + " | ".join(f"d_model {w}: accuracy % (state floats / layer)" for w in widths) + " |",
             "|---|" + "---:|" * len(widths)]
    for name in names:
        cells = {r["width"]: r for r in results if r["row"] == name}
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * cells[w]['accuracy']:.1f} ({cells[w]['state_floats']:,})" if w in cells else "" for w in widths)
            + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
    """Accuracy against recurrent state floats per layer (log scale), one line per row, as Zoology
    plots accuracy against model width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in dict.fromkeys(r["row"] for r in results):
        got = sorted((r for r in results if r["row"] == name), key=lambda r: r["state_floats"])
        ax.plot([r["state_floats"] for r in got], [100 * r["accuracy"] for r in got], marker="o", label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # "2x10^3 3x10^3 ..." labels overlap
    ax.set_xlabel("recurrent state per layer (floats)")
    ax.set_ylabel("MQAR accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
