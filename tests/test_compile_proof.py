"""The compile proof (`titans.train.bench.compile`) on the default `small` preset's memory kernels
(forward, forward saving chunk-start states, backward): JAX's Triton IR compiles to sm_80 machine
code with the `triton` package and ptxas, fits the A100's shared memory and does not spill (issue
24). A few seconds of CPU; `scripts/bench_compile.py` measures the rest. Skips without the `triton`
package or a ptxas: CI installs only `.[test]`."""

from __future__ import annotations

import importlib.util

import pytest

from titans.train.bench import compile as compile_bench

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="needs triton: pip install -e .[gpu-compile]"),
    pytest.mark.skipif(compile_bench.find_ptxas() is None, reason="needs ptxas (CUDA toolkit or the triton wheel)"),
]

ARCH = 80
KERNELS = ("titans_memory_forward", "titans_memory_forward_save", "titans_memory_backward")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict:
    """The compile rows (`compile_bench.compile_kernel`) of the small preset's memory kernels, sm_80."""
    kernels = {k.name: k for k in compile_bench.lowered_kernels("small", "memory", "float32")}
    assert sorted(kernels) == sorted(KERNELS)
    cfg = compile_bench.CompileConfig(shapes=("small",), timeout_s=120)
    workdir = tmp_path_factory.mktemp("compile")
    return {name: compile_bench.compile_kernel(k, ARCH, k.num_warps, cfg, workdir, compile_bench.find_ptxas())
            for name, k in kernels.items()}


@pytest.mark.parametrize("name", KERNELS)
def test_memory_kernel_compiles_within_shared_memory_without_spills(rows, name, capsys):
    row = rows[name]
    line = compile_bench.table([dict(shape="small", matmul="float32") | row]).splitlines()[-1]
    with capsys.disabled():  # the compile time, shown even when the test passes
        print(f"\ncompile proof: {line}")
    assert row["status"] == "ok", row["status"]
    assert row["shared"] <= compile_bench.SHARED_LIMIT[ARCH]
    assert row["spill_stores"] == row["spill_loads"] == 0, row
