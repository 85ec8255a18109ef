"""The import names `kernels` and `train` are also unrelated PyPI distributions: the ones that
import here must be this project's."""

from pathlib import Path

import kernels
import titans
import train

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_packages_are_this_project():
    for module in (kernels, titans, train):
        assert Path(module.__file__).resolve().parent.parent == ROOT, module.__file__


def test_public_api_imports():
    from kernels.memory import MemoryState, memory_scan  # noqa: F401
    from titans.memory_layer import MemoryLayer, MemoryLayerConfig  # noqa: F401
