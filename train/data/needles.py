"""Needle-in-a-haystack prompts of an exact token length: classic passkey, RULER-style S-NIAH-1/2/3
and the BABILong-style babi-qa1/qa2/count.

A prompt is `header | filler[:a] | needle | filler[a:] | question`, exactly `length` tokens; the
model's greedy continuation is scored against the needle's value.

- `passkey` (Mohtashami & Jaggi 2023): the grass/sky/sun noise, "The pass key is K. Remember it.
  K is the pass key." at any token of the filler, K uniform in 1..50000; the first integer of the
  answer must equal K.
- `s-niah-1/2/3` (RULER's niah_single_1/2/3): "One of the special magic numbers for {key} is:
  {value}." after a sentence end of the noise (1) or of real text (2: 7-digit number; 3: UUID);
  correct when the value appears in the answer (RULER's string match, case-insensitive).
- `babi-qa1`, `babi-qa2`, `babi-count` (BABILong-style, `titans.train.data.babi`): the needles are
  a bAbI-like story's facts, kept in order at random sentence ends of the real text's first `depth`
  (so depth 1 spreads the story over the whole filler, depth 0 puts it back to back at its start);
  correct when the answer's first word, case and punctuation aside, is the expected one.

Otherwise `depth` in [0, 1] is the fraction of the filler before the needle. The real-text
haystack is the held-out text given (Austen by default, whitespace-normalised and repeated as RULER
repeats its essays) starting at a seeded offset. Keys are "adjective-noun" pairs from the short
lists below. The same builder makes the training rows of the retrieval recipe (`needle_row`), with
training text as the haystack; `recall_row` makes its dense copy rows.
"""

from __future__ import annotations

import dataclasses
import re
import string
import uuid

import numpy as np

from titans.train.data import babi

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                  "I will quiz you about the important information there.\n")
ADJECTIVES = ("quiet brave amber hollow swift pale silver crooked gentle bitter narrow ancient curious golden "
              "restless frozen humble distant velvet scarlet hidden patient rusty lucky").split()
NOUNS = ("harbor lantern meadow falcon orchard compass violin glacier ribbon cottage thistle beacon saddle "
         "pebble canyon quarry walnut anchor kettle sparrow tapestry ladder garnet willow").split()


@dataclasses.dataclass(frozen=True)
class Task:
    haystack: str  # "noise" or "text"
    value: str  # "passkey", "number", "uuid" or "word" (a bAbI-like story's one-word answer)


TASKS = {
    "passkey": Task("noise", "passkey"),
    "s-niah-1": Task("noise", "number"),
    "s-niah-2": Task("text", "number"),
    "s-niah-3": Task("text", "uuid"),
    **{name: Task("text", "word") for name in babi.FACTS},
}
MAX_NEW_TOKENS = {"passkey": 10, "number": 12, "uuid": 44, "word": 12}  # byte tokens: the value, a space, some slack


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    length: int
    depth: float
    seed: int
    tokens: np.ndarray  # [length] int32: the prompt
    expected: str
    needle_at: int  # token index where the (first) needle starts
    needle_len: int  # tokens from the first needle's start to the last one's end: the needle, or a whole story
    question_len: int  # tokens of the question, which ends the prompt


def check_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def normalise(text: str) -> str:
    """Whitespace runs to one space (RULER normalises its essays the same way)."""
    return " ".join(text.split())


def _draw(task_name: str, rng: np.random.Generator) -> tuple[tuple[str, ...], str]:
    """The sample's random choices: its texts (header, needles..., question) and expected answer."""
    task = check_task(task_name)
    if task.value == "word":
        story = babi.story(task_name, rng)
        return (babi.HEADER, *story.facts, story.question), story.expected
    if task.value == "passkey":
        value = str(int(rng.integers(1, 50001)))
        return _texts(task_name, "", value), value
    name = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
    if task.value == "uuid":
        value = str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "little"), version=4))
    else:
        value = str(int(rng.integers(1_000_000, 10_000_000)))
    return _texts(task_name, name, value), value


def _texts(task_name: str, name: str, value: str) -> tuple[str, str, str]:
    """(header, needle, question) around the value."""
    word = check_task(task_name).value
    if word == "passkey":
        return (PASSKEY_HEADER, f"\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
                "\nWhat is the pass key? The pass key is")
    header = (f"A special magic {word} is hidden within the following text. Make sure to memorize it. "
              f"I will quiz you about the {word} afterwards.\n")
    needle = f" One of the special magic {word}s for {name} is: {value}."
    question = (f"\nWhat is the special magic {word} for {name} mentioned in the provided text? "
                f"The special magic {word} for {name} mentioned in the provided text is")
    return header, needle, question


# The longest value of each kind: with the longest key name they make a task's longest prompt.
_LONGEST_VALUE = {"passkey": "50000", "number": "9999999", "uuid": str(uuid.UUID(int=0))}


def fixed_size(task_name: str, tokenizer) -> int:
    """The most tokens a prompt of this task needs besides its filler (the shortest legal length)."""
    if check_task(task_name).value == "word":
        return babi.fixed_size(task_name, tokenizer)
    name = f"{max(ADJECTIVES, key=len)}-{max(NOUNS, key=len)}"
    texts = _texts(task_name, name, _LONGEST_VALUE[check_task(task_name).value])
    return sum(len(tokenizer.encode(t)) for t in texts)


