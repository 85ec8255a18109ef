"""What the benchmarks share: child processes (so a case's peak RSS is its own), timing, the machine
line and the atomic update of a BENCHMARKS.md section (the one in the working directory: run the
benchmarks from the checkout)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

BENCHMARKS = Path("BENCHMARKS.md")


# Dense bf16 peaks (TFLOP/s) by jax device_kind prefix (the first key that prefixes it): NVIDIA's
# datasheets; Google Cloud's TPU pages, per chip (v5e is "TPU v5 lite", v6e "TPU v6 lite").
BF16_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.4,
    "NVIDIA A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,  # v5p
    "TPU v6 lite": 918.0,
}
# Units that run programs in parallel, for a batch that fills the device: SMs of a GPU, TensorCores
# of a TPU chip (a Mosaic grid's "parallel" axes are split over them); 132 (H100 SXM) if unknown.
PARALLEL_UNITS = {"NVIDIA H100 80GB HBM3": 132, "NVIDIA H100 PCIe": 114, "NVIDIA H100 NVL": 132, "NVIDIA H200": 132,
                  "NVIDIA A100": 108, "TPU v4": 2, "TPU v5 lite": 1, "TPU v5": 2, "TPU v6 lite": 1}
# Impls of the benchmarks that exist on GPUs only (cuDNN; flash-linear-attention, PyTorch + Triton).
GPU_ONLY = ("cudnn", "fla")


def gpu_only_row(case: dict) -> dict | None:
    """The row of a GPU-only impl's case on another backend (a TPU runs the rest), else None."""
    import jax

    if case.get("impl") in GPU_ONLY and jax.default_backend() != "gpu":
        return dict(case, status=f"GPU only (this is {jax.default_backend()})")
    return None


def device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def lookup(table: dict, kind: str):
    """The entry of `table` whose key prefixes the device kind, or None."""
    return next((v for k, v in table.items() if kind.startswith(k)), None)


def max_rel_err(got, want) -> float:
    """max |got - want| / max(1, max |want|) over the leaves of two pytrees, in float64."""
    import jax
    import numpy as np

    return max(
        float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))))
        / max(1.0, float(np.max(np.abs(np.asarray(w, np.float64)))))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )


def check_lists(cfg, choices: dict[str, tuple[str, ...]]) -> None:
    """One-line errors for a kernel benchmark's list options: every `heads` entry (where it has them)
    is <heads>x<head_dim> and every entry of the fields in `choices` is one of its allowed values."""
    for h in getattr(cfg, "heads", ()):
        n, _, d = h.partition("x")
        if not (n.isdigit() and d.isdigit()):
            raise ValueError(f"--heads entry {h!r} must be <heads>x<head_dim>, e.g. 16x64")
    for name, allowed in choices.items():
        bad = set(getattr(cfg, name)) - set(allowed)
        if bad:
            raise ValueError(f"--{name} has unknown entries {sorted(bad)}; choose from {allowed}")


def speed_table(head: str, rows: list[dict], peak: float | None, baseline: str, keys: tuple[str, ...],
                columns: tuple[str, ...]) -> str:
    """A kernel benchmark's markdown table: `head` (its header row), one row per result with its
    `columns`, then tokens/s, TFLOP/s, % of `peak`, the ratio to the `baseline` impl's row with the
    same `keys`, and the max relative error."""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    key_of = lambda r: tuple(r[k] for k in keys)
    base = {key_of(r): r["tokens_per_s"] for r in rows if r["impl"] == baseline and r.get("status") == "ok"}
    for r in rows:
        cells = [r.get(c, "") for c in columns]
        if r.get("status") != "ok":
            lines.append("| " + " | ".join(map(str, cells)) + f" | {r['status']} | | | | |")
            continue
        pct = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
        ratio = f"{r['tokens_per_s'] / base[key_of(r)]:.2f}x" if key_of(r) in base else ""
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        cells += [f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.2f}", pct, ratio, err]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def command_line() -> str:
    """How this benchmark was started, for the table's header."""
    return "`" + " ".join(["python", *sys.argv]) + "`"


