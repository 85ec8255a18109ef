"""Generation from a `TitansLM`: prefill the prompts in pieces, then one compiled program samples every
new token.

    model, tokenizer = titans.load("runs/small-mac")        # the model carries its tokenizer
    text = titans.generate(model, "It is a truth", 200, temperature=0.8, top_p=0.95)
    texts = model.generate(["It is", "Once upon a time"], 50)            # a batch, greedy
    ids = titans.generate(model, [[72, 105], [79, 110, 99, 101]], 20, stop_tokens=[10])

How it runs:
- Prefill: prompts of different lengths are fed in stages. All rows share positions until the
  shortest prompt ends, so they run as one batch up to there; the rows left go on as a smaller
  batch up to the next length, and so on. Each stage is cut into pieces of at most `prefill_piece`
  tokens, each a power of two starting at a multiple of its size, so the compiled piece programs
  (one per piece size and batch) are reused by every prompt, and memory stays flat at any length.
- Decode: each row's state is taken out of its batch (`row_states`: every leaf gets a row axis,
  the position and the memory's chunk offset become one per row), and the model's one-token step
  runs under `jax.vmap` over rows, so rows at different positions step together. One compiled
  `lax.while_loop` feeds a token, samples the next in the graph (greedy, temperature, top-k,
  top-p), ends rows at their stop tokens and stops when every row has ended or after `n` tokens.
  The module is split once per call. The loop's length is traced and its output buffer is a
  power-of-two bucket, so generations of one batch shape and bucket share one program; sampling
  values (temperature, top-p, stop ids, key) are traced too, only greedy / top-k / nucleus on or off
  pick the program.
- Streaming: with `on_tokens`, the loop runs `stream_every` tokens per call and hands each block
  to the callback; the cost is one dispatch and one device-to-host copy per block (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.model import ModelState

# Token id written after a row has ended (the callback sees it; results are cut before it).
ENDED = -1


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is drawn: greedy at temperature 0, else softmax(logits / temperature)
    restricted to the `top_k` most likely tokens (0: all) and to the smallest set of them whose
    probability reaches `top_p` (1: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:  # NaN fails too
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {self.top_k}")

    @property
    def static(self) -> tuple[bool, int, bool]:
        """What picks the compiled program: (greedy, top_k, nucleus on)."""
        greedy = self.temperature == 0
        return greedy, 0 if greedy else int(self.top_k), not greedy and self.top_p < 1

    @property
    def values(self) -> tuple[jax.Array, jax.Array]:
        """What the program takes as traced inputs: temperature, top_p (float32 scalars)."""
        return np.float32(max(self.temperature, 1e-6)), np.float32(self.top_p)


def sample_token(logits: jax.Array, key: jax.Array, values, static) -> jax.Array:
    """logits `[batch, vocab]` -> token ids `[batch]` int32 (`Sampler.values`, `Sampler.static`)."""
    greedy, top_k, nucleus = static
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature, top_p = values
    logits = logits.astype(jnp.float32) / temperature
    if not top_k and not nucleus:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    if top_k:
        top, order = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))  # [batch, k], descending
    else:
        order = jnp.argsort(-logits, axis=-1)
        top = jnp.take_along_axis(logits, order, axis=-1)
    if nucleus:
        probs = jax.nn.softmax(top, axis=-1)
        # The smallest prefix whose mass reaches top_p (the most likely token always stays).
        top = jnp.where(jnp.cumsum(probs, axis=-1) - probs < top_p, top, -jnp.inf)
    choice = jax.random.categorical(key, top, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def step_key(key: jax.Array, step) -> jax.Array:
    """The key that draws new token number `step` (0 = the first): the same in every loop."""
    return jax.random.fold_in(key, step)


def row_states(state: ModelState) -> ModelState:
    """A batch's state -> one state per row, stacked: every leaf `[batch, ...]` becomes
    `[batch, 1, ...]` and the shared scalars (position, memory chunk offsets) become `[batch]`, so
    `jax.vmap` over the leading axis gives each row its own batch-of-one state and position."""
    batch = jax.tree.leaves(state.layers)[0].shape[0]
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,)) if jnp.ndim(x) == 0 else x[:, None], state)


def prefill_pieces(start: int, stop: int, piece: int) -> list[tuple[int, int]]:
    """(begin, size) covering `[start, stop)`: each size is a power of two <= `piece` starting at a
    multiple of itself, the largest that fits; so every prompt reuses the same few piece shapes."""
    out, pos = [], start
    while pos < stop:
        size = 1 << min(piece.bit_length() - 1, (stop - pos).bit_length() - 1)
        while pos % size:
            size //= 2
        out.append((pos, size))
        pos += size
    return out


def bucket(n: int) -> int:
    """The loop's buffer length for `n` tokens: the next power of two, at least 16."""
    return max(16, 1 << max(n - 1, 0).bit_length())


