"""Compute kernels of titans-jax: each op has a plain reference, a chunked JAX form and (later) Pallas."""
