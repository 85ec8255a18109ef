"""Mapping the logical axis names on parameters ("embed", "heads", ...) onto a device mesh."""

from __future__ import annotations

from typing import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def sharded_init(init, *names: str | None):
    """`init` with logical axis names in its metadata. Placement is not eager, so modules build
    without a mesh; `logical_shardings` maps the names onto one later."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def logical_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None]) -> nnx.State:
    """A `NamedSharding` per parameter: each logical name becomes the mesh axis `rules` gives it
    (names absent from `rules`, and parameters without names, are replicated)."""

    def to_sharding(spec) -> NamedSharding:
        if not isinstance(spec, PartitionSpec):  # no sharding metadata on this parameter
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, PartitionSpec(*(rules.get(name) if name else None for name in spec)))

    specs = nnx.get_partition_spec(state)
    return jax.tree.map(to_sharding, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
