"""The paper's ablations at small scale: one training run per (row, seed), held-out bits per byte.

A row is a name and the `section.field=value` overrides it puts on the base config (`configs/
ablate.yaml`: 2048-byte rows, 8x the attention window); every row trains the same steps on the same
tokens (the data order depends on the seed only), so rows differ by the model alone. The table gives
each row's mean held-out bits per byte on Austen over its seeds, the spread (max - min), the
parameter count and the training tokens/s. Runs go to `OUT/<row>/seed<N>`; a finished run is read
back, not retrained, so an interrupted grid continues where it stopped (scripts/ablate.py).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Callable

from titans.model import count_params
from titans.train.config import Diverged, TrainError, load_run_config

DIVERGED = "diverged.txt"  # a run folder's note that its loss diverged: the grid records it and moves on


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    paper: str  # the row's perplexity in the paper's ablation (Behrouz et al. 2024, v1 Table 5, 400M models)


def _memory(**fields) -> tuple[str, ...]:
    return tuple(f"model.memory.{k}={v}" for k, v in fields.items())


ROWS = {r.name: r for r in (
    Row("swa", ("model.variant=swa",), "not in Table 5"),
    Row("lmm", ("model.variant=lmm",), "27.01 (the row the ablations change)"),
    Row("mag", ("model.variant=mag",), "25.70"),
    Row("mal", ("model.variant=mal",), "25.91"),
    Row("mac", ("model.variant=mac",), "26.67"),
    Row("lmm-no-momentum", ("model.variant=lmm", *_memory(momentum=False)), "28.98"),
    Row("lmm-no-decay", ("model.variant=lmm", *_memory(decay=False)), "29.04"),
    Row("lmm-no-conv", ("model.variant=lmm", *_memory(conv_kernel=1)), "28.73"),
    Row("lmm-constant-gates", ("model.variant=lmm", *_memory(data_gates=False)), "not in Table 5"),
    Row("lmm-linear", ("model.variant=lmm", *_memory(depth=1)), "28.49"),
    Row("lmm-depth3", ("model.variant=lmm", *_memory(depth=3)), "not in Table 5 (section 5.5: deeper is better)"),
    Row("lmm-residual-norm", ("model.variant=lmm", *_memory(residual_norm=True)),
        "the paper's memory has residual + LayerNorm"),
    Row("lmm-mean-loss", ("model.variant=lmm", *_memory(inner_loss="mean")), "not in the paper (titans-pytorch's)"),
    Row("mac-no-persistent", ("model.variant=mac", "model.n_persistent=0"), "27.63 (w/o persistent memory)"),
)}


def check_rows(names) -> tuple[Row, ...]:
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown ablation row {unknown[0]!r}: choose from {', '.join(ROWS)}")
    return tuple(ROWS[n] for n in names)


def final_eval(run_dir: Path, steps: int) -> dict | None:
    """The run's held-out result at `steps` and its median training tokens/s, or None if it has not
    got there."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    done = [r for r in rows if r.get("step") == steps and "valid_bpb" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # the first step compiles
    if not done:
        return None
    return {"valid_bpb": done[-1]["valid_bpb"], "tokens_per_s": statistics.median(speed) if speed else float("nan")}


def run_grid(config: str, rows: tuple[Row, ...], seeds: tuple[int, ...], out: Path, *, overrides=(),
             train_fn: Callable | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Train every (row, seed) not yet done into `out/<row>/seed<N>`; one result per pair: row, seed,
    params, valid_bpb, tokens_per_s."""
    if train_fn is None:
        from titans.train.trainer import train as train_fn
    # Every config is checked before the first run; seed by seed, so that a grid cut short has every row.
    runs = [(row, seed, load_run_config(config, (*overrides, *row.overrides, f"train.seed={seed}"), log))
            for seed in seeds for row in rows]
    results = []
    for row, seed, run in runs:
        run_dir = out / row.name / f"seed{seed}"
        diverged = run_dir / DIVERGED
        got = final_eval(run_dir, run.train.steps) or (
            {"diverged": diverged.read_text()} if diverged.exists() else None)
        if got is None:
            log(f"ablate: {row.name} seed {seed} -> {run_dir}")
            try:
                summary = train_fn(run, run_dir, progress=False, log=lambda line: None)
            except Diverged as err:  # a result of the row, not a failure of the grid
                diverged.write_text(str(err).split(";")[0])
                summary = {}
            got = final_eval(run_dir, run.train.steps) or (
                {"diverged": diverged.read_text()} if diverged.exists() else None)
            if got is None:  # stopped by a signal (saved): the same command continues it
                raise TrainError(f"{run_dir}: {summary['status']}; rerun the same command to continue the grid")
        results.append({"row": row.name, "seed": seed, "params": count_params(run.model), **got})
        log(f"ablate: {row.name} seed {seed}: " + (f"{got['valid_bpb']:.4f} bits per byte" if "valid_bpb" in got
                                                    else got["diverged"]))
    return results


def markdown(results: list[dict], rows: tuple[Row, ...]) -> str:
    """Row | params | held-out bpb mean | spread over seeds | per seed | tokens/s | the paper's perplexity."""
    lines = ["| row | params | held-out bits/byte (mean) | spread (max - min) | per seed | tokens/s | "
             "the paper (v1 Table 5, perplexity) |",
             "|---|---:|---:|---:|---|---:|---|"]
    for row in rows:
        got = [r for r in results if r["row"] == row.name]
        if not got:
            continue
        bpb = [r["valid_bpb"] for r in got if "valid_bpb" in r]
        seeds = ", ".join(f"{r['valid_bpb']:.4f}" if "valid_bpb" in r else f"diverged ({r['diverged']})" for r in got)
        stats = f"{statistics.mean(bpb):.4f} | {max(bpb) - min(bpb):.4f}" if bpb else " | "
        speed = [r["tokens_per_s"] for r in got if "tokens_per_s" in r]
        lines.append(f"| {row.name} | {got[0]['params']:,} | {stats} | {seeds} | "
                     f"{f'{statistics.median(speed):.0f}' if speed else ''} | {row.paper} |")
    return "\n".join(lines) + "\n"
