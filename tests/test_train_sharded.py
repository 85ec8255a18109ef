"""A training step on a 4-device ("data" 2 x "fsdp" 2) CPU mesh equals the one-device step, with
state passing too. Runs in a subprocess: the device count is fixed when JAX starts."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import contextlib
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import titans
    from titans.train.config import TrainConfig
    from titans.train.mesh import global_batch, initial_memories, make_mesh, shard
    from titans.train.steps import MemoryCarry, make_optimizer, train_step

    assert jax.device_count() == 4, jax.devices()
    cfg = titans.load_preset("tiny", variant="mac", n_layers=1)  # a second block adds compile time, not coverage
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (4, 33)).astype(np.int32),
             "weights": rng.uniform(0.5, 4, (4, 32)).astype(np.float32)}

    def run(mesh):
        model = titans.TitansLM(cfg, rngs=nnx.Rngs(0))
        tx, schedule = make_optimizer(TrainConfig(steps=10, warmup_steps=1))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        if mesh is not None:
            shard(model, mesh)
            shard(opt, mesh)
        lrs = iter(float(schedule(i)) for i in range(4))
        x = jax.tree.map(jnp.asarray, batch) if mesh is None else global_batch(batch, mesh)
        put = jnp.asarray if mesh is None else lambda a: global_batch(a, mesh)
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():  # as the trainer does
            out = [train_step(model, opt, x, next(lrs)) for _ in range(2)]
            # State passing: a first step that keeps nothing, then two of four rows carried.
            memories = initial_memories(model, 4, mesh) if mesh is not None else model.memory_states(model.init_state(4))
            for keep in ([False] * 4, [True, False, True, False]):
                loss, norm, _, memories = train_step(model, opt, x, next(lrs), MemoryCarry(memories, put(np.asarray(keep))))
                out.append((loss, norm))
        return [float(v) for step in out for v in step[:2]], model, x

    (l1, m1, _), (l4, m4, x4) = run(None), run(make_mesh(fsdp=2))
    kernel = m4.embed.embedding[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), kernel.sharding
    assert x4["tokens"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp")), x4["tokens"].sharding
    # [loss, grad norm] of step 1, then of steps 2-4 (after AdamW updates, whose per-element
    # m / sqrt(v) turns reduction-order noise in near-zero gradients into sign noise).
    for i, tol in enumerate((1e-6, 1e-5) + (1e-5, 1e-5) * 3):
        assert abs(l4[i] - l1[i]) <= tol * abs(l1[i]), (i, l1, l4)
    print("OK", l1, l4)
    """
)


def test_sharded_train_step_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
