"""`mag`: attention and memory side by side on the same input, combined by a gate (spec section 4):
`o = (RMSNorm_a(attn) * sigmoid(RMSNorm_m(mem))) @ W_o` with `attn`, `mem` the head outputs
`[batch, seq, heads*dim]` before any output projection (`mem` is the memory's `y`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from titans.attention import AttentionCache, SlidingWindowAttention
from titans.layers import RMSNorm
from titans.memory_layer import MemoryLayerState, NeuralMemory


class MAGState(NamedTuple):
    attention: AttentionCache
    memory: MemoryLayerState


class MAG(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        kw = dict(**cfg.dtypes, rngs=rngs)
        self.norm = RMSNorm(cfg.d_model, **kw)
        self.attn = SlidingWindowAttention(cfg, rngs=rngs)
        self.memory = NeuralMemory(cfg.memory, cfg.d_model, **cfg.dtypes, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.attn_width, name="heads", **kw)
        self.memory_norm = RMSNorm(cfg.memory.width, name="heads", **kw)

    def init_state(self, batch_size: int) -> MAGState:
        return MAGState(self.attn.init_state(batch_size), self.memory.init_state(batch_size))

    def start_state(self, memory: MemoryLayerState) -> MAGState:
        return MAGState(None, memory)  # no attention cache: a sequence start

    def __call__(self, x, state, start, plan=None):
        state = state or MAGState(None, None)
        h = self.norm(x)
        a, cache = self.attn.heads(h, state.attention, start)
        m, memory = self.memory.scan(h, state.memory)
        gated = self.attn_norm(a) * jax.nn.sigmoid(self.memory_norm(m.reshape(a.shape)))
        # W_o is the attention's own output projection (same shape): MAG has one output projection.
        return self.attn.out_proj(gated), MAGState(cache, memory)
