"""Run a needle-in-a-haystack grid on a model: tasks x lengths x depths x samples.

Each batch of prompts goes through `titans.generate`: streamed in pieces (state and memory stay
constant at any length), then the answer decoded greedily in one compiled loop that stops at the
end of the answer's line. Rows of the same task and length run as one batch.
`evaluate` runs a whole grid and writes its results folder (scripts/niah.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from titans.model import count_params
from titans.sampling import generate
from titans.train.data import needles
from titans.train.data.corpus import load_split, read_documents


@dataclasses.dataclass(frozen=True)
class Grid:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int = 1
    seed: int = 0

    def __post_init__(self):
        for task in self.tasks:
            needles.check_task(task)
        if not self.lengths or not self.depths or self.samples < 1:
            raise ValueError("a grid needs at least one length, one depth and samples >= 1")
        for depth in self.depths:
            if not 0 <= depth <= 1:
                raise ValueError(f"depths must lie in [0, 1], got {depth}")

    def cells(self) -> list[tuple[str, int]]:
        return [(task, length) for task in self.tasks for length in self.lengths]

    def rows(self, task: str, length: int) -> list[tuple[float, int]]:
        """(depth, sample seed) of every sample of one cell; seeds differ per task, length, depth, sample."""
        t = tuple(needles.TASKS).index(task)
        return [(d, int(np.random.default_rng([self.seed, t, length, i, s]).integers(2**31)))
                for i, d in enumerate(self.depths) for s in range(self.samples)]

    def total_tokens(self) -> int:
        return sum(length * len(self.depths) * self.samples for _, length in self.cells())


def check_lengths(grid: Grid, tokenizer) -> None:
    """Fail before any work when a length cannot hold a task's prompt."""
    for task in grid.tasks:
        need = needles.fixed_size(task, tokenizer)
        short = [n for n in grid.lengths if n < need]
        if short:
            raise ValueError(f"length {short[0]} is below the {task} prompt's fixed size: use lengths >= {need}")


def run(model, tokenizer, grid: Grid, *, haystack: np.ndarray | None, batch: int = 4, piece: int = 4096,
        on_tokens: Callable[[int], None] | None = None) -> Iterator[dict]:
    """Yields one result per sample: task, length, depth, seed, needle_at, expected, got, correct,
    seconds (its batch's wall time shared by its rows)."""
    check_lengths(grid, tokenizer)
    for task, length in grid.cells():
        rows = grid.rows(task, length)
        max_new = needles.MAX_NEW_TOKENS[needles.TASKS[task].value]
        newline = tokenizer.encode("\n")
        stop = newline if len(newline) == 1 else []  # the answer is its first line
        for i in range(0, len(rows), batch):
            samples = [needles.make_sample(task, length, d, s, tokenizer, haystack) for d, s in rows[i : i + batch]]
            t0 = time.perf_counter()
            new = generate(model, np.stack([s.tokens for s in samples]), max_new, prefill_piece=piece,
                           stop_tokens=stop)
            seconds = (time.perf_counter() - t0) / len(samples)
            if on_tokens is not None:
                on_tokens(length * len(samples))
            for sample, ids in zip(samples, new):
                got = tokenizer.decode(ids).split("\n")[0]
                yield {"task": task, "length": length, "depth": sample.depth, "seed": sample.seed,
                       "needle_at": sample.needle_at, "expected": sample.expected, "got": got,
                       "correct": needles.score(task, sample.expected, got), "seconds": round(seconds, 3)}


def accuracy_table(results: list[dict]) -> dict[str, dict[int, float]]:
    """task -> length -> accuracy in %."""
    cells = defaultdict(list)
    for r in results:
        cells[r["task"], r["length"]].append(r["correct"])
    table = defaultdict(dict)
    for (task, length), hits in sorted(cells.items()):
        table[task][length] = 100.0 * sum(hits) / len(hits)
    return dict(table)


def depth_grid(results: list[dict], task: str) -> tuple[list[float], list[int], np.ndarray]:
    """(depths, lengths, accuracy [depth, length] in %) of one task, NaN where nothing ran."""
    rows = [r for r in results if r["task"] == task]
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    hits = np.zeros((len(depths), len(lengths)))
    counts = np.zeros_like(hits)
    for r in rows:
        i, j = depths.index(r["depth"]), lengths.index(r["length"])
        hits[i, j] += r["correct"]
        counts[i, j] += 1
    with np.errstate(invalid="ignore"):
        return depths, lengths, 100.0 * hits / counts


