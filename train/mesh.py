"""The device mesh of a run: ("data", "fsdp") over every device of every process, parameters placed
by their logical axis names, batches split over the devices."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from titans.memory_layer import MemoryLayerState
from titans.model import TitansLM
from titans.sharding import logical_shardings
from titans.train.config import TrainError

# Logical parameter axes -> mesh axes: FSDP shards every d_model axis over "fsdp"; memory heads,
# MLP and vocabulary axes stay whole (a "tensor" axis would take "heads" and "mlp").
SHARDING_RULES = {"embed": "fsdp"}


def make_mesh(fsdp: int) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh over every device (of every process)."""
    count = jax.device_count()
    if count % fsdp:
        raise TrainError(f"train.fsdp={fsdp} does not divide the {count} devices")
    return jax.make_mesh((count // fsdp, fsdp), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto))


def shard(node: nnx.Module | nnx.Optimizer, mesh: jax.sharding.Mesh) -> None:
    """Place a model's (or an optimizer's) arrays on `mesh` by their logical names, in place; arrays
    without names (the optimizer's step counters) are replicated over it, as the jitted step returns
    them: an input placed otherwise would compile the step a second time."""
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, logical_shardings(state, mesh, SHARDING_RULES)))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The batch axis split over every device."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def global_batch(local, mesh: jax.sharding.Mesh):
    """This process's rows (a pytree of arrays) -> arrays whose batch axis is split over every device."""
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(batch_sharding(mesh), rows), local)


def initial_memories(model: TitansLM, batch_size: int, mesh: jax.sharding.Mesh) -> tuple[MemoryLayerState, ...]:
    """This process's `batch_size` rows of W^0 memory states, batch-sharded like `global_batch` (the
    scalar chunk offsets replicated, as the step returns them)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: global_batch(np.asarray(a), mesh) if np.ndim(a) else jax.device_put(a, replicated),
                        model.memory_states(model.init_state(batch_size)))
