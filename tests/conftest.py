"""Test-session setup: fast CPU compiles and JAX's persistent compilation cache outside the clone."""

import os
import tempfile

# Compiling dominates JAX test time on CPU; these shapes are tiny, so XLA's optimisation passes
# cost more than they save. Read once when jax is imported, hence before the import.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The stores the tests' small corpora are tokenized into stay out of the user's cache.
os.environ.setdefault("TITANS_JAX_STORES", tempfile.mkdtemp(prefix="titans-test-stores-"))

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/titans-jax/jax-cache")),
)
# The default (1 s) would leave almost every small test compile uncached.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
