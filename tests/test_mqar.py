"""MQAR (titans.train.eval.mqar, scripts/mqar.py): rows re-derived from their own tokens, the state
sizes, a tiny grid end to end (and reused when rerun), bad arguments in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import titans
from tests.scripts import run_script
from titans.train.eval import mqar


def test_rows_hold_pairs_then_each_key_queried_once_with_its_value_scored():
    task = mqar.Task(vocab=64, seq_len=48, pairs=6)
    tokens, scored = mqar.rows(np.random.default_rng(3), task, 5)
    again = mqar.rows(np.random.default_rng(3), task, 5)
    assert np.array_equal(tokens, again[0]) and np.array_equal(scored, again[1])  # deterministic per seed
    assert not np.array_equal(tokens, mqar.rows(np.random.default_rng(4), task, 5)[0])
    assert tokens.shape == (5, 49) and tokens.dtype == np.int32 and scored.shape == (5, 48)
    assert tokens.min() >= 0 and tokens.max() < 64
    for row, marks in zip(tokens, scored):
        keys, values = row[0:12:2], row[1:12:2]
        assert len(set(keys)) == 6 and len(set(values)) == 6  # distinct: every answer is unique
        assert keys.min() >= 1 and keys.max() < 32 and values.min() >= 32
        pairs = dict(zip(keys.tolist(), values.tolist()))
        queried = np.flatnonzero(marks)  # target t + 1 is scored: row[t] is the queried key
        assert len(queried) == 6 and np.all(queried >= 12) and np.all((queried - 12) % 2 == 0)
        assert sorted(row[queried].tolist()) == sorted(keys.tolist())  # each key once
        assert all(row[t + 1] == pairs[row[t]] for t in queried)


def test_short_gaps_are_likelier():
    """Zoology's power law: across many rows, query slots near the pairs are drawn far more often."""
    task = mqar.Task(vocab=512, seq_len=256, pairs=4)
    _, scored = mqar.rows(np.random.default_rng(0), task, 400)
    slots = (np.flatnonzero(scored.reshape(-1) ) % 256 - 8) // 2
    counts = np.bincount(slots, minlength=124)
    assert counts[:10].sum() > 2 * counts[-10:].sum() > 0


def test_state_floats_count_memory_and_ring():
    # 2 memory heads of 32, depth 2, expansion 2; window 16, attention width 64
    memory = 2 * 2 * (32 * 64 + 64 * 32)
    ring = 2 * 16 * 64
    for variant, want in (("lmm", memory), ("swa", ring), ("mag", memory + ring), ("mac", memory + ring)):
        assert mqar.state_floats(titans.load_preset("mqar", variant=variant)) == want


@pytest.mark.parametrize("args, message", [
    (dict(vocab=10, seq_len=64, pairs=8), "a vocabulary of at least 18 ids"),
    (dict(vocab=64, seq_len=16, pairs=8), "use a length >= 32"),
    (dict(vocab=64, seq_len=64, pairs=0), "pairs >= 1"),
])
def test_task_validation(args, message):
    with pytest.raises(ValueError, match=message):
        mqar.Task(**args)


def test_tiny_grid_end_to_end_and_reused(tmp_path):
    args = ("--config", "tiny", "--rows", "swa,lmm-linear", "--widths", "32", "--steps", "2", "--batch", "2",
            "--seq-len", "32", "--pairs", "4", "--vocab", "64", "--out", str(tmp_path))
    code, stdout, stderr = run_script("mqar", *args)
    assert code == 0, stderr
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["row"], r["width"]) for r in results] == [("swa", 32), ("lmm-linear", 32)]
    assert all(0 <= r["accuracy"] <= 1 and r["nll"] > 0 for r in results)
    assert "| lmm-linear |" in (tmp_path / "results.md").read_text() and "| swa |" in stdout
    probe = tmp_path / "swa-d32" / "probe.jsonl"
    before = probe.stat().st_mtime_ns
    code, _, stderr = run_script("mqar", *args)
    assert code == 0, stderr
    assert probe.stat().st_mtime_ns == before  # a finished run is read back, not retrained

    code, _, stderr = run_script("mqar", "--config", "tiny", "--rows", "nope", "--out", str(tmp_path))
    assert code == 1 and stderr.strip().splitlines() == [
        "mqar: unknown MQAR row 'nope': choose from swa, lmm, lmm-linear, mag, mac"]
    code, _, stderr = run_script("mqar", "--config", "tiny", "--vocab", "512", "--out", str(tmp_path))
    assert code == 1 and stderr.strip().splitlines() == [
        "mqar: model.vocab_size 260 is below the task's vocabulary 512"]
