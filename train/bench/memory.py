"""Throughput and peak memory of the memory layer (training = forward + backward, and inference),
scripts/bench_memory.py.

Shapes mirror ../shared/peers/titans_pytorch_bench.py: batch 1, width 256, chunk 64, memory depth 2,
expansion 4, heads 4x64 and 1x256; training loss = MSE of the layer output against a fixed random
target, gradients w.r.t. all parameters and the input. Every case runs in its own process, so the
peak RSS is that case's. FLOPs are counted analytically (`layer_flops_per_token`); training counts
3x the forward (the usual model-FLOPs convention: the remat recompute is not counted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from titans.kernels.memory import scan_flops_per_token
from titans.train.bench.common import (child_main, command_line, machine_line, peak_rss_mb, progress, publish,
                                       repeat, run_in_child, timed)

PEER_SCRIPT = Path("../shared/peers/titans_pytorch_bench.py")  # beside the checkout, as CI lays it out
SECTION = "bench_memory"  # + "_<n>dev" for --devices n


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    heads: tuple[str, ...] = ("4x64",)  # "<heads>x<head_dim>"
    seq_lens: tuple[int, ...] = (1024, 4096)
    impls: tuple[str, ...] = ("chunked", "reference")
    modes: tuple[str, ...] = ("train", "infer")
    d_model: int = 256
    chunk_size: int = 64
    depth: int = 2
    expansion: int = 4
    reference_train_max: int = 1024  # backprop through a token loop keeps ~2 state copies per token
    devices: int = 1  # >1: that many host devices, memory heads sharded over them
    iters: int = 5
    budget_s: float = 20.0
    peer_python: str | None = None
    write: bool = False

    def __post_init__(self):
        for h in self.heads:
            n, _, d = h.partition("x")
            if not (n.isdigit() and d.isdigit()) or int(n) * int(d) != self.d_model:
                raise ValueError(f"--heads entry {h!r} must be <heads>x<head_dim> with heads*head_dim = {self.d_model}")
        for name, allowed in (("impls", ("chunked", "reference")), ("modes", ("train", "infer"))):
            bad = set(getattr(self, name)) - set(allowed)
            if bad:
                raise ValueError(f"--{name} has unknown entries {sorted(bad)}; choose from {allowed}")
        if any(n < 1 for n in self.seq_lens):
            raise ValueError("--seq-lens must be positive")
        if self.devices < 1 or any(int(h.split("x")[0]) % self.devices for h in self.heads):
            raise ValueError(f"--devices {self.devices} must be >= 1 and divide every head count in --heads")

    def cases(self) -> list[dict]:
        out = []
        for heads in self.heads:
            for impl in self.impls:
                for mode in self.modes:
                    for seq in self.seq_lens:
                        if impl == "reference" and mode == "train" and seq > self.reference_train_max:
                            continue
                        out.append(dict(heads=heads, impl=impl, mode=mode, seq=seq))
        return out


def layer_flops_per_token(d_model: int, heads: int, head_dim: int, hidden: int, depth: int, chunk: int) -> float:
    """Forward FLOPs per token of the memory layer: the scan (`scan_flops_per_token`)
    plus the projections q, k, v, output gate and output (5 d_model H D, 2 per multiply-add)."""
    return scan_flops_per_token(heads, head_dim, hidden, depth, chunk) + 2.0 * 5 * d_model * heads * head_dim


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's float32 n x n matmul rate, the yardstick for achieved GFLOP/s."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = min(timed(lambda: f(x).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def run_case(case: dict, cfg: BenchConfig) -> dict:
    """One case, in this (child) process."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from titans.config import MemoryConfig
    from titans.memory_layer import MemoryLayer
    from titans.sharding import logical_shardings

    heads, head_dim = map(int, case["heads"].split("x"))
    memory = MemoryConfig(heads=heads, head_dim=head_dim, depth=cfg.depth, expansion=cfg.expansion,
                          chunk_size=cfg.chunk_size, impl=case["impl"])
    graph, params = nnx.split(MemoryLayer(memory, cfg.d_model, rngs=nnx.Rngs(0)))
    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (1, case["seq"], cfg.d_model), jnp.float32)
    target = jax.random.normal(kt, x.shape, jnp.float32)
    if cfg.devices > 1:  # heads are independent: shard them over the host devices (tensor parallel)
        mesh = jax.make_mesh((cfg.devices,), ("heads",), axis_types=(jax.sharding.AxisType.Auto,))
        params = jax.device_put(params, logical_shardings(params, mesh, {"heads": "heads"}))
        x, target = jax.device_put((x, target), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def forward(params, x):
        return nnx.merge(graph, params)(x)[0]

    if case["mode"] == "train":
        loss = lambda p, x: jnp.mean(jnp.square(forward(p, x) - target))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    else:
        step = jax.jit(forward)
    compiled = step.lower(params, x).compile()
    mem = compiled.memory_analysis()
    run = lambda: jax.block_until_ready(compiled(params, x))

    first, times = repeat(run, cfg.iters, cfg.budget_s)
    median = statistics.median(times)
    flops = layer_flops_per_token(cfg.d_model, heads, head_dim, cfg.expansion * head_dim, cfg.depth, cfg.chunk_size)
    flops *= 3 if case["mode"] == "train" else 1
    return dict(
        case,
        status="ok",
        first_call_s=round(first, 3),
        n_timed=len(times),
        median_s=round(median, 4),
        tokens_per_s=round(case["seq"] / median, 1),
        gflops=round(flops * case["seq"] / median / 1e9, 1),
        xla_temp_mb=round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None,
        peak_rss_mb=peak_rss_mb(),
    )


def run_case_child(case: dict, cfg: BenchConfig) -> dict:
    env = dict(os.environ)
    if cfg.devices > 1:  # read by XLA when the child starts
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cfg.devices}".strip()
    return run_in_child(__name__, case, dataclasses.asdict(cfg), env)


