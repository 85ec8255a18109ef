"""Test-session setup: fast CPU compiles and JAX's persistent compilation cache outside the clone."""

import json
import os
import tempfile
from pathlib import Path

# Compiling dominates JAX test time on CPU; these shapes are tiny, so XLA's optimisation passes
# cost more than they save. Read once when jax is imported, hence before the import.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# The stores the tests' small corpora are tokenized into stay out of the user's cache.
os.environ.setdefault("TITANS_JAX_STORES", tempfile.mkdtemp(prefix="titans-test-stores-"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/titans-jax/jax-cache")),
)
# The default (1 s) would leave almost every small test compile uncached.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


WORDS = "the memory writes what surprises it and forgets what it no longer needs while attention reads".split()


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """40 small documents: train/ and valid/ folders of .txt and .jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("valid", 4)):
        (root / split).mkdir()
        for i in range(count):
            words = rng.choice(WORDS, size=int(rng.integers(60, 200)))
            (root / split / f"doc{i:02d}.txt").write_text(" ".join(words) + ".\n")
    rows = [json.dumps({"text": " ".join(rng.choice(WORDS, size=80))}) for _ in range(6)]
    (root / "train" / "more.jsonl").write_text("\n".join(rows) + "\n")
    return root
