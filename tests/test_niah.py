"""Needle-in-a-haystack: prompts have the exact length with the needle at its depth; scoring follows
passkey / RULER; the runner hands whole prompts to generation (a reader that finds the needle scores
100%, one that misses the first piece scores 0); training rows of the retrieval recipe; script errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.scripts import run_script
from titans.configfile import ConfigError
from titans.tokenizer import ByteTokenizer
from titans.train.config import DataConfig, TrainError, load_run_config
from titans.train.data import needles, pipeline
from titans.train.eval import niah as niah_eval
from titans.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TOK = ByteTokenizer()
HAYSTACK = np.asarray(TOK.encode("It was a fine day. The rain had stopped. She walked to the village. " * 40), np.int32)
NEEDLE = {"passkey": r"The pass key is (\d+)\.", "s-niah-1": r"magic numbers for [a-z-]+ is: (\d+)\.",
          "s-niah-2": r"magic numbers for [a-z-]+ is: (\d+)\.", "s-niah-3": r"magic uuids for [a-z-]+ is: ([0-9a-f-]{36})\."}


@pytest.mark.parametrize("task", list(NEEDLE))  # the BABILong-style tasks: tests/test_babi.py
@pytest.mark.parametrize("length", [600, 1000, 1537])
def test_sample_has_exact_length_and_needle_at_depth(task, length):
    for depth in (0.0, 0.3, 1.0):
        s = needles.make_sample(task, length, depth, seed=7, tokenizer=TOK, haystack=HAYSTACK)
        assert s.tokens.shape == (length,) and s.tokens.dtype == np.int32
        text = TOK.decode(s.tokens)
        found = [m.group(1) for m in re.finditer(NEEDLE[task], text)]
        assert found == [s.expected] and text.count(s.expected) == 2 - (task != "passkey")
        assert TOK.decode(s.tokens[s.needle_at :]).lstrip().startswith(("The pass key", "One of the special"))
        header = len(TOK.encode(text.split("\n")[0] + "\n"))
        needle = re.match(r"\nThe pass key is \d+\. Remember it\. \d+ is the pass key\.\n|"
                          r" One of the special magic \w+ for [a-z-]+ is: [0-9a-f-]+\.", TOK.decode(s.tokens[s.needle_at:]))
        question = len(TOK.encode(text[text.index("\nWhat is"):]))
        assert (s.needle_len, s.question_len) == (len(TOK.encode(needle.group())), question)
        filler = length - header - question - s.needle_len
        position = (s.needle_at - header) / filler
        # passkey: any token; S-NIAH: the nearest sentence end (one every ~20 tokens here)
        assert abs(position - depth) <= (0.01 if task == "passkey" else 30 / filler), (depth, position)
    a, b = (needles.make_sample(task, length, 0.5, seed, TOK, HAYSTACK) for seed in (1, 2))
    assert a.expected != b.expected
    assert np.array_equal(a.tokens, needles.make_sample(task, length, 0.5, 1, TOK, HAYSTACK).tokens)


def test_lengths_below_the_prompt_fail():
    need = needles.fixed_size("s-niah-3", TOK)
    needles.make_sample("s-niah-3", need, 0.5, 0, TOK, HAYSTACK)
    with pytest.raises(ValueError, match=f"use lengths >= {need}"):
        needles.make_sample("s-niah-3", need - 50, 0.5, 0, TOK, HAYSTACK)
    grid = niah_eval.Grid(("passkey",), (4096, 100), (0.5,))
    with pytest.raises(ValueError, match="length 100 is below the passkey prompt"):
        niah_eval.check_lengths(grid, TOK)
    with pytest.raises(ValueError, match="unknown task 'niah'"):
        niah_eval.Grid(("niah",), (4096,), (0.5,))


def test_scoring():
    assert needles.score("passkey", "4217", " 4217. Remember")
    assert not needles.score("passkey", "4217", " 42170")
    assert not needles.score("passkey", "4217", " 17 then 4217")  # the first integer counts
    assert needles.score("s-niah-3", "ab-CD", "it is AB-cd.")
    assert not needles.score("s-niah-1", "1234567", " 123456")


def test_parse_and_format_lengths():
    assert [niah_eval.parse_length(s) for s in ("4096", "4K", "2M")] == [4096, 4096, 2_097_152]
    assert niah_eval.format_length(2_097_152) == "2M" and niah_eval.format_length(1000) == "1000"
    with pytest.raises(ValueError, match="positive count"):
        niah_eval.parse_length("2G")


def reader(skip: bool = False):
    """A stand-in for `titans.generate` that reads each whole prompt and answers with the needle's
    value it saw (or, with `skip`, misses the first prefill piece), then the stop token."""

    def generate(model, prompts, max_new_tokens, *, prefill_piece, stop_tokens):
        assert max_new_tokens > 0 and list(stop_tokens) == list(TOK.encode("\n"))
        out = []
        for ids in np.asarray(prompts):
            seen = TOK.decode(ids[prefill_piece:] if skip else ids)
            value = re.search(r"(?:is: |The pass key is )([0-9a-f-]+)\.", seen.partition("\nWhat is")[0])
            out.append(TOK.encode(f" {value.group(1) if value else '?'}\n")[:max_new_tokens])
        return out

    return generate


def test_runner_feeds_whole_prompts_and_scores(monkeypatch):
    grid = niah_eval.Grid(tuple(NEEDLE), (1500, 2048), (0.0, 0.5, 1.0), samples=2, seed=3)
    monkeypatch.setattr(niah_eval, "generate", reader())
    results = list(niah_eval.run(None, TOK, grid, haystack=HAYSTACK, batch=4, piece=512))
    assert len(results) == 4 * 2 * 3 * 2
    assert all(r["correct"] for r in results), [r for r in results if not r["correct"]][:2]
    assert len({r["expected"] for r in results}) == len(results)
    monkeypatch.setattr(niah_eval, "generate", reader(skip=True))
    missed = list(niah_eval.run(None, TOK, grid, haystack=HAYSTACK, batch=3, piece=512))
    depth0 = [r for r in missed if r["depth"] == 0.0]
    assert depth0 and not any(r["correct"] for r in depth0)  # the needle was in the lost piece
    table = niah_eval.accuracy_table(results)
    assert table == {t: {1500: 100.0, 2048: 100.0} for t in NEEDLE}
    md = niah_eval.markdown(missed, "t")
    assert "| passkey |" in md and "| 0% |" in md


def test_needle_rows_are_deterministic_and_answered():
    mix = pipeline.NeedleMix(0.5, ("passkey", "s-niah-2"), 448, 10, TOK, answer_weight=8.0)
    rows = [mix.row(i, HAYSTACK[:1025].copy(), HAYSTACK, (0, 0), batch_size=2) for i in range(40)]
    again = [mix.row(i, HAYSTACK[:1025].copy(), HAYSTACK, (0, 0), batch_size=2) for i in range(40)]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(rows, again) for k in ("tokens", "weights"))
    text_rows = [r for r in rows if np.array_equal(r["tokens"], HAYSTACK[:1025])]
    assert all(np.array_equal(r["weights"], np.ones(1024)) for r in text_rows)
    tasks = [(i, r["tokens"], r["weights"]) for i, r in enumerate(rows) if not np.array_equal(r["tokens"], HAYSTACK[:1025])]
    assert 10 <= len(tasks) <= 30 and all(r.shape == (1025,) and w.shape == (1024,) for _, r, w in tasks)
    lengths = []
    for i, r, w in tasks:
        text = TOK.decode(r)
        value = re.search(r"(?:is: |The pass key is )(\d+)\.", text).group(1)
        assert text.endswith(f" is {value}.\n")
        # exactly the answer " value.\n" is weighted (weights[t] is the weight of predicting token t + 1)
        heavy = len(TOK.encode(f" {value}.\n"))
        assert np.array_equal(w, np.r_[np.ones(1024 - heavy), np.full(heavy, 8.0)])
        # the curriculum caps a task's length: 448 tokens at step 0, the whole row from step 10
        length = 1025 - text.index("There is an important" if "pass key" in text else "A special magic")
        assert 448 <= length <= 448 + min(1, (i // 2) / 10) * (1025 - 448), (i, length)
        lengths.append(length)
    assert max(lengths) > 900


def test_recall_rows_are_mixed_in_and_weighted():
    mix = pipeline.NeedleMix(0.25, ("passkey",), 448, 0, TOK, answer_weight=5.0, recall_fraction=0.5, recall_max_gap=40)
    # the gap curriculum: at step 0 of 10 every filler is empty, the recall right after its key
    early = pipeline.NeedleMix(0.0, ("passkey",), 448, 10, TOK, recall_fraction=1.0, recall_max_gap=40)
    first = early.row(0, HAYSTACK[:513].copy(), HAYSTACK, (0, 1), batch_size=2)["tokens"]
    assert TOK.decode(first[:8]) == TOK.decode(first[11:19]) and TOK.decode(first[8:11]) == " = "
    rows = [mix.row(i, HAYSTACK[:513].copy(), HAYSTACK, (0, 1), batch_size=2) for i in range(60)]
    recall = [r for r in rows if TOK.decode(r["tokens"][:8]).isdigit()]
    assert 18 <= len(recall) <= 42
    for r in recall:
        tokens, weights = r["tokens"], r["weights"]
        heavy = np.flatnonzero(weights == 5.0) + 1  # the tokens whose prediction is weighted
        assert len(heavy) >= 8 and all(chr(tokens[t]).isdigit() for t in heavy)
        assert np.array_equal(tokens[heavy[:8]], tokens[:8])  # the first episode's key, recalled
        assert np.all(weights[weights != 5.0] == 1.0)


def test_needle_config_is_validated():
    with pytest.raises(ConfigError, match="unknown task 'bogus'"):
        DataConfig(needle_fraction=0.5, needle_tasks="passkey,bogus")
    with pytest.raises(ConfigError, match="needle_fraction"):
        DataConfig(needle_fraction=1.5)
    with pytest.raises(ConfigError, match="recall_fraction must be in"):
        DataConfig(needle_fraction=0.7, recall_fraction=0.5)
    with pytest.raises(ConfigError, match="needle_answer_weight must be > 0"):
        DataConfig(needle_fraction=0.5, needle_answer_weight=0.0)


def test_script_smoke_and_errors(tmp_path):
    """A random tiny model end to end (results.json, results.md); bad inputs fail in one line."""
    hay = tmp_path / "hay.txt"
    hay.write_text("The rain had stopped. She walked to the village. " * 30)
    out = tmp_path / "out"
    code, stdout, stderr = run_script("niah", "--preset", "tiny", "--tasks", "passkey,s-niah-2", "--lengths", "512,1K",
                                      "--depths", "2", "--haystack", str(hay), "--out", str(out), "--no-progress",
                                      "--piece", "256")
    assert code == 0, stderr
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["samples"]) == 2 * 2 * 2 and saved["tokenizer"] == "byte" and saved["peak_rss_mb"] > 0
    assert set(saved["accuracy"]) == {"passkey", "s-niah-2"} and saved["variant"] == "mac"
    assert "| s-niah-2 |" in (out / "results.md").read_text() and "| s-niah-2 |" in stdout
    for args, message in [
        (["--preset", "tiny", "--tasks", "nope"], "unknown task 'nope'"),
        (["--preset", "tiny", "--lengths", "100"], "length 100 is below"),
        (["--checkpoint", str(tmp_path), "--set", "model.d_model=8"], "--set changes a preset"),
        (["--checkpoint", str(tmp_path)], "is neither a run folder"),
    ]:
        code, _, stderr = run_script("niah", *args, "--out", str(tmp_path / "x"))
        assert code == 1 and len(stderr.strip().splitlines()) == 1 and stderr.startswith("niah: "), stderr
        assert message in stderr, stderr
    assert not (tmp_path / "x").exists()


def test_script_runs_in_float64(tmp_path):
    """`--float64` (its own process: it switches JAX to 64 bits) names itself in the results."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "niah.py"), "--preset", "tiny", "--set",
                           "model.variant=lmm", "--tasks", "passkey", "--lengths", "512", "--depths", "1",
                           "--float64", "--no-progress", "--piece", "256", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "(random weights), float64: lmm" in (tmp_path / "results.md").read_text()


def test_bad_needle_length_fails_before_touching_the_run(tmp_path):
    run = load_run_config("tiny", ["data.needle_fraction=0.5"])  # rows of 65 tokens cannot hold a task
    with pytest.raises(TrainError, match=r"data.needle_min_len=512 must lie in \[411, train.seq_len \+ 1 = 65\]"):
        train(run, tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()
