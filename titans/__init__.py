"""titans-jax models: the neural long-term memory layer and (later) the Titans language models."""
