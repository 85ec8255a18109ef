"""The import names `kernels` and `train` are also unrelated PyPI distributions: the ones that
import, from outside the checkout (where the checkout cannot shadow them), must be this project's."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installed_top_level_packages_are_this_project(tmp_path):
    code = (
        "import kernels, titans, train, kernels.memory, titans.memory_layer; "
        "print('\\n'.join(m.__file__ for m in (kernels, titans, train)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in proc.stdout.split():
        assert Path(path).resolve().parent.parent == ROOT, path
