"""The import names `kernels` and `train` are also unrelated PyPI distributions: the ones that
import, from outside the checkout (where the checkout cannot shadow them), must be this project's."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installed_top_level_packages_are_this_project(tmp_path):
    code = (
        "import kernels, titans, train, kernels.memory, titans.memory_layer; "
        "assert titans.load_preset('tiny').variant == 'mac', 'presets not found'; "
        "print('\\n'.join(m.__file__ for m in (kernels, titans, train)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in proc.stdout.split():
        assert Path(path).resolve().parent.parent == ROOT, path


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject.toml lists its packages (so configs/ can ship as titans.presets): none may be missing."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("titans", "kernels", "train")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"titans.presets"} == listed
