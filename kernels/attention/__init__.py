"""Causal sliding-window attention with persistent slots: `sliding_window_attention` (sequences),
`decode_attention` (one query per row against ring-buffer caches)."""

from titans.kernels.attention.api import IMPLS, sliding_window_attention
from titans.kernels.attention.decode import decode_attention

__all__ = ["IMPLS", "decode_attention", "sliding_window_attention"]
