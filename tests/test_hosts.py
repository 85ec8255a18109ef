"""Several processes: two processes of two CPU devices each train exactly as one process of four
(JAX's distributed runtime, collectives through gloo); a checkpoint of either resumes in the other;
SIGTERM to one process stops both at the same step; kill -9 of one stops the other within the
heartbeat timeout. And gradient accumulation gives the full batch's update.

Each two-process launch costs a full compile: JAX writes its persistent compilation cache from
process 0 only, and on CPU the other processes' programs have other cache keys."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.scripts import ROOT, logged_losses

pytestmark = pytest.mark.xdist_group("hosts")

STEPS = 40  # long enough that a signal sent after the first logged steps lands mid-run
HEARTBEAT = 10  # seconds; a loaded 2-core CI machine must not miss heartbeats by accident


def _overrides(corpus: Path) -> list[str]:
    fields = dict(seq_len=32, batch_size=8, log_every=1, eval_every=10, eval_batches=1, checkpoint_every=5,
                  keep_checkpoints=10, sample_tokens=0, warmup_steps=2, heartbeat_timeout=HEARTBEAT)
    model = ["model.variant=mac", "model.n_layers=1"]  # a second block adds compile time, not coverage
    return [f"data.corpus={corpus}", *model] + [f"train.{k}={v}" for k, v in fields.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(corpus: Path, out: Path, processes: int) -> list[subprocess.Popen]:
    """`processes` copies of scripts/train.py training one run into `out`, 4 CPU devices in all."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "tiny", "--out", str(out), "--steps",
           str(STEPS), "--no-progress"] + [a for o in _overrides(corpus) for a in ("--set", o)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes}")
    if processes > 1:
        env |= dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes))
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env | ({"JAX_PROCESS_ID": str(i)} if processes > 1 else {}))
            for i in range(processes)]


def _wait(procs, timeout: float = 300) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append((proc.returncode, stdout + stderr))
    return results


def _when_logged(out: Path, procs, step: int, send) -> None:
    """`send()` once `out` has logged the loss of `step` (the runs must still be going)."""
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (out / "metrics.jsonl").is_file() and max(logged_losses(out), default=0) >= step:
            send()
            return
        time.sleep(0.05)
    pytest.fail(f"no process logged step {step} in time: {_wait(procs, 5)}")


