"""The Titans neural-memory recurrence: `memory_scan` and its carried `MemoryState`."""

from kernels.memory.api import IMPLS, MAX_DEPTH, memory_scan
from kernels.memory.common import MemoryState

__all__ = ["IMPLS", "MAX_DEPTH", "MemoryState", "memory_scan"]
