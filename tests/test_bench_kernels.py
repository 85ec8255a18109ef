"""scripts/bench_kernels.py and scripts/bench_attention.py end to end on CPU (--smoke: tiny shapes,
Pallas interpreted; each case runs in a child process, as on a GPU)."""

from __future__ import annotations

import re

from tests.scripts import run_script


def test_smoke_run_checks_pallas_against_chunked_and_prints_the_table():
    code, out, err = run_script("bench_kernels", "--smoke", "--modes", "fwd")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| 2 | 2x16 | 16 | 48 | 1 | fwd | float32 |")]
    assert [r.split("|")[8].strip() for r in rows] == ["chunked", "pallas"], out
    err = float(rows[1].split("|")[-2])
    assert err < 1e-5 and re.search(r"\| \d+ \|", rows[1])


def test_bad_arguments_fail_in_one_line():
    code, _, err = run_script("bench_kernels", "--impls", "cuda")
    assert code == 1
    assert err.strip().splitlines() == ["bench_kernels: --impls has unknown entries ['cuda']; choose from ('chunked', 'pallas', 'fla')"]


def test_attention_smoke_run_checks_pallas_against_blockwise():
    code, out, err = run_script("bench_attention", "--smoke", "--modes", "fwd")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| 2x16 | 24 | 64 | 1 | fwd |")]
    assert [r.split("|")[6].strip() for r in rows] == ["blockwise", "pallas"], out
    assert float(rows[1].split("|")[-2]) < 2e-2  # bf16 inputs and outputs: a few bf16 ulps


def test_gpu_only_impls_are_reported_elsewhere_and_tpus_have_peaks():
    """On a TPU the benchmarks run `chunked`/`blockwise` against `pallas` (Mosaic there) and report
    cuDNN and flash-linear-attention as GPU only; the table's peak is the chip's."""
    from titans.train.bench.common import BF16_PEAK_TFLOPS, PARALLEL_UNITS, gpu_only_row, lookup

    assert gpu_only_row(dict(impl="cudnn", seq=8))["status"] == "GPU only (this is cpu)"
    assert gpu_only_row(dict(impl="pallas")) is None
    assert lookup(BF16_PEAK_TFLOPS, "TPU v5 lite") == 197.0 and lookup(BF16_PEAK_TFLOPS, "TPU v5p") == 459.0
    assert lookup(PARALLEL_UNITS, "TPU v6 lite") == 1 and lookup(PARALLEL_UNITS, "NVIDIA H100 80GB HBM3") == 132
