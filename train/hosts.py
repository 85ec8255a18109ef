"""One run on several processes (hosts): starting JAX's distributed runtime, which process writes the
run's files, and stopping every process at the same step.

Each process runs the same command (README, "Several hosts"); together they train one model on one
global mesh, each feeding its slice of the global batch (`titans.train.mesh.global_batch`). Process 0
writes `run.json`, the metrics, TensorBoard and the progress bar; orbax writes checkpoints from every
process (each its own shards; the run folder must be on a filesystem every process sees). A process
that dies is noticed by the coordination service after `train.heartbeat_timeout` seconds without a
heartbeat: the others then stop with "The following tasks are unhealthy (stopped sending
heartbeats): <process ids>" (an abort, exit 134), and a restart of all resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import itertools
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from titans.train.config import TrainError

ADDRESS, COUNT, INDEX = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def initialize(requested: bool, heartbeat_timeout: int) -> None:
    """Start JAX's distributed runtime when `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES`
    and `JAX_PROCESS_ID`, which `jax.distributed.initialize` does not read itself), or when
    `requested` (SLURM, TPU pod slices and Open MPI are detected by JAX). On CPU, cross-process
    collectives go through gloo (`jax_cpu_collectives_implementation`, JAX's default)."""
    address = os.environ.get(ADDRESS)
    if not address and not requested:
        return
    where = {}
    if address:
        missing = [name for name in (COUNT, INDEX) if not os.environ.get(name)]
        if missing:
            raise TrainError(f"{ADDRESS} is set but {' and '.join(missing)} not: set {COUNT} (the number of "
                             f"processes) and {INDEX} (0 on the first) on every process, or unset {ADDRESS}")
        try:
            count, index = int(os.environ[COUNT]), int(os.environ[INDEX])
        except ValueError:
            raise TrainError(f"{COUNT} and {INDEX} must be integers, got {os.environ[COUNT]!r} and "
                             f"{os.environ[INDEX]!r}") from None
        if not 0 <= index < count:
            raise TrainError(f"{INDEX}={index} must lie in [0, {COUNT}={count})")
        where = dict(coordinator_address=address, num_processes=count, process_id=index)
    jax.distributed.initialize(**where, heartbeat_timeout_seconds=heartbeat_timeout)


HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def split_cpu_cores(batch_size: int, grad_accum: int, requested: bool = False) -> int:
    """One XLA:CPU device per core, each with its share of the batch's rows, before JAX starts.

    On one device XLA:CPU keeps about 1.5 of 2 cores busy (its matmuls use both, the rest of the step
    one); the step split over one host device per core runs on all of them: `small` trains 1160 ->
    1470 tokens/s on 2 cores with the same losses (BENCHMARKS.md). Sets the host device count in
    `XLA_FLAGS` to the largest divisor of a process's micro-batch rows within this process's cores
    (it only adds CPU devices: on a GPU or TPU host the run's devices are unchanged). Nothing is set
    when `XLA_FLAGS` already sets a count, when the process count is unknown (`requested` without
    `JAX_NUM_PROCESSES`) or when the rows do not split evenly (the trainer then says why). Must run
    before JAX's first use of a device. Returns the device count set (1: none).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    processes = os.environ.get(COUNT, "" if requested or os.environ.get(ADDRESS) else "1")
    if HOST_DEVICES_FLAG in flags or not processes.isdigit() or int(processes) < 1:
        return 1
    groups = grad_accum * int(processes)
    if grad_accum < 1 or batch_size % groups:
        return 1
    rows = batch_size // groups
    if rows < 1:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    count = max(n for n in range(1, min(cores, rows) + 1) if rows % n == 0)
    if count > 1:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={count}".strip()
    return count


def is_main() -> bool:
    """Whether this process writes the run's own files (process 0)."""
    return jax.process_index() == 0


BARRIER_TIMEOUT_MS = 60 * 60 * 1000  # a first compile of a large model can take many minutes


_BARRIERS = itertools.count()  # every process passes the same barriers in the same order


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (a no-op on one process). It goes through
    the coordination service, not through a collective on the devices (see `compile_together`). A
    sequence number makes each barrier's id unique: the service passes a finished id at once."""
    if jax.process_count() > 1:
        from jax._src import distributed  # the runtime's client: JAX has no public barrier off the devices

        distributed.global_state.client.wait_at_barrier(f"{name}-{next(_BARRIERS)}", BARRIER_TIMEOUT_MS)


def compile_together(name: str, jitted, *args, **kwargs) -> None:
    """Several processes: compile `jitted` (a `jax.jit` / `nnx.jit` function) for these arguments
    (arrays or `jax.ShapeDtypeStruct`s), then wait for every process to have compiled it; the call
    that follows reuses the compiled program. Needed because XLA:CPU's collectives (gloo) give the
    processes of a program 30 s to meet at its first collective, while JAX's persistent compilation
    cache serves process 0 alone (it writes from process 0 only, and on CPU the other processes'
    programs have other keys): the others may compile for longer than that."""
    if jax.process_count() > 1:
        jitted.lower(*args, **kwargs).compile()
        barrier(name)


def host_copy(tree):
    """A pytree of (global) arrays -> numpy arrays whole on every process (a collective on several)."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


class Stop:
    """SIGTERM / SIGINT: save at a step boundary and return, every process at the same step.

    One process: the handler sets a flag. Several: JAX's preemption service (started by
    `jax.distributed.initialize`) catches SIGTERM to any process and `reached(step)` turns true on
    every process at the same step; SIGINT (Ctrl-C in one terminal) is passed on as a SIGTERM to
    this process, since the service listens to SIGTERM only.
    """

    def __init__(self):
        self.signal = None
        self._shared = jax.process_count() > 1
        self._old = {}

    def __enter__(self):
        # The preemption service's own SIGTERM handler must stay in place on several processes.
        for sig in (signal.SIGINT,) if self._shared else (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if self._shared:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; on several processes every one must ask at every step."""
        if self._shared and multihost_utils.reached_preemption_sync_point(step):
            self.signal = self.signal or "SIGTERM"
            return True
        return not self._shared and self.signal is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
