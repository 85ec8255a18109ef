"""The recall probe (titans.train.eval.recall, scripts/recall_probe.py): the episode rows are what
the docstring says; a tiny run end to end; bad arguments fail in one line."""

from __future__ import annotations

import json

import numpy as np

from tests.scripts import run_script
from titans.train.data.needles import NOISE
from titans.train.eval import recall as recall_probe


def test_rows_mark_exactly_the_recalled_digits():
    tokens, recalled = recall_probe.episode_rows(np.random.default_rng(0), 3, 200, gap=30)
    assert tokens.shape == (3, 201) and recalled.shape == (3, 200)
    for row, marks in zip(tokens, recalled):
        text = bytes(row.astype(np.uint8)).decode()
        key, noise, recall = text[:8], text[8:38], text[41:49]  # "KEY<30 bytes of noise> = KEY. "
        assert key.isdigit() and recall == key and noise in NOISE * 2 and text[38:41] == " = "
        assert text[49:51] == ". " and text[51:59].isdigit()
        # targets t + 1 that are recalled digits: positions 41..48 of the row
        assert np.array_equal(np.flatnonzero(marks[:60]), np.arange(40, 48))
        assert all(chr(row[t + 1]).isdigit() for t in np.flatnonzero(marks))


def test_tiny_run_and_bad_arguments(tmp_path):
    code, stdout, stderr = run_script("recall_probe", "--config", "tiny", "--set", "model.variant=swa", "--gap", "4",
                                      "--steps", "2", "--batch", "2", "--seq-len", "64", "--log-every", "1",
                                      "--out", str(tmp_path))
    assert code == 0, stderr
    rows = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and stdout.count("recall accuracy") == 2
    assert 0 <= rows[-1]["recall_acc"] <= 1 and rows[-1]["recall_nll"] > 0
    code, _, stderr = run_script("recall_probe", "--gap", "300", "--seq-len", "64")
    assert code == 1
    assert stderr.strip().splitlines() == [
        "recall_probe: --seq-len 64 holds less than two episodes of gap 300: use --seq-len >= 642"]