class Carry(NamedTuple):
    """What the decode loop carries from one block to the next."""

    rows: ModelState  # `row_states`: every leaf [batch, ...] with a batch-of-one state inside
    token: jax.Array  # [batch] int32, the last token sampled (not yet fed to the model)
    step: jax.Array  # [] int32, how many tokens were sampled
    done: jax.Array  # [batch] bool, the row has produced a stop token
    lengths: jax.Array  # [batch] int32, new tokens of each row up to and including its stop token


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(3,))
def _prefill_piece(graphdef, params, tokens, state, plan):
    """One prefill piece: tokens `[batch, n]` -> (logits of the last token `[batch, vocab]`, state)."""
    logits, state = nnx.merge(graphdef, params).run(tokens, state, plan, last_only=True)
    return logits[:, 0], state


@functools.partial(jax.jit, static_argnames=("static",))
def first_token(logits, key, values, stop, *, static) -> tuple[jax.Array, jax.Array]:
    """The first new token of every row `[batch]` and whether it ended the row, from the prompts'
    last logits `[batch, vocab]`."""
    token = sample_token(logits, step_key(key, 0), values, static)
    done = jnp.isin(token, stop)
    return token, done


def _ended(token, done):
    return jnp.where(done, ENDED, token)


def decode_loop(graphdef, params, carry: Carry, key, values, stop, n, *, block: int, static, plan):
    """Up to `n <= block` more tokens per row (fewer once every row has ended), one compiled program
    per batch shape, bucket and sampler kind; `carry` is donated.

    Returns the new carry, the tokens `[batch, block]` (ENDED after a row's end, garbage past the
    count) and how many steps ran.
    """
    loop = DECODE_PROGRAMS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
    return loop(graphdef, params, carry, key, values, stop, n, block=block, static=static, plan=plan)


def _decode_loop(graphdef, params, carry: Carry, key, values, stop, n, *, block: int, static, plan):
    model = nnx.merge(graphdef, params)

    def one_row(token, rows):  # a batch-of-one state at this row's own position
        logits, rows = model.run(token[None, None], rows, plan)
        return logits[0, 0], rows

    def body(loop):
        i, c, out = loop
        logits, rows = jax.vmap(one_row)(c.token, c.rows)
        token = sample_token(logits, step_key(key, c.step), values, static)
        live = ~c.done
        done = c.done | jnp.isin(token, stop)
        out = jax.lax.dynamic_update_slice_in_dim(out, _ended(token, c.done)[:, None], i, axis=1)
        return i + 1, Carry(rows, token, c.step + 1, done, c.lengths + live), out

    out = jnp.full((carry.token.shape[0], block), ENDED, jnp.int32)
    i, carry, out = jax.lax.while_loop(lambda loop: (loop[0] < n) & ~jnp.all(loop[1].done), body,
                                       (jnp.int32(0), carry, out))
    return carry, out, i


