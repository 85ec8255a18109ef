"""scripts/bench_kernels.py and scripts/bench_attention.py end to end on CPU (--smoke: tiny shapes, Pallas interpreted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_checks_pallas_against_chunked_and_prints_the_table():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--smoke", "--modes", "fwd"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 2 | 2x16 | 16 | 48 | 1 | fwd | float32 |")]
    assert [r.split("|")[8].strip() for r in rows] == ["chunked", "pallas"], out
    err = float(rows[1].split("|")[-2])
    assert err < 1e-5 and re.search(r"\| \d+ \|", rows[1])


def test_bad_arguments_fail_in_one_line():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_kernels.py"), "--impls", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["bench_kernels: --impls has unknown entries ['cuda']; choose from ('chunked', 'pallas', 'fla')"]


def test_attention_smoke_run_checks_pallas_against_blockwise():
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_attention.py"), "--smoke", "--modes", "fwd"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 2x16 | 24 | 64 | 1 | fwd |")]
    assert [r.split("|")[6].strip() for r in rows] == ["blockwise", "pallas"], out
    assert float(rows[1].split("|")[-2]) < 2e-2  # bf16 inputs and outputs: a few bf16 ulps
