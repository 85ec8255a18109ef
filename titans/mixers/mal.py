"""`mal`: memory as a layer, then attention: `x += mem(N(x)); x += attn(N(x))` (spec section 4)."""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx

from titans.attention import AttentionCache, SlidingWindowAttention
from titans.layers import RMSNorm
from titans.memory_layer import MemoryLayer, MemoryLayerState


class MALState(NamedTuple):
    memory: MemoryLayerState
    attention: AttentionCache


class MAL(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.d_model, **cfg.dtypes, rngs=rngs)
        self.memory_norm, self.memory = norm(), MemoryLayer(cfg.memory, cfg.d_model, **cfg.dtypes, rngs=rngs)
        self.attn_norm, self.attn = norm(), SlidingWindowAttention(cfg, rngs=rngs)

    def init_state(self, batch_size: int) -> MALState:
        return MALState(self.memory.init_state(batch_size), self.attn.init_state(batch_size))

    def start_state(self, memory: MemoryLayerState) -> MALState:
        return MALState(memory, None)  # no attention cache: a sequence start

    def __call__(self, x, state, start, plan=None):
        state = state or MALState(None, None)
        m, memory = self.memory(self.memory_norm(x), state.memory)
        a, cache = self.attn(self.attn_norm(x + m), state.attention, start)
        return m + a, MALState(memory, cache)
