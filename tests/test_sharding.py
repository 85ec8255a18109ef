"""The memory layer's logical sharding names: heads sharded over 4 host devices give the same
outputs and gradients as one device. Runs in a subprocess: the device count is fixed at JAX start."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from titans.config import MemoryConfig
    from titans.memory_layer import MemoryLayer
    from titans.sharding import logical_shardings

    assert jax.device_count() == 4, jax.devices()
    cfg = MemoryConfig(heads=4, head_dim=8, expansion=2, chunk_size=4, impl="chunked")
    graph, params = nnx.split(MemoryLayer(cfg, 32, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))

    def loss(p, x):
        return jnp.sum(jnp.sin(nnx.merge(graph, p)(x)[0]))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    want = step(params, x)
    mesh = jax.make_mesh((4,), ("heads",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(params, logical_shardings(params, mesh, {"heads": "heads"}))
    kernel = sharded["memory"]["q"]["proj"]["kernel"][...]
    assert kernel.sharding.spec == PartitionSpec(None, "heads"), kernel.sharding
    got = step(sharded, jax.device_put(x, NamedSharding(mesh, PartitionSpec())))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5 * float(np.max(np.abs(w))))
    print("OK")
    """
)


def test_heads_sharded_over_four_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
