"""BABILong-style question tasks from a local generator: bAbI-like stories whose facts are scattered
through a real-text haystack, each question answered by one word.

BABILong (Kuratov et al. 2024) hides bAbI's facts (Weston et al. 2015) in PG-19 books; neither data
set can be fetched here, so this module draws the stories itself, from the short lists below and
with bAbI's world rules: people move between places, pick up and drop objects; a person is where
their last move took them, a held object is where its holder is, a dropped one where it was dropped.
Results are "BABILong-style", not BABILong.

- `babi-qa1` (bAbI task 1, one supporting fact): 6-10 moves of 4 people. "Where is Mary?" -> the
  place of the asked person's last move (they move at least once).
- `babi-qa2` (task 2, two supporting facts): 8-12 moves, pick-ups and drops of 4 people and 3
  objects. "Where is the football?" -> the place its holder moved to last, or where it was dropped
  (the asked object was picked up at least once, so its place is known).
- `babi-count` (like task 7, counting): stories as for qa2. "How many objects is Mary carrying?" ->
  none, one, two or three, each a quarter of the time (the asked person picked up or dropped
  something at least once).

needles.make_sample assembles the prompt, `header | filler with the facts inserted | question`, the
question ending in "Answer:" and the expected continuation " <word>". The filler opens with a whole
sentence of the haystack (`sentence_start`). The facts keep their order, each at the filler's start
or right after one of its sentence ends, drawn at random (several at one place go back to back)
from the first `depth` of the filler (`slots`): at depth 1 the story spans the whole filler as in
BABILong, at depth 0 it sits back to back at the start, as far from the question as it can be.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Fred", "Julie")
PLACES = ("kitchen", "garden", "bathroom", "office", "hallway", "bedroom")
OBJECTS = ("football", "apple", "milk")
NUMBERS = ("none", "one", "two", "three")  # len(OBJECTS) + 1 counts
MOVES = ("went to", "journeyed to", "travelled to", "moved to")
PICKS = ("picked up", "grabbed", "took")
DROPS = ("dropped", "put down", "discarded")
CAST = 4  # people per story
FACTS = {"babi-qa1": (6, 10), "babi-qa2": (8, 12), "babi-count": (8, 12)}  # facts per story, inclusive
HEADER = ("A story about people, places and objects is hidden within the following text. Its facts come in "
          "order: a person is where they last went, an object is where it was last carried or dropped. "
          "Answer the question after the text with one word.\n")


@dataclasses.dataclass(frozen=True)
class Story:
    facts: tuple[str, ...]  # " Mary went to the kitchen." ..., in story order
    question: str  # "\nWhere is Mary? Answer:"
    expected: str  # the one-word answer


def _question(task_name: str, about: str) -> str:
    if task_name == "babi-qa1":
        return f"\nWhere is {about}? Answer:"
    if task_name == "babi-qa2":
        return f"\nWhere is the {about}? Answer:"
    return f"\nHow many objects is {about} carrying? Answer:"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _fact(who: str, verb: str, what: str) -> str:
    return f" {who} {verb} the {what}."


def _moves(rng: np.random.Generator, people: list[str], count: int) -> tuple[list[str], dict[str, str]]:
    """`count` moves, each to a place other than the mover's current one: (facts, each mover's last place)."""
    facts, place = [], {}
    for _ in range(count):
        who = _pick(rng, people)
        place[who] = _pick(rng, [p for p in PLACES if p != place.get(who)])
        facts.append(_fact(who, _pick(rng, MOVES), place[who]))
    return facts, place


def _world(rng: np.random.Generator, people: list[str], count: int):
    """`count` moves, pick-ups and drops, each a uniform choice among what a random person can do:
    move elsewhere; once somewhere, pick up an object nobody holds that lies where they are or was
    never seen (then it was there); drop an object they hold. Returns (facts, the place of each
    object picked up so far, the count of objects each person holds, who picked up or dropped)."""
    facts, place, lies, holder, handlers = [], {}, {}, {}, set()
    for _ in range(count):
        who = _pick(rng, people)
        here = place.get(who)
        free = [o for o in OBJECTS if o not in holder and lies.get(o, here) == here]
        held = [o for o in OBJECTS if holder.get(o) == who]
        action = _pick(rng, ["move"] + ["pick"] * bool(here and free) + ["drop"] * bool(held))
        if action == "move":
            place[who] = _pick(rng, [p for p in PLACES if p != here])
            facts.append(_fact(who, _pick(rng, MOVES), place[who]))
            continue
        if action == "pick":
            thing = _pick(rng, free)
            holder[thing] = who
            facts.append(_fact(who, _pick(rng, PICKS), thing))
        else:
            thing = _pick(rng, held)
            del holder[thing]
            lies[thing] = here
            facts.append(_fact(who, _pick(rng, DROPS), thing))
        handlers.add(who)
    where = {**lies, **{o: place[p] for o, p in holder.items()}}  # held: where the holder is now
    carrying = {p: sum(h == p for h in holder.values()) for p in people}
    return facts, where, carrying, sorted(handlers)


def story(task_name: str, rng: np.random.Generator) -> Story:
    """One story of `task_name` (a key of FACTS) with its question. qa2 and count draw stories until
    one has something to ask (an object picked up; someone who handled objects and carries the
    count drawn first, uniform over NUMBERS: otherwise "one" would be the answer most of the time)."""
    people = [str(p) for p in rng.permutation(PEOPLE)[:CAST]]
    low, high = FACTS[task_name]
    if task_name == "babi-qa1":
        facts, place = _moves(rng, people, int(rng.integers(low, high + 1)))
        who = _pick(rng, sorted(place))
        return Story(tuple(facts), _question(task_name, who), place[who])
    want = int(rng.integers(len(NUMBERS))) if task_name == "babi-count" else None
    while True:
        facts, where, carrying, handlers = _world(rng, people, int(rng.integers(low, high + 1)))
        if want is None and where:
            thing = _pick(rng, sorted(where))
            return Story(tuple(facts), _question(task_name, thing), where[thing])
        carriers = [p for p in handlers if carrying[p] == want]
        if carriers:
            return Story(tuple(facts), _question(task_name, _pick(rng, carriers)), NUMBERS[want])


def fixed_size(task_name: str, tokenizer) -> int:
    """An upper bound on a prompt's tokens besides its filler: the header, the most facts, each as
    long as the longest fact sentence, and the longest question."""

    def size(text: str) -> int:
        return len(tokenizer.encode(text))

    pairs = [(verb, place) for verb in MOVES for place in PLACES]
    if task_name != "babi-qa1":
        pairs += [(verb, thing) for verb in PICKS + DROPS for thing in OBJECTS]
    fact = max(size(_fact(who, verb, what)) for who in PEOPLE for verb, what in pairs)
    asked = OBJECTS if task_name == "babi-qa2" else PEOPLE
    return size(HEADER) + FACTS[task_name][1] * fact + max(size(_question(task_name, a)) for a in asked)


def sentence_start(source, offset: int, period: int, within: int = 1000) -> int:
    """The index after the first `period` token at or after `offset` of `source` (an array or a token
    stream: contiguous slices only), so that a filler read from there opens with a whole sentence, as
    a fact placed before it may; `offset` when no period lies in the next `within` tokens."""
    ends = np.flatnonzero(np.asarray(source[offset : offset + within]) == period)
    return (offset + int(ends[0]) + 1) % len(source) if len(ends) else offset


def slots(filler: np.ndarray, count: int, depth: float, period: int, rng: np.random.Generator) -> np.ndarray:
    """Where `count` facts go in `filler` [n] tokens, sorted: filler indices in [0, depth * n], each 0
    or right after a `period` token, drawn uniformly with replacement (equal ones go back to back)."""
    span = int(round(depth * len(filler)))
    ends = np.r_[0, np.flatnonzero(filler[:span] == period) + 1]
    return np.sort(rng.choice(ends, count))
