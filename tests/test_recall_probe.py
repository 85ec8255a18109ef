"""scripts/recall_probe.py: the episode rows are what the docstring says; a tiny run end to end; bad
arguments fail in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import recall_probe  # noqa: E402


def test_rows_mark_exactly_the_recalled_digits():
    tokens, recalled = recall_probe.episode_rows(np.random.default_rng(0), 3, 200, gap=30)
    assert tokens.shape == (3, 201) and recalled.shape == (3, 200)
    for row, marks in zip(tokens, recalled):
        text = bytes(row.astype(np.uint8)).decode()
        key, noise, recall = text[:8], text[8:38], text[41:49]  # "KEY<30 bytes of noise> = KEY. "
        assert key.isdigit() and recall == key and noise in recall_probe.niah.NOISE * 2 and text[38:41] == " = "
        assert text[49:51] == ". " and text[51:59].isdigit()
        # targets t + 1 that are recalled digits: positions 41..48 of the row
        assert np.array_equal(np.flatnonzero(marks[:60]), np.arange(40, 48))
        assert all(chr(row[t + 1]).isdigit() for t in np.flatnonzero(marks))


def test_tiny_run_and_bad_arguments(tmp_path):
    args = recall_probe.parse_args(["--config", "tiny", "--set", "model.variant=swa", "--gap", "4", "--steps", "2",
                                    "--batch", "2", "--seq-len", "64", "--log-every", "1", "--out", str(tmp_path)])
    result = recall_probe.main(args)
    assert result["step"] == 2 and 0 <= result["recall_acc"] <= 1 and result["recall_nll"] > 0
    assert len((tmp_path / "probe.jsonl").read_text().splitlines()) == 2
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "recall_probe.py"), "--gap", "300", "--seq-len", "64"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "recall_probe: --seq-len 64 holds less than two episodes of gap 300: use --seq-len >= 642"]
