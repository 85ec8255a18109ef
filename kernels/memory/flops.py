"""Analytic FLOP count of the memory scan in the chunk form (`chunked.py`, the Pallas kernels),
the yardstick of the benchmarks' achieved-FLOP/s columns."""

from __future__ import annotations

from titans.kernels.memory.common import layer_shapes


def scan_flops_per_token(heads: int, head_dim: int, hidden: int, depth: int, chunk: int) -> float:
    """Forward FLOPs per token of the memory scan (2 per multiply-add).

    Per chunk and head, with layer widths (n_in, n_out): keys forward (b n_in n_out) and backward
    (b n_in n_out for layers > 1), queries against W and S (2 b n_in n_out), the intra-chunk scores
    and their product with the errors (b^2 n_in + b^2 n_out), the chunk-end W and S (2 b n_in n_out),
    plus G = Dc H (b^3). A training step (forward and backward) is counted as 3x this, the usual
    model-FLOPs convention (the remat recompute is not counted).
    """
    b = chunk
    per_chunk = b**3
    for layer, (n_in, n_out) in enumerate(layer_shapes(head_dim, hidden, depth)):
        mats = 5 + (1 if layer > 0 else 0)
        per_chunk += mats * b * n_in * n_out + b * b * (n_in + n_out)
    return 2.0 * heads * per_chunk / b
