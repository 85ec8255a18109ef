"""Run a command line of scripts/ in the test process, as `python scripts/<name>.py ARGS` would:
its exit status, stdout and stderr. In-process, a script shares the test's compiled programs; a
subprocess (for what needs a fresh process: signals, 64-bit JAX, device counts) costs a JAX start."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of scripts/<name>.py with `argv`; a user error exits 1 with its
    one line on stderr, as Python prints a `sys.exit(message)`."""
    main = runpy.run_path(str(ROOT / "scripts" / f"{name}.py"), run_name=f"scripts.{name}")["main"]
    from titans.train import cli

    out, err = io.StringIO(), io.StringIO()
    argv0 = str(ROOT / "scripts" / f"{name}.py")  # what argparse names the program by
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), mock.patch.object(sys, "argv", [argv0]):
        try:
            cli.run(name, main, list(argv))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=err)
    return code, out.getvalue(), err.getvalue()


def logged_losses(out: Path) -> dict[int, float]:
    """{step: training loss} of a run folder's metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
