"""Compare training runs (scripts/report_runs.py): a markdown table of each run's training loss
(mean over the logged steps of each window), held-out loss and bits per byte at every evaluation,
tokens/s and its model/variant, from the runs' metrics.jsonl and run.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from titans.train.bench.common import machine_line, write_section


def load(run_dir: Path) -> tuple[dict, list[dict]]:
    run = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return run, rows


def table(run_dirs: list[Path]) -> str:
    runs = {d: load(d) for d in run_dirs}
    evals = sorted({r["step"] for _, rows in runs.values() for r in rows if "valid_loss" in r})
    head = "| run | variant | params (preset) | tokens/s | " + " | ".join(f"step {s}: train / held-out loss, bpb" for s in evals) + " |"
    lines = [head, "|" + "---|" * (4 + len(evals))]
    for d, (run, rows) in runs.items():
        train = [r for r in rows if "loss" in r]
        speed = statistics.median(r["tokens_per_s"] for r in train[1:]) if len(train) > 1 else float("nan")
        cells = []
        for i, s in enumerate(evals):
            lo = evals[i - 1] if i else 0
            window = [r["loss"] for r in train if lo < r["step"] <= s]
            ev = next((r for r in rows if r.get("step") == s and "valid_loss" in r), None)
            cells.append(f"{statistics.mean(window):.3f} / {ev['valid_loss']:.3f}, {ev['valid_bpb']:.3f}"
                         if window and ev else "")
        model = run["model"]
        lines.append(f"| {d.name} | {model['variant']} | d_model {model['d_model']}, {model['n_layers']} blocks | "
                     f"{speed:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(run_dirs: list[Path], section: str | None = None) -> str:
    """The table with the machine line; with `section`, also written into BENCHMARKS.md there."""
    missing = [str(d) for d in run_dirs if not (d / "metrics.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"no metrics.jsonl in {', '.join(missing)}: pass run folders of scripts/train.py")
    text = f"Runs: {' '.join(map(str, run_dirs))}  \n{machine_line()}\n\n{table(run_dirs)}"
    if section:
        write_section(text, section)
    return text
