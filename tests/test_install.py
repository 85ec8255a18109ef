"""One import namespace: the distribution installs `titans` alone (its folders titans/, kernels/,
train/, configs/ as `titans`, `titans.kernels`, `titans.train`, `titans.presets`), so packages
named `kernels` or `train` by other distributions (Hugging Face's `kernels` among them) import
beside it."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"titans": "titans", "kernels": "titans.kernels", "train": "titans.train"}


def test_the_namespace_imports_from_outside_the_checkout_beside_other_kernels_and_train(tmp_path):
    """From a folder where the checkout cannot shadow anything, with stand-ins for other
    distributions' top-level `kernels` and `train` packages on the path."""
    for name in ("kernels", "train"):
        (tmp_path / "other" / name).mkdir(parents=True)
        (tmp_path / "other" / name / "__init__.py").write_text(f"WHO = 'another distribution ({name})'\n")
    code = textwrap.dedent("""
        import kernels, train, titans, titans.kernels.memory, titans.train.trainer, titans.memory_layer
        assert kernels.WHO == "another distribution (kernels)" and train.WHO == "another distribution (train)"
        assert titans.load_preset("tiny").variant == "mac", "presets not found"
        print("\\n".join(m.__file__ for m in (titans, titans.kernels, titans.train)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path / "other"), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [Path(p).resolve().parent for p in proc.stdout.split()] == [ROOT / "titans", ROOT / "kernels", ROOT / "train"]
    alone = subprocess.run([sys.executable, "-c", "import kernels"], cwd=tmp_path, capture_output=True, text=True)
    assert "No module named 'kernels'" in alone.stderr  # this project installs no top-level `kernels`


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject.toml lists its packages (its folders map onto the namespace): none may be missing."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join((FOLDERS[top], *p.parent.relative_to(ROOT / top).parts))
        for top in FOLDERS
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"titans.presets"} == listed