_DECODE_JIT = dict(static_argnames=("graphdef", "block", "static", "plan"), donate_argnums=(2,))
# XLA:CPU's default copy insertion copies each attention ring of the loop's carry once or twice per
# token; with region analysis it keeps them in place (BENCHMARKS.md, decode). A CPU compiler
# option, so accelerators compile without it.
DECODE_PROGRAMS = {
    "cpu": jax.jit(_decode_loop, compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True}, **_DECODE_JIT),
    "accelerator": jax.jit(_decode_loop, **_DECODE_JIT),
}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_state(graphdef, params, batch: int) -> ModelState:
    """`init_state(batch)` in fresh buffers of its own (the eager one shares buffers between the k
    and v caches and between weights and anchor, and every prefill piece donates its state)."""
    return nnx.merge(graphdef, params).init_state(batch)


@jax.jit
def _split_rows(state: ModelState, last: jax.Array, ending: jax.Array, going_on: jax.Array):
    """After a prefill stage: (row states and last logits of the rows `ending` [n], the batch
    state of the rows `going_on` [m]); indices into the batch."""
    rows = jax.tree.map(lambda x: x[ending], row_states(state))
    rest = jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else x[going_on], state)
    return rows, last[ending], rest


@jax.jit
def _join_rows(rows: list, logits: list, order: jax.Array):
    """Row states and logits of every stage, joined and put back in prompt order by `order` [batch]."""
    join = lambda *xs: jnp.concatenate(xs)[order]
    return jax.tree.map(join, *rows), join(*logits)


def prefill(graphdef, params, model, prompts: list[np.ndarray], piece: int):
    """Feed every prompt; returns (`row_states` in prompt order, each prompt's last logits `[batch, vocab]`).

    Rows share positions until the shortest prompt ends: a stage per distinct length, each a batch
    of the rows still reading (see the module docstring)."""
    lengths = np.array([len(p) for p in prompts])
    active = np.argsort(lengths, kind="stable")  # rows still reading, shortest first
    state, pos = _init_state(graphdef, params, len(active)), 0
    stage_rows, stage_logits, finished = [], [], []
    for end in np.unique(lengths):
        tokens = np.stack([prompts[r][pos:end] for r in active])
        for begin, size in prefill_pieces(pos, int(end), piece):
            last, state = _prefill_piece(graphdef, params, tokens[:, begin - pos : begin - pos + size], state,
                                   model.plan(begin, size))
        ending = lengths[active] == end
        rows, logits, state = _split_rows(state, last, np.flatnonzero(ending), np.flatnonzero(~ending))
        stage_rows.append(rows)
        stage_logits.append(logits)
        finished.append(active[ending])
        active, pos = active[~ending], int(end)
    return _join_rows(stage_rows, stage_logits, np.argsort(np.concatenate(finished)))


def _as_batch(prompts, tokenizer, vocab_size: int) -> tuple[list[np.ndarray], bool, bool]:
    """(token ids of each prompt, whether the prompts were text, whether they were one prompt)."""
    text = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                        and all(isinstance(p, str) for p in prompts))
    if isinstance(prompts, (list, tuple)) and not prompts:
        raise ValueError("prompts is an empty batch: give at least one prompt")
    if text:
        texts = [prompts] if isinstance(prompts, str) else prompts
        empty = [i for i, p in enumerate(texts) if not p]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty: the model continues a text, give it at least one token")
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: load the model with titans.load (it carries its "
                             "tokenizer) or pass tokenizer=")
        single = isinstance(prompts, str)
        ids = [np.asarray(tokenizer.encode(p), np.int64) for p in texts]
    else:
        if isinstance(prompts, (np.ndarray, jax.Array)) and prompts.ndim in (1, 2):
            single = prompts.ndim == 1
            ids = [np.asarray(prompts)] if single else list(np.asarray(prompts))
        elif isinstance(prompts, (list, tuple)):
            single = all(np.ndim(p) == 0 for p in prompts)
            ids = [np.asarray(prompts)] if single else [np.asarray(p) for p in prompts]
        else:
            raise ValueError("prompts must be a text, a list of texts, token ids [n], a batch of token ids "
                             f"[batch, n] or a list of id lists; got {type(prompts).__name__}")
    for i, p in enumerate(ids):
        if p.ndim != 1 or p.size == 0:
            raise ValueError(f"prompt {i} is empty: the model continues a text, give it at least one token")
        if not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= vocab_size:
            raise ValueError(f"prompt {i} must hold integer token ids in [0, {vocab_size}), got "
                             f"{p.dtype} in [{p.min()}, {p.max()}]")
    return [p.astype(np.int32) for p in ids], text, single