def run_gpu_grid(module: str, cfg, section: str, about: str,
                 table: Callable[[list[dict], float | None], str]) -> list[dict]:
    """A kernel benchmark: every case of `cfg` in a child process of `module`, then its table under
    the command, machine and device lines and `about`, printed (and with `cfg.write`, written to
    BENCHMARKS.md under `section`)."""
    kind = device_kind()
    peak = lookup(BF16_PEAK_TFLOPS, kind)
    rows = [run_in_child(module, case, dataclasses.asdict(cfg)) for case in progress(cfg.cases(), section)]
    text = (f"Command: {command_line()}  \n"
            f"{machine_line()}; device: {kind}{f' (dense bf16 peak {peak} TFLOP/s)' if peak else ''}"
            f"{'; Pallas interpreted' if cfg.interpret else ''}  \n{about}\n\n{table(rows, peak)}")
    publish(text, section if cfg.write else None)
    return rows


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat(fn: Callable[[], object], iters: int, budget_s: float) -> tuple[float, list[float]]:
    """The first call's time (compile excluded only if `fn` is precompiled), then up to `iters`
    timed calls while their total stays under `budget_s` (at least one)."""
    first = timed(fn)
    times: list[float] = []
    while len(times) < iters and sum(times) < budget_s:
        times.append(timed(fn))
    return first, times


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_in_child(module: str, case: dict, config: dict, env: dict | None = None,
                 timeout_s: float | None = None) -> dict:
    """Run `python -m module --child CASE --child-config CONFIG` and return the dict it prints after
    `RESULT ` (the module's `child_main`); past `timeout_s` the child is killed and the status says so."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(case), "--child-config", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(case, status=f"timeout (> {timeout_s:.0f} s)")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return dict(case, status=f"failed: {tail[0][:200]}")


def progress(items: Iterable, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is cosmetic
        return items
    return tqdm(list(items), desc=desc, unit="case")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_line() -> str:
    import jax

    return (f"Date: {datetime.date.today()}; jax {jax.__version__}; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs ({cpu_name()})")


def publish(text: str, section: str | None) -> None:
    """A benchmark's result: printed, and with `section` also written to BENCHMARKS.md there."""
    print(text)
    if section:
        write_section(text, section)
        print(f"wrote {BENCHMARKS} ({section})")


def write_section(text: str, section: str) -> None:
    """Replace `section` of BENCHMARKS.md atomically (temp file + rename)."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    old = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with tempfile.NamedTemporaryFile("w", dir=BENCHMARKS.parent, delete=False, suffix=".tmp") as f:
        f.write(new)
    os.replace(f.name, BENCHMARKS)


def add_grid_args(parser, grid: dict[str, tuple[type, str]], iters: bool = True) -> None:
    """A comma-list option per field of a benchmark's grid (`field: (item type, help)`; `seq_lens`
    is `--seq-lens 1024,4096`), `--iters` (for a timed benchmark) and `--write`."""
    for field, (_, text) in grid.items():
        parser.add_argument("--" + field.replace("_", "-"), help=text)
    if iters:
        parser.add_argument("--iters", type=int, help="timed calls per case")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")


def grid_values(args, grid: dict[str, tuple[type, str]]) -> dict:
    """The grid options that were given, as tuples (`--seq-lens 1,2` -> seq_lens=(1, 2)), with `iters`
    (when given) and `write`: keyword arguments of the benchmark's config."""
    values = {field: tuple(cast(v) for v in getattr(args, field).split(","))
              for field, (cast, _) in grid.items() if getattr(args, field)}
    iters = getattr(args, "iters", None)
    return values | ({"iters": iters} if iters is not None else {}) | {"write": args.write}


def child_main(argv: list[str], run_case: Callable[[dict, object], dict], config_cls) -> None:
    """A benchmark module's `__main__`: rebuild the case `run_in_child` passed and its `config_cls`
    (JSON lists back to tuples), run it and print its RESULT line."""
    case = json.loads(argv[argv.index("--child") + 1])
    fields = json.loads(argv[argv.index("--child-config") + 1])
    config = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    print("RESULT " + json.dumps(run_case(case, config)))