def run_peer(cfg: BenchConfig) -> list[dict]:
    """titans-pytorch on the same shapes, right after ours (compare ratios of back-to-back runs)."""
    kinds = ",".join(f"mem_{m}" for m in cfg.modes)
    heads = ",".join(h.split("x")[0] for h in cfg.heads)
    lens = ",".join(map(str, cfg.seq_lens))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.jsonl"
        cmd = [cfg.peer_python, str(PEER_SCRIPT.resolve()), "--kinds", kinds, "--heads", heads, "--seq-lens", lens, "--jsonl", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def _peer_key(row: dict) -> tuple:
    return (row["kind"].removeprefix("mem_"), int(row["heads"]), int(row["seq_len"]))


def table(rows: list[dict], peer: list[dict], matmul: float) -> str:
    peer_by_key = {_peer_key(p): p for p in peer if p.get("status") == "ok"}
    head = "| impl | mode | heads x d_h | seq | tokens/s | GFLOP/s (% of matmul) | XLA temp MB | peak RSS MB |"
    sep = "|---|---|---|---|---|---|---|---|"
    if peer_by_key:
        head += " peer tokens/s | ours / peer |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['impl']} | {r['mode']} | {r['heads']} | {r['seq']} | {r['status']} |")
            continue
        pct = 100 * r["gflops"] / matmul
        line = (
            f"| {r['impl']} | {r['mode']} | {r['heads']} | {r['seq']} | {r['tokens_per_s']:.0f} | "
            f"{r['gflops']:.1f} ({pct:.0f}%) | {r['xla_temp_mb']} | {r['peak_rss_mb']:.0f} |"
        )
        if peer_by_key:
            p = peer_by_key.get((r["mode"], int(r["heads"].split("x")[0]), r["seq"]))
            line += f" {p['tokens_per_s']:.0f} | {r['tokens_per_s'] / p['tokens_per_s']:.2f}x |" if p and r["impl"] == "chunked" else " | |"
        lines.append(line)
    return "\n".join(lines)


def main(cfg: BenchConfig) -> list[dict]:
    matmul = matmul_gflops()
    rows = []
    for case in progress(cfg.cases(), "bench_memory"):
        rows.append(run_case_child(case, cfg))
    peer = run_peer(cfg) if cfg.peer_python else []
    header = (
        f"Command: {command_line()}  \n"
        f"{machine_line()}; float32 2048^2 matmul: {matmul:.0f} GFLOP/s  \n"
        f"Memory layer: d_model {cfg.d_model}, chunk {cfg.chunk_size}, depth {cfg.depth}, expansion "
        f"{cfg.expansion}, batch 1, {cfg.devices} host device(s)"
        f"{' (memory heads sharded over them)' if cfg.devices > 1 else ''}. "
        "XLA temp = compiled working memory; peak RSS = the case's process."
    )
    if peer:
        header += f"  \nPeer: titans-pytorch {peer[0].get('titans_pytorch')}, torch {peer[0].get('torch')}, run right after."
    text = header + "\n\n" + table(rows, peer, matmul)
    publish(text, (SECTION if cfg.devices == 1 else f"{SECTION}_{cfg.devices}dev") if cfg.write else None)
    return rows


if __name__ == "__main__":
    child_main(sys.argv, run_case, BenchConfig)
