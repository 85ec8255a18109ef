"""`lmm`: the neural memory layer only (spec section 3)."""

from __future__ import annotations

from flax import nnx

from titans.layers import RMSNorm
from titans.memory_layer import MemoryLayer


class LMM(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, **cfg.dtypes, rngs=rngs)
        self.memory = MemoryLayer(cfg.memory, cfg.d_model, **cfg.dtypes, rngs=rngs)

    def init_state(self, batch_size: int):
        return self.memory.init_state(batch_size)

    def start_state(self, memory):
        return memory

    def __call__(self, x, state, start, plan=None):
        return self.memory(self.norm(x), state)
