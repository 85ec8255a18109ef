"""GPU/TPU benchmark of sliding-window attention: `blockwise` (XLA) vs the `pallas` flash kernel, forward
and forward+backward, with cuDNN's windowed attention (no persistent slots) as a yardstick. On a
TPU `pallas` is the Mosaic path (JAX's splash attention, `mosaic.py`) and `cudnn` is skipped.

Attention alone (no projections, no RoPE), bf16 inputs, 16 persistent slots, width 1024 as 16 heads
x 64 and 8 x 128, windows 512 and 2048, 8K and 64K tokens, `batch x tokens` = 128K per step.
`cudnn` is `jax.nn.dot_product_attention(implementation="cudnn", local_window_size=...)`
without the slots (it cannot merge them: no log-sum-exp), so it does slightly less work. The
loss for forward+backward is sum(o^2), gradients w.r.t. q, k, v (and the slots). Each case runs
in its own process and checks its output against `blockwise` on the same inputs. FLOPs are
analytic: 4 T w d per head forward (the two products over a full window; the first window's
triangle and the slots are not counted), 2.5x that backward.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

from titans.train.bench.common import (check_lists, child_main, gpu_only_row, max_rel_err, repeat, run_gpu_grid,
                                       speed_table)

SECTION = "bench_attention"
IMPLS = ("blockwise", "pallas", "cudnn")
SLOTS = 16


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    heads: tuple[str, ...] = ("16x64", "8x128")  # "<heads>x<head_dim>"
    windows: tuple[int, ...] = (512, 2048)
    seq_lens: tuple[int, ...] = (8192, 65536)
    impls: tuple[str, ...] = IMPLS
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    block: int = 128
    tokens_per_step: int = 131072
    interpret: bool = False
    iters: int = 5
    budget_s: float = 30.0
    write: bool = False

    def __post_init__(self):
        check_lists(self, {"impls": IMPLS, "modes": ("fwd", "fwdbwd")})
        if any(x < 2 for x in self.windows + self.seq_lens) or self.block < 1:
            raise ValueError("--windows and --seq-lens must be >= 2 and --block >= 1")

    def cases(self) -> list[dict]:
        return [dict(heads=h, window=w, seq=t, mode=mode, impl=impl)
                for h in self.heads for w in self.windows for t in self.seq_lens for mode in self.modes
                for impl in self.impls]


def _step(case: dict, cfg: BenchConfig, impl: str):
    import jax
    import jax.numpy as jnp

    from titans.kernels.attention import sliding_window_attention

    window = case["window"]

    def forward(q, k, v, k_p, v_p):
        if impl == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0),
                                                implementation="cudnn")
        return sliding_window_attention(q, k, v, window=window, start=0, persistent=(k_p, v_p), block=cfg.block,
                                        impl=impl, interpret=cfg.interpret if impl == "pallas" else None)

    if case["mode"] == "fwd":
        return jax.jit(forward)
    loss = lambda *a: jnp.sum(jnp.square(forward(*a).astype(jnp.float32)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def run_case(case: dict, cfg: BenchConfig) -> dict:
    """One case, in this (child) process."""
    import jax
    import jax.numpy as jnp

    heads, dim = map(int, case["heads"].split("x"))
    batch = max(1, cfg.tokens_per_step // case["seq"])
    if (row := gpu_only_row(case)) is not None:
        return row | dict(batch=batch)
    keys = jax.random.split(jax.random.key(0), 5)
    shape = (batch, case["seq"], heads, dim)
    args = [jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:3]]
    args += [jax.random.normal(key, (SLOTS, heads, dim), jnp.float32) for key in keys[3:]]
    try:
        compiled = _step(case, cfg, case["impl"]).lower(*args).compile()
        run = lambda: jax.block_until_ready(compiled(*args))
        got = run()
        err = None if case["impl"] == "blockwise" else max_rel_err(
            jax.tree.leaves(got)[:3], jax.tree.leaves(_step(case, cfg, "blockwise")(*args))[:3])
        first, times = repeat(run, cfg.iters, cfg.budget_s)
    except Exception as e:  # noqa: BLE001 - a case that cannot run is reported, not fatal
        return dict(case, batch=batch, status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    median = statistics.median(times)
    tokens = batch * case["seq"]
    flops = 4.0 * tokens * min(case["window"], case["seq"]) * dim * heads * (3.5 if case["mode"] == "fwdbwd" else 1)
    return dict(case, batch=batch, status="ok", first_call_s=round(first, 3), median_s=round(median, 5),
                tokens_per_s=round(tokens / median, 1), tflops=round(flops / median / 1e12, 3),
                max_rel_err=None if err is None else float(f"{err:.2e}"))


def table(rows: list[dict], peak: float | None) -> str:
    head = ("| heads x d_h | window | tokens | batch | mode | impl | tokens/s | TFLOP/s | % bf16 peak | vs blockwise "
            "| max rel err vs blockwise |")
    return speed_table(head, rows, peak, "blockwise", ("heads", "window", "seq", "mode"),
                       ("heads", "window", "seq", "batch", "mode", "impl"))


def main(cfg: BenchConfig) -> list[dict]:
    return run_gpu_grid(__name__, cfg, SECTION, (
        f"Sliding-window attention only, bf16 inputs, {SLOTS} persistent slots (not in cudnn), block {cfg.block}; "
        "forward+backward = gradients of sum(o^2); FLOPs analytic (4 T w d per head, 3.5x with backward)."), table)


# Tiny shapes with Pallas interpreted: the whole benchmark on a CPU (scripts/bench_attention.py --smoke).
SMOKE = dict(heads=("2x16",), windows=(24,), seq_lens=(64,), impls=("blockwise", "pallas"), block=16,
             tokens_per_step=64, interpret=True, iters=1)


if __name__ == "__main__":
    child_main(sys.argv, run_case, BenchConfig)
