"""`swa`: sliding-window attention only (the baseline)."""

from __future__ import annotations

from flax import nnx

from titans.attention import SlidingWindowAttention
from titans.layers import RMSNorm


class SWA(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, **cfg.dtypes, rngs=rngs)
        self.attn = SlidingWindowAttention(cfg, rngs=rngs)

    def init_state(self, batch_size: int):
        return self.attn.init_state(batch_size)

    def __call__(self, x, state, start, plan=None):
        return self.attn(self.norm(x), state, start)