def _cycle(source, offset: int, n: int) -> np.ndarray:
    """`n` tokens of `source` (an array or a token stream: contiguous slices only) from `offset`,
    wrapping around (a haystack repeated as needed), int32."""
    parts, at = [], offset % len(source)
    while n > 0:
        parts.append(np.asarray(source[at : at + n], np.int32))
        n, at = n - len(parts[-1]), 0
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def make_sample(task_name: str, length: int, depth: float, seed: int, tokenizer,
                haystack: np.ndarray | None = None) -> Sample:
    """One prompt of exactly `length` tokens. `haystack`: the real-text tokens (tasks on "text")."""
    task = check_task(task_name)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = np.random.default_rng(seed)
    texts, expected = _draw(task_name, rng)
    head, *pins, tail = (np.asarray(tokenizer.encode(p), np.int32) for p in texts)  # apart: no token spans two
    n = length - len(head) - sum(len(p) for p in pins) - len(tail)
    if n < 0:
        raise ValueError(f"length {length} is below the {task_name} prompt's {length - n} fixed tokens: "
                         f"use lengths >= {fixed_size(task_name, tokenizer)}")
    if task.haystack == "noise":
        source, offset = np.asarray(tokenizer.encode(NOISE), np.int32), 0
    else:
        if haystack is None or len(haystack) == 0:
            raise ValueError(f"task {task_name} needs a real-text haystack")
        source, offset = haystack, int(rng.integers(len(haystack)))
    period = tokenizer.encode(".")[-1]
    if task.value == "word":  # a whole first sentence: the story's first fact may come before it
        filler = _cycle(source, babi.sentence_start(source, offset, period), n)
        ats = [int(a) for a in babi.slots(filler, len(pins), depth, period, rng)]
    else:
        filler = _cycle(source, offset, n)
        at = int(round(depth * n))
        if task.value != "passkey":  # RULER puts the needle after a sentence end
            ends = np.flatnonzero(filler[:-1] == period) + 1
            if len(ends):
                at = int(ends[np.argmin(np.abs(ends - at))])
        ats = [at]
    parts, start = [head], 0
    for at, pin in zip(ats, pins):
        parts += [filler[start:at], pin]
        start = at
    tokens = np.concatenate([*parts, filler[start:], tail])
    span = ats[-1] - ats[0] + sum(len(p) for p in pins)
    return Sample(task_name, length, depth, seed, tokens, expected, len(head) + ats[0], span, len(tail))


def score(task_name: str, expected: str, answer: str) -> bool:
    """Passkey: the answer's first integer equals the key. S-NIAH: the value occurs in the answer.
    bAbI-like: the answer's first word, lower-cased and stripped of punctuation, is the expected one."""
    value = check_task(task_name).value
    if value == "passkey":
        found = re.search(r"\d+", answer)
        return found is not None and found.group() == expected
    if value == "word":
        words = answer.split()
        return bool(words) and words[0].strip(string.punctuation).lower() == expected.lower()
    return expected.lower() in answer.lower()


def needle_row(rng: np.random.Generator, row_len: int, min_len: int, max_len: int, tasks: tuple[str, ...],
               tokenizer, haystack: np.ndarray) -> tuple[np.ndarray, int]:
    """A training row of `row_len` tokens: haystack text, then a task prompt of a random length in
    [min_len, max_len] (answer included) at a random depth, answered (" value.\\n"); and the answer's
    token count (the row's last tokens)."""
    task = tasks[int(rng.integers(len(tasks)))]
    seed = int(rng.integers(2**31))
    expected = _draw(task, np.random.default_rng(seed))[1]  # make_sample draws the same value
    answer = np.asarray(tokenizer.encode(f" {expected}.\n"), np.int32)
    length = int(rng.integers(min_len, min(max_len, row_len) + 1)) - len(answer)
    sample = make_sample(task, length, float(rng.random()), seed, tokenizer, haystack)
    start = int(rng.integers(len(haystack)))
    prefix = _cycle(haystack, start, row_len - length - len(answer))
    return np.concatenate([prefix, sample.tokens, answer]), len(answer)


RECALL_KEY_LEN = 8


def recall_row(rng: np.random.Generator, row_len: int, min_gap: int, max_gap: int,
               tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """A dense recall row: episodes `KEY<filler> = KEY. ` back to back, KEY 8 random digits, the
    filler `min_gap..max_gap` tokens of the passkey noise. Returns tokens `[row_len]` int32 and a
    mask `[row_len]`: True where the token is a recalled one (the second KEY). Recall is the skill
    every needle task needs, here with a whole key recalled per episode instead of a few tokens per
    row. The pieces are encoded apart (bytes when `tokenizer` is None), so the recalled KEY is
    exactly the tokens of the first."""
    encode = (lambda t: np.frombuffer(t.encode(), np.uint8)) if tokenizer is None else tokenizer.encode
    noise = np.asarray(encode(NOISE), np.int32)
    equals, stop = np.asarray(encode(" = "), np.int32), np.asarray(encode(". "), np.int32)
    parts, marks, size = [], [], 0
    while size < row_len:
        key = np.asarray(encode(bytes(rng.integers(ord("0"), ord("9") + 1, RECALL_KEY_LEN).astype(np.uint8)).decode()),
                         np.int32)
        start, gap = int(rng.integers(len(noise))), int(rng.integers(min_gap, max_gap + 1))
        head = np.concatenate([key, _cycle(noise, start, gap), equals])
        parts += [head, key, stop]
        marks += [np.zeros(len(head), bool), np.ones(len(key), bool), np.zeros(len(stop), bool)]
        size += len(head) + len(key) + len(stop)
    return np.concatenate(parts)[:row_len].astype(np.int32), np.concatenate(marks)[:row_len]