def format_length(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_length(text: str) -> int:
    """"4096", "4K" (4096) or "2M" (2,097,152)."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    if not number.isdigit() or int(number) < 1:
        raise ValueError(f"length {text!r} is not a positive count such as 4096, 4K or 2M")
    return int(number) * scale


def markdown(results: list[dict], title: str) -> str:
    """Accuracy by task x length, then each task's depth x length grid."""
    table = accuracy_table(results)
    lengths = sorted({r["length"] for r in results})
    lines = [f"### {title}", "", "| task | " + " | ".join(format_length(n) for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for task, row in table.items():
        lines.append(f"| {task} | " + " | ".join(f"{row[n]:.0f}" if n in row else "" for n in lengths) + " |")
    for task in table:
        depths, task_lengths, grid = depth_grid(results, task)
        lines += ["", f"{task}, accuracy % by needle depth (rows) and length (columns):", "",
                  "| depth | " + " | ".join(format_length(n) for n in task_lengths) + " |",
                  "|---|" + "---:|" * len(task_lengths)]
        for depth, row in zip(depths, grid):
            lines.append(f"| {depth:.0%} | " + " | ".join("" if np.isnan(v) else f"{v:.0f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def heatmap(results: list[dict], path, title: str) -> None:
    """A depth x length accuracy heatmap per task (one panel each), like the published NIAH plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(accuracy_table(results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 + 3.4 * len(tasks), 3.6), squeeze=False,
                             gridspec_kw={"wspace": 0.4})
    for ax, task in zip(axes[0], tasks):
        depths, lengths, grid = depth_grid(results, task)
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_title(task)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy %")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_depths(text: str) -> tuple[float, ...]:
    """A count of evenly spaced depths 0..1 (`"5"`; one depth is 0.5) or a comma list of fractions."""
    if "," not in text and text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise ValueError(f"--depths {text}: need at least one depth")
        return tuple(float(d) for d in np.linspace(0, 1, count)) if count > 1 else (0.5,)
    try:
        return tuple(float(d) for d in text.split(","))
    except ValueError:
        raise ValueError(f"--depths {text!r} is neither a count nor a comma list of fractions") from None


def load_haystack(tokenizer, tasks, path: str | None = None) -> tuple[np.ndarray | None, str]:
    """The real-text haystack's tokens and name (None for tasks that use noise only): `path` (a text
    file or a folder of documents), or the default corpus's held-out Austen text."""
    if all(needles.TASKS[t].haystack == "noise" for t in tasks):
        return None, "noise"
    if path:
        source = Path(path)
        if not source.exists():
            raise FileNotFoundError(f"--haystack {source} does not exist")
        texts, name = ([source.read_text()] if source.is_file() else [t for _, t in read_documents(source)]), str(source)
    else:
        texts, name = load_split("default", lambda s: print(s, file=sys.stderr))[1], "held-out Austen (6 novels)"
    tokens = np.asarray(tokenizer.encode(needles.normalise(" ".join(texts))), np.int32)
    if len(tokens) == 0:
        raise ValueError(f"the haystack {name} is empty")
    return tokens, name


def evaluate(model, tokenizer, grid: Grid, out: Path, *, source: str, haystack: np.ndarray | None,
             haystack_name: str, batch: int = 4, piece: int = 4096, progress: bool = True) -> tuple[dict, str]:
    """Run `grid` and write `out`/results.json (every sample; written atomically), results.md and,
    with matplotlib, heatmap.png. Returns the summary (accuracy, tokens/s, peak RSS) and the markdown."""
    if batch < 1 or piece < 1:
        raise ValueError("--batch and --piece must be >= 1")
    check_lengths(grid, tokenizer)
    cfg = model.config
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{source}: {cfg.variant}, {count_params(cfg) / 1e6:.1f}M parameters, {tokenizer.name} tokenizer, "
             f"haystack {haystack_name}, chunk {cfg.memory.chunk_size}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=grid.total_tokens(), unit="tok", unit_scale=True, desc="niah", dynamic_ncols=True)
    results, t0 = [], time.perf_counter()
    try:
        for row in run(model, tokenizer, grid, haystack=haystack, batch=batch, piece=piece,
                       on_tokens=bar.update if bar is not None else None):
            results.append(row)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    summary = {"model": source, "variant": cfg.variant, "params": count_params(cfg), "tokenizer": tokenizer.name,
               "haystack": haystack_name, "chunk_size": cfg.memory.chunk_size, "piece": piece, "batch": batch,
               "seconds": round(seconds, 1), "tokens_per_s": round(grid.total_tokens() / seconds, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "accuracy": accuracy_table(results)}
    table = markdown(results, title)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({**summary, "samples": results}, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(table)
    try:
        heatmap(results, out / "heatmap.png", title)
    except ImportError:
        print("heatmap skipped: matplotlib is not installed (pip install -e '.[plots]')", file=sys.stderr)
    return summary, table
