"""A token stream -> packed fixed-length training windows, as a grain pipeline.

The stream is a split of a token store (`titans.train.data.store`: documents encoded and
concatenated with an EOS after each; the boundaries stay marked, memory and attention run across
them, spec section 4), or an in-memory array (`pack`). It is cut into windows of `seq_len + 1`
tokens (inputs and shifted targets) at a stride of `seq_len`. grain shuffles the windows per epoch
with the seed, gives each process its rows of every global batch (each reads only its own windows),
batches and prefetches. A batch is a function of the seed and its index, which every checkpoint
saves, so a resumed run sees exactly the batches the uninterrupted one would, on any number of
processes.

A training batch is {"tokens": [batch, seq_len + 1] int32, "weights": [batch, seq_len] float32}: the
loss weight of each predicted token (1, or `NeedleMix.answer_weight` on a needle task's answer).
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

from titans.tokenizer import Tokenizer
from titans.train.data import needles


def pack(texts: list[str], tokenizer: Tokenizer, seed: int | None) -> np.ndarray:
    """One token stream in memory: documents in a seeded order (as given when seed is None), EOS after
    each; what a store prepared from the same documents holds (with seed None)."""
    order = np.arange(len(texts)) if seed is None else np.random.default_rng(seed).permutation(len(texts))
    eos = np.array([tokenizer.eos], np.uint32)
    return np.concatenate([part for i in order for part in (tokenizer.encode(texts[i]), eos)])


def windows(tokens: np.ndarray, seq_len: int) -> grain.MapDataset:
    """Window i = tokens[i*seq_len : i*seq_len + seq_len + 1] (int32)."""
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise ValueError(f"{len(tokens)} tokens cannot fill one window of seq_len + 1 = {seq_len + 1}")
    return grain.MapDataset.range(count).map(lambda i: tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int32))


@dataclasses.dataclass(frozen=True)
class NeedleMix:
    """Replace a `fraction` of the training rows by needle tasks (the retrieval recipe): a task prompt
    of a random length at the end of the row, answered, with training text before it. Its length is
    drawn from [min_len, cap], where cap grows linearly from min_len to the row length over the first
    `curriculum_steps` steps. The answer's tokens weigh `answer_weight` in the loss: a row has a few
    answer tokens among hundreds of haystack tokens, so at weight 1 retrieval is a sliver of the
    gradient. Another `recall_fraction` of the rows are dense recall episodes (`needles.recall_row`),
    their recalled tokens weighted the same; their longest filler grows from 0 to `recall_max_gap`
    tokens over the same curriculum, since recall over long gaps is not learned from scratch (a
    model first learns it at short gaps, where episodes are dense). Rows are a pure function of
    (seed, row index), so resume stays exact."""

    fraction: float
    tasks: tuple[str, ...]
    min_len: int
    curriculum_steps: int
    tokenizer: Tokenizer
    answer_weight: float = 1.0
    recall_fraction: float = 0.0
    recall_max_gap: int = 0

    def row(self, index: int, window: np.ndarray, haystack: np.ndarray, seed: tuple[int, ...],
            batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([*seed, index])
        draw = rng.random()
        if draw >= self.fraction + self.recall_fraction:
            return text_row(window)
        progress = min(1.0, (index // batch_size) / self.curriculum_steps) if self.curriculum_steps else 1.0
        if draw >= self.fraction:
            tokens, recalled = needles.recall_row(rng, len(window), 0, int(progress * self.recall_max_gap), self.tokenizer)
            row = text_row(tokens)
            row["weights"][recalled[1:]] = self.answer_weight
            return row
        cap = int(self.min_len + progress * (len(window) - self.min_len))
        tokens, answer = needles.needle_row(rng, len(window), self.min_len, cap, self.tasks, self.tokenizer, haystack)
        row = text_row(tokens)
        row["weights"][-answer:] = self.answer_weight
        return row


def text_row(window: np.ndarray) -> dict[str, np.ndarray]:
    """A training row whose every predicted token weighs 1."""
    return {"tokens": window, "weights": np.ones(len(window) - 1, np.float32)}


def train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, start: int = 0, process: int = 0,
                  processes: int = 1, prefetch: int = 4, mix: NeedleMix | None = None) -> grain.IterDataset:
    """Endless batches of shuffled windows ({"tokens", "weights"}, see the module docstring) from
    batch `start` on: this process's rows of each global batch of `batch_size` rows.

    Row r of global batch i is row i * batch_size + r of one sequence of windows (reshuffled every
    epoch; `mix` mixes in the needle tasks); process p of P takes the rows [p * b, (p + 1) * b),
    b = batch_size / P. So a batch is a function of (seed, i) whatever the number of processes, and a
    run resumes from batch i on any number of them."""
    count = (len(tokens) - 1) // seq_len
    if count < batch_size:
        raise ValueError(f"the stream has {count} windows of {seq_len + 1} tokens, fewer than batch_size "
                         f"{batch_size}: use more text or a smaller train.seq_len / train.batch_size")
    if batch_size % processes:
        raise ValueError(f"batch_size {batch_size} does not split over {processes} processes")
    rows = windows(tokens, seq_len).shuffle(seed=seed).repeat(None)
    if mix is not None:
        rows = rows.map_with_index(lambda index, window: mix.row(index, window, tokens, (seed,), batch_size))
    else:
        rows = rows.map(text_row)
    local = batch_size // processes
    mine = grain.MapDataset.range(sys.maxsize).map(lambda k: rows[k // local * batch_size + process * local + k % local])
    return mine.batch(local)[start:].to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """The first `max_batches` batches of consecutive windows of the held-out stream (fixed every time)."""
    ds = windows(tokens, seq_len).batch(batch_size, drop_remainder=True)
    return [ds[i] for i in range(min(len(ds), max_batches))]
