"""Run a Pallas kernel per device under a mesh: GSPMD cannot partition a custom kernel call (it
would gather the operands and run the whole batch on every device), so the kernels' entry points
map them over the batch with `jax.shard_map` when a mesh is set (`jax.set_mesh`, as the trainer
does)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P


def over_batch(fn: Callable, args: Sequence, batched: Sequence[bool]):
    """`fn(*args)`, split over the leading (batch) axis across every axis of the current mesh.

    `batched[i]`: whether the array leaves of `args[i]` (other than scalars) lead with the batch
    axis; the rest are replicated. Every non-scalar output leads with the batch axis. Without a
    mesh, with a manual (shard_map) axis, or with a batch the mesh does not divide, it is `fn(*args)`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return fn(*args)
    batch = next(leaf.shape[0] for arg, b in zip(args, batched) if b for leaf in jax.tree.leaves(arg) if leaf.ndim)
    if batch % mesh.size:
        return fn(*args)
    axes = P(tuple(mesh.axis_names))
    spec = lambda b: (lambda leaf: axes if b and leaf.ndim else P())
    in_specs = tuple(jax.tree.map(spec(b), arg) for arg, b in zip(args, batched))
    out_specs = jax.tree.map(spec(True), jax.eval_shape(fn, *args))
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation to check.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