def _same(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_two_processes_train_stop_and_resume_as_one(text_corpus, tmp_path):
    """One run, stopped and resumed four times: two processes from scratch, stopped by SIGTERM to
    process 1; one process resuming that, stopped by SIGTERM; two processes resuming that, one of
    them killed; one process finishing from the last complete checkpoint. Its losses are those of
    an uninterrupted run of one process."""
    one = tmp_path / "one"
    [(code, text)] = _wait(_launch(text_corpus, one, 1))
    assert code == 0, text[-3000:]
    want = logged_losses(one)
    assert sorted(want) == list(range(1, STEPS + 1))

    # SIGTERM to process 1: both save the same step and exit 143; process 0 alone wrote the metrics.
    run = tmp_path / "run"
    procs = _launch(text_corpus, run, 2)
    _when_logged(run, procs, 6, lambda: procs[1].send_signal(signal.SIGTERM))
    results = _wait(procs)
    assert [code for code, _ in results] == [128 + signal.SIGTERM] * 2, [text[-2000:] for _, text in results]
    stopped = int(results[0][1].split("stopped by SIGTERM at step ")[1].split()[0])
    assert stopped < STEPS and max(int(p.name) for p in (run / "checkpoints").iterdir()) == stopped
    rows = [r for r in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert len(rows) == len(logged_losses(run)) == stopped
    _same(logged_losses(run), want, range(1, stopped + 1))

    # One process resumes the two's checkpoint, and is stopped in turn.
    [proc] = _launch(text_corpus, run, 1)
    _when_logged(run, [proc], stopped + 3, lambda: proc.send_signal(signal.SIGTERM))
    [(code, text)] = _wait([proc])
    assert code == 128 + signal.SIGTERM and f"resumed from step {stopped}" in text, text[-3000:]
    stopped = int(text.split("stopped by SIGTERM at step ")[1].split()[0])

    # Two processes resume the one's checkpoint; kill -9 of process 1 stops process 0 within the
    # heartbeat timeout, naming it.
    procs = _launch(text_corpus, run, 2)
    _when_logged(run, procs, stopped + 3, lambda: procs[1].kill())
    killed_at = time.time()
    (code0, text0), (code1, _) = _wait(procs, HEARTBEAT * 6)
    assert code1 == -signal.SIGKILL and code0 != 0 and f"resumed from step {stopped}" in text0, text0[-3000:]
    assert time.time() - killed_at < HEARTBEAT * 3 and "stopped sending heartbeats" in text0, text0[-3000:]

    # One process finishes from the last complete checkpoint.
    [(code, text)] = _wait(_launch(text_corpus, run, 1))
    assert code == 0 and "resumed from step" in text, text[-3000:]
    _same(logged_losses(run), want, want)


def test_grad_accum_gives_the_full_batch_update():
    """batch 8 in 4 micro-batches of 2 == batch 8 at once: loss, gradient norm, gate means, the
    carried memories (state passing) and the parameters after the step, to float32 round-off."""
    import jax.numpy as jnp
    from flax import nnx

    import titans
    from titans.train.config import TrainConfig
    from titans.train.steps import MemoryCarry, make_optimizer, train_step

    cfg = titans.load_preset("tiny", variant="lmm", n_layers=1)  # the cheapest memory variant to compile
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 256, (8, 33)), jnp.int32),
             "weights": jnp.asarray(rng.uniform(0.5, 4, (8, 32)), jnp.float32)}
    keep = jnp.asarray(rng.random(8) < 0.5)

    def step(accum):
        model = titans.TitansLM(cfg, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, make_optimizer(TrainConfig(steps=10, warmup_steps=1))[0], wrt=nnx.Param)
        start = model.memory_states(model.init_state(8))
        start = jax.tree.map(lambda a: a + 0.01 * jnp.ones_like(a) if a.ndim else a, start)
        carry = MemoryCarry(start, keep)
        out = train_step(model, opt, batch, 1e-3, carry, accum=accum)
        return out, nnx.state(model, nnx.Param)

    (loss1, norm1, gates1, mem1), params1 = step(1)
    (loss4, norm4, gates4, mem4), params4 = step(4)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
    close(loss4, loss1)
    close(norm4, norm1)
    jax.tree.map(close, gates4, gates1)
    jax.tree.map(close, mem4, mem1)
    # AdamW's first update is about lr * sign(gradient): round-off in a near-zero gradient moves it.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5), params4, params1)
    assert float(jnp.max(jnp.abs(params1["embed"]["embedding"][...] - titans.TitansLM(
        cfg, rngs=nnx.Rngs(0)).embed.embedding[...]))) > 1e-4  # the step moved the weights


@pytest.mark.parametrize("batch, accum, cores, env, count", [
    (8, 1, 2, {}, 2),  # the default small run on 2 cores: 4 rows per device
    (6, 1, 4, {}, 3),  # the largest divisor of the rows within the cores
    (8, 4, 2, {}, 2),  # micro-batches of 2 rows
    (2, 3, 2, {}, 1),  # rows that do not split: the trainer's error stays the one the user sees
    (8, 1, 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, 1),  # the user's count stands
    (8, 1, 2, {"JAX_NUM_PROCESSES": "2"}, 2),  # 4 rows per process
    (8, 1, 2, {"JAX_COORDINATOR_ADDRESS": "h:1"}, 1),  # process count unknown yet
])
def test_cpu_cores_split_the_batch_rows(monkeypatch, batch, accum, cores, env, count):
    from titans.train import hosts

    for name in ("XLA_FLAGS", "JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert hosts.split_cpu_cores(batch, accum) == count
    flags = os.environ.get("XLA_FLAGS", "")
    if "XLA_FLAGS" in env:
        assert flags == env["XLA_FLAGS"]
    else:
        assert flags == (f"--xla_force_host_platform_device_count={count}" if count > 1 else "")