def generate(model, prompts, max_new_tokens: int = 64, key: jax.Array | int | None = None, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: int | Sequence[int] | None = None, tokenizer=None, prefill_piece: int = 4096,
             on_tokens: Callable[[np.ndarray], None] | None = None, stream_every: int = 8):
    """New tokens after each prompt.

    prompts: a text, a list of texts, token ids `[n]`, a batch `[batch, n]` or a list of id
    sequences of any lengths (each row gives what it gives alone). Returns the same form: text(s)
    for text prompts (the stop token dropped), else the new ids `[<= max_new_tokens]` of each row
    (one array for one prompt, a list for a batch), each ending at its first stop token.
    key: a `jax.random.key` or an int seed (0 when None); temperature 0 is greedy (see `Sampler`).
    stop_tokens: ids that end a row (kept in ids, dropped from text); None: the tokenizer's
    end-of-text for text prompts, nothing for ids. tokenizer: for text, default the one
    `titans.load` gave the model. prefill_piece: the longest prefill piece (memory stays that of
    one piece at any prompt length). on_tokens: called with every block `[batch, <= stream_every]`
    of new tokens as they are made (`ENDED` = -1 after a row's end).
    """
    sampler = Sampler(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    for name, value in (("prefill_piece", prefill_piece), ("stream_every", stream_every)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    ids, text, single = _as_batch(prompts, tokenizer, model.config.vocab_size)
    if stop_tokens is None:
        stop_tokens = [tokenizer.eos] if text else []
    stop = np.asarray([stop_tokens] if np.ndim(stop_tokens) == 0 else stop_tokens, np.int32).reshape(-1)
    key = jax.random.key(0 if key is None else key) if key is None or isinstance(key, (int, np.integer)) else key

    new = np.zeros((len(ids), 0), np.int32)
    lengths = np.zeros(len(ids), np.int64)
    if max_new_tokens:
        new, lengths = _sample(model, ids, max_new_tokens, key, sampler, stop, prefill_piece, on_tokens,
                               stream_every)
    rows = [row[:n] for row, n in zip(new, lengths)]
    if text:
        ended = set(stop.tolist())
        rows = [tokenizer.decode([i for i in row if int(i) not in ended]) for row in rows]
    return rows[0] if single else rows


def _sample(model, ids, max_new_tokens, key, sampler, stop, piece, on_tokens, stream_every):
    """(new tokens `[batch, <= max_new_tokens]`, new tokens per row `[batch]`)."""
    graphdef, params = nnx.split(model)
    rows, logits = prefill(graphdef, params, model, ids, piece)
    token, done = first_token(logits, key, sampler.values, stop, static=sampler.static)
    carry = Carry(rows, token, np.int32(1), done, np.ones(len(ids), np.int32))
    blocks = [np.asarray(token)[:, None]]
    if on_tokens is not None:
        on_tokens(blocks[0])
    left = max_new_tokens - 1
    # One call for the whole generation, or blocks of `stream_every` for the callback.
    per_call = left if on_tokens is None else stream_every
    # A one-token step has a one-token segment plan whatever the position (MAC); others take none.
    plan = model.plan(0, 1)
    while left > 0 and not bool(np.all(np.asarray(carry.done))):
        n = min(per_call, left)
        carry, out, count = decode_loop(graphdef, params, carry, key, sampler.values, stop, np.int32(n),
                                         block=bucket(per_call), static=sampler.static, plan=plan)
        block = np.asarray(out)[:, : int(count)]
        blocks.append(block)
        if on_tokens is not None and block.shape[1]:
            on_tokens(block)
        left -= n
    return np.concatenate(blocks, axis=1), np.asarray(carry.lengths)
