"""The Pallas kernels under a 4-device CPU mesh ("data" 2 x "fsdp" 2, `jax.set_mesh`, batch-sharded
inputs): mapped over the batch with shard_map (GSPMD cannot split a kernel call), and equal in
values and gradients to the XLA impls on one device, the replicated persistent slots included.
Runs in a subprocess: the device count is fixed when JAX starts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from titans.kernels.attention import sliding_window_attention
    from titans.kernels.memory import memory_scan
    from tests.memory_cases import random_inputs, state_of

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rows = NamedSharding(mesh, P(("data", "fsdp")))

    def check(loss, args, batched, fast, slow, what):
        floating = lambda a: all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in jax.tree.leaves(a))
        argnums = tuple(i for i, a in enumerate(args) if floating(a))  # all but the mask
        want = jax.jit(jax.value_and_grad(lambda *a: loss(slow, *a), argnums=argnums))(*args)
        placed = [jax.device_put(a, rows) if b else a for a, b in zip(args, batched)]
        fn = lambda *a: loss(fast, *a)
        with jax.set_mesh(mesh):
            assert "shard_map" in str(jax.make_jaxpr(fn)(*placed)), what
            got = jax.jit(jax.value_and_grad(fn, argnums=argnums))(*placed)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            g, w = np.asarray(g), np.asarray(w)
            assert np.max(np.abs(g - w)) <= 2e-5 * max(1.0, np.max(np.abs(w))), (what, np.max(np.abs(g - w)))

    inputs = random_inputs(3, batch=4, seq=13, heads=2, head_dim=8, hidden=16, depth=2, with_mask=True)
    names = ("q", "k", "v", "theta", "eta", "alpha")

    def memory_loss(impl, weights, *args):
        y, state = memory_scan(state_of(inputs)._replace(weights=weights, anchor=weights), *args[:6],
                               mask=args[6], chunk_size=4, residual_norm=False, impl=impl, interpret=True)
        return jnp.sum(y ** 2) + sum(jnp.sum(w ** 2) for w in state.weights)

    args = (tuple(map(jnp.asarray, inputs["weights"])), *(jnp.asarray(inputs[n]) for n in names),
            jnp.asarray(inputs["mask"]))
    check(memory_loss, args,
          (True,) * 8, "pallas", "chunked", "memory_scan")

    keys = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(keys[0], (4, 24, 2, 8))
    k, v = (jax.random.normal(key, (4, 29, 2, 8)) for key in keys[1:3])
    slots = tuple(jax.random.normal(key, (3, 2, 8)) for key in keys[3:5])
    w = jax.random.normal(keys[5], q.shape)

    def attention_loss(impl, q, k, v, k_p, v_p):
        out = sliding_window_attention(q, k, v, window=6, start=2, persistent=(k_p, v_p), block=8, impl=impl,
                                       interpret=True)
        return jnp.sum(w * out)

    check(attention_loss, (q, k, v) + slots, (True, True, True, False, False), "pallas", "blockwise", "attention")
    print("OK")
    """
)


def test_pallas_kernels_map_over_the_batch_under_a_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
