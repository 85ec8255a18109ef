"""The Titans neural-memory recurrence: `memory_scan`, its carried `MemoryState`, and the memory
MLP's read `memory_apply` (a retrieval without a write, as MAC's segments make)."""

from titans.kernels.memory.api import IMPLS, MAX_DEPTH, memory_scan
from titans.kernels.memory.common import ACTIVATIONS, MATMUL_DTYPES, MemoryState, layer_shapes, memory_apply
from titans.kernels.memory.flops import scan_flops_per_token

__all__ = ["ACTIVATIONS", "IMPLS", "MATMUL_DTYPES", "MAX_DEPTH", "MemoryState", "layer_shapes", "memory_apply",
           "memory_scan", "scan_flops_per_token"]
