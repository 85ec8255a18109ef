"""Training of titans-jax models (data, loop, checkpoints) lands with the training issue."""
