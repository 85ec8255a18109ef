"""Causal sliding-window attention with persistent slots: `sliding_window_attention`."""

from titans.kernels.attention.api import IMPLS, sliding_window_attention

__all__ = ["IMPLS", "sliding_window_attention"]
