"""BABILong-style tasks (babi-qa1, babi-qa2, babi-count): prompts have the exact length, a story whose
facts follow one another at sentence ends of the filler's first `depth`, and an answer that the facts
parsed back out of the prompt give again when replayed here; one-word scoring; the grid runner and
the training rows take the tasks; bad names and short lengths fail in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.scripts import run_script
from titans.tokenizer import ByteTokenizer, load_tokenizer
from titans.train.config import DataConfig
from titans.train.data import babi, bpe, needles
from titans.train.eval import niah as niah_eval

TASKS = ("babi-qa1", "babi-qa2", "babi-count")
TOK = ByteTokenizer()
HAY_TEXT = "It was a fine day. The rain had stopped. She walked to the village. "
HAYSTACK = np.asarray(TOK.encode(HAY_TEXT * 40), np.int32)

# The world, restated here rather than imported, so that the answers are derived independently.
MOVE = ("went to", "journeyed to", "travelled to", "moved to")
PICK = ("picked up", "grabbed", "took")
DROP = ("dropped", "put down", "discarded")
PLACES = {"kitchen", "garden", "bathroom", "office", "hallway", "bedroom"}
OBJECTS = {"football", "apple", "milk"}
FACT = re.compile(rf" ([A-Z][a-z]+) ({'|'.join(MOVE + PICK + DROP)}) the ([a-z]+)\.")
FACT_COUNT = {"babi-qa1": (6, 10), "babi-qa2": (8, 12), "babi-count": (8, 12)}


def solve(story: str, question: str) -> str:
    """Replay the facts of `story` under bAbI's rules, checking that each is possible (a move goes
    elsewhere, only someone somewhere picks up an object nobody holds and that lies there or was
    never seen, only its holder drops it), and answer `question` from the final state."""
    place, holder, lies, handled = {}, {}, {}, set()
    for who, verb, what in FACT.findall(story):
        if verb in MOVE:
            assert what in PLACES and place.get(who) != what, (who, verb, what)
            place[who] = what
        elif verb in PICK:
            assert what in OBJECTS and who in place and what not in holder, (who, verb, what)
            assert lies.get(what, place[who]) == place[who], (who, verb, what)
            holder[what], handled = who, handled | {who}
        else:
            assert holder.get(what) == who, (who, verb, what)
            del holder[what]
            lies[what], handled = place[who], handled | {who}
    if m := re.fullmatch(r"\nWhere is the ([a-z]+)\? Answer:", question):
        thing = m.group(1)
        return place[holder[thing]] if thing in holder else lies[thing]  # KeyError: never seen
    if m := re.fullmatch(r"\nWhere is ([A-Z][a-z]+)\? Answer:", question):
        return place[m.group(1)]
    who = re.fullmatch(r"\nHow many objects is ([A-Z][a-z]+) carrying\? Answer:", question).group(1)
    assert who in handled
    return ("none", "one", "two", "three")[list(holder.values()).count(who)]


def parse(sample: needles.Sample, tokenizer) -> dict:
    """A prompt taken apart: its header, its facts' token encodings, where each starts and how many
    filler tokens come before it, the filler's tokens and text, and the answer re-derived from the
    facts parsed out of the text."""
    text = tokenizer.decode(sample.tokens)
    question = tokenizer.decode(sample.tokens[len(sample.tokens) - sample.question_len :])
    assert text.endswith(question) and question.startswith("\nWhere is" if "qa" in sample.task else "\nHow many")
    header = text[: text.index("\n") + 1]
    body = text[len(header) : len(text) - len(question)]
    facts = [m.group() for m in FACT.finditer(body)]
    low, high = FACT_COUNT[sample.task]
    assert low <= len(facts) <= high, facts
    # Walk the tokens: each fact is the exact encoding of its text (the pieces are encoded apart);
    # every other token is filler.
    encoded = [np.asarray(tokenizer.encode(f), np.int32) for f in facts]
    at, stop = len(tokenizer.encode(header)), len(sample.tokens) - sample.question_len
    filler, before, starts, k = [], [], [], 0
    while at < stop:
        if k < len(facts) and np.array_equal(sample.tokens[at : at + len(encoded[k])], encoded[k]):
            before.append(len(filler))
            starts.append(at)
            at, k = at + len(encoded[k]), k + 1
        else:
            filler.append(sample.tokens[at])
            at += 1
    assert k == len(facts)
    return {"encoded": encoded, "before": before, "starts": starts, "filler": np.asarray(filler),
            "filler_text": tokenizer.decode(np.asarray(filler, np.int32)), "header": header,
            "answer": solve(body, question)}


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """A byte-level BPE of 300 ids trained on the haystack and some story sentences."""
    folder = tmp_path_factory.mktemp("bpe")
    texts = [HAY_TEXT * 5, "Mary went to the kitchen. John picked up the football. Sandra dropped the milk. " * 5]
    bpe.train_bpe(texts, 300, folder)
    return load_tokenizer(folder)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("tok_name", ["byte", "bpe"])
def test_prompts_have_exact_length_and_a_story_that_answers_the_question(task, tok_name, bpe_tok):
    tok = TOK if tok_name == "byte" else bpe_tok
    haystack = np.asarray(tok.encode(HAY_TEXT * 40), np.int32)
    period = tok.encode(".")[-1]
    for length in (needles.fixed_size(task, tok), 1500, 4096):
        for depth in (0.0, 0.3, 1.0):
            for seed in (0, 1):
                s = needles.make_sample(task, length, depth, seed, tok, haystack)
                assert s.tokens.shape == (length,) and s.tokens.dtype == np.int32
                p = parse(s, tok)
                assert s.expected == p["answer"], (task, length, depth, seed)
                # needle_at / needle_len: the first fact's start to the last fact's end
                assert s.needle_at == p["starts"][0]
                assert s.needle_at + s.needle_len == p["starts"][-1] + len(p["encoded"][-1])
                # in order, each at the filler's start or after a sentence end, all within its first `depth`
                n = len(p["filler"])
                assert n == length - len(tok.encode(p["header"])) - sum(map(len, p["encoded"])) - s.question_len
                assert all(b <= round(depth * n) for b in p["before"]), (p["before"], depth, n)
                assert all(b == 0 or p["filler"][b - 1] == period for b in p["before"])
                # the filler is the haystack read from a sentence start
                assert p["filler_text"].lstrip().startswith(("It was", "The rain", "She walked"))
                assert p["filler_text"].strip() in HAY_TEXT * (len(p["filler_text"]) // len(HAY_TEXT) + 2)
    # depth 1 spreads the story over the whole filler
    spread = [parse(needles.make_sample(task, 4096, 1.0, seed, tok, haystack), tok) for seed in range(4)]
    assert max(p["before"][-1] / len(p["filler"]) for p in spread) > 0.7


@pytest.mark.parametrize("task", TASKS)
def test_stories_are_deterministic_and_varied(task):
    samples = [needles.make_sample(task, 1024, 0.5, seed, TOK, HAYSTACK) for seed in range(60)]
    again = needles.make_sample(task, 1024, 0.5, 7, TOK, HAYSTACK)
    assert np.array_equal(again.tokens, samples[7].tokens) and again.expected == samples[7].expected
    assert len({TOK.decode(s.tokens) for s in samples}) == len(samples)
    answers = {s.expected for s in samples}
    if task == "babi-count":
        assert answers == {"none", "one", "two", "three"}
    else:
        assert len(answers) >= 5
    for s in samples[:20]:
        assert parse(s, TOK)["answer"] == s.expected


def test_scoring():
    assert needles.score("babi-qa1", "kitchen", " kitchen")
    assert needles.score("babi-qa1", "kitchen", " Kitchen.\n")
    assert needles.score("babi-qa2", "garden", ' "garden", she said')
    assert needles.score("babi-count", "two", "two")
    assert not needles.score("babi-qa1", "kitchen", " the kitchen")  # the first word counts
    assert not needles.score("babi-qa1", "kitchen", " kitchens")
    assert not needles.score("babi-count", "two", " one or two")
    assert not needles.score("babi-qa2", "garden", "")


def test_bad_names_and_short_lengths_fail():
    with pytest.raises(ValueError, match="unknown task 'babi-qa3'"):
        needles.make_sample("babi-qa3", 2048, 0.5, 0, TOK, HAYSTACK)
    for task in TASKS:
        need = needles.fixed_size(task, TOK)
        for seed in range(30):  # fixed_size bounds every story
            needles.make_sample(task, need, 0.5, seed, TOK, HAYSTACK)
        with pytest.raises(ValueError, match=f"use lengths >= {need}"):
            needles.make_sample(task, 200, 0.5, 0, TOK, HAYSTACK)
        with pytest.raises(ValueError, match=f"length {need - 1} is below the {task} prompt's fixed size"):
            niah_eval.check_lengths(niah_eval.Grid((task,), (need - 1,), (0.5,)), TOK)
        with pytest.raises(ValueError, match="needs a real-text haystack"):
            needles.make_sample(task, 2048, 0.5, 0, TOK, None)


def test_runner_scores_a_reader_of_the_story(monkeypatch):
    """The grid runner, with a stand-in for `titans.generate` that answers from the facts it reads
    (every sample right) or always says "kitchen"."""

    def reader(always=None):
        def generate(model, prompts, max_new_tokens, *, prefill_piece, stop_tokens):
            assert max_new_tokens >= len(TOK.encode(" bathroom\n")) and list(stop_tokens) == list(TOK.encode("\n"))
            out = []
            for ids in np.asarray(prompts):
                text = TOK.decode(ids)
                cut = text.rindex("\n")
                answer = always or solve(text[:cut], text[cut:])
                out.append(TOK.encode(f" {answer}.\nmore")[:max_new_tokens])
            return out

        return generate

    grid = niah_eval.Grid(TASKS, (1024, 1500), (0.0, 0.5, 1.0), samples=2, seed=3)
    monkeypatch.setattr(niah_eval, "generate", reader())
    results = list(niah_eval.run(None, TOK, grid, haystack=HAYSTACK, batch=4, piece=512))
    assert len(results) == 3 * 2 * 3 * 2 and all(r["correct"] for r in results)
    assert niah_eval.accuracy_table(results) == {t: {1024: 100.0, 1500: 100.0} for t in TASKS}
    monkeypatch.setattr(niah_eval, "generate", reader(always="kitchen"))
    guessed = list(niah_eval.run(None, TOK, grid, haystack=HAYSTACK, batch=4, piece=512))
    assert [r["correct"] for r in guessed] == [r["expected"] == "kitchen" for r in guessed]


@pytest.mark.parametrize("task", TASKS)
def test_needle_rows_end_in_the_answer(task):
    assert DataConfig(needle_fraction=0.5, needle_tasks=f"passkey,{task}").tasks() == ("passkey", task)
    for i in range(6):
        tokens, answer_len = needles.needle_row(np.random.default_rng(i), 1025, 800, 1025, (task,), TOK, HAYSTACK)
        assert tokens.shape == (1025,) and tokens.dtype == np.int32
        text = TOK.decode(tokens)
        prompt = text[text.index(babi.HEADER) + len(babi.HEADER) :]
        question = re.search(r"\n(Where is|How many)[^\n]*Answer:", prompt)
        answer = solve(prompt[: question.start()], question.group())
        assert text.endswith(f"Answer: {answer}.\n") and answer_len == len(TOK.encode(f" {answer}.\n"))


def test_script_runs_the_tasks(tmp_path):
    """A random tiny model end to end, and a bad task name in one line."""
    hay = tmp_path / "hay.txt"
    hay.write_text(HAY_TEXT * 30)
    out = tmp_path / "out"
    code, stdout, stderr = run_script("niah", "--preset", "tiny", "--tasks", ",".join(TASKS), "--lengths", "1K",
                                      "--depths", "1", "--haystack", str(hay), "--out", str(out), "--no-progress",
                                      "--piece", "512")
    assert code == 0, stderr
    saved = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in saved["samples"]] == list(TASKS) and set(saved["accuracy"]) == set(TASKS)
    assert "| babi-count |" in (out / "results.md").read_text() and "| babi-qa1 |" in stdout
    code, _, stderr = run_script("niah", "--preset", "tiny", "--tasks", "babi-qa9", "--out", str(tmp_path / "x"))
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "unknown task 'babi-qa9'" in stderr, stderr
