"""Compute kernels of titans-jax: each op (memory, attention) has a plain reference, an XLA fast path and Pallas kernels behind one `impl=` switch."""
