"""Generation (`titans.generate`), every variant on `tiny`: the compiled loop against a step-by-step
oracle (one `model.extend` per token, sampling on the host with the same keys); a batch of ragged
prompts gives, row by row, each prompt alone; stop tokens end rows independently; one compiled
decode program per batch shape and length bucket; text in, text out; bad arguments fail in one line."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import titans
from titans import sampling
from titans.tokenizer import ByteTokenizer

VARIANTS = ("swa", "lmm", "mag", "mal", "mac")
# Ragged: the batch runs 0..4 together, then the longer row alone to 8 (prefill pieces of 4, the
# tiny chunk size, and 8); with 12 new tokens decode crosses chunk (4) and window/segment (16) ends.
PROMPTS = (np.arange(40, 48), np.arange(7, 11))
NEW = 12


@functools.cache
def build(variant: str) -> titans.TitansLM:
    return titans.TitansLM(titans.load_preset("tiny", variant=variant), rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnames="static")
def _sample(logits, key, step, values, static):
    return sampling.sample_token(logits, sampling.step_key(key, step), values, static)


def stepwise(model, prompt, n: int, key, sampler: sampling.Sampler, stop=()) -> list[int]:
    """The oracle: the prompt in one `extend`, then one `extend` per token; the same sampler and keys."""
    logits, state = model.extend(np.asarray(prompt, np.int32)[None], model.init_state(1))
    out = []
    for step in range(n):
        token = _sample(logits[:, -1], key, step, sampler.values, sampler.static)
        out.append(int(token[0]))
        if out[-1] in stop:
            break
        logits, state = model.extend(token[:, None], state)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_loop_equals_stepwise_and_ragged_rows_equal_each_prompt_alone(variant):
    model = build(variant)
    greedy = sampling.Sampler()
    batch = titans.generate(model, list(PROMPTS), NEW)
    for row, prompt in zip(batch, PROMPTS):
        assert row.tolist() == stepwise(model, prompt, NEW, jax.random.key(0), greedy)

    hot = sampling.Sampler(temperature=1.5, top_k=50, top_p=0.9)  # every filter, and draws that vary
    key = jax.random.key(7)
    drawn = titans.generate(model, PROMPTS[0], NEW, key, temperature=1.5, top_k=50, top_p=0.9)
    assert drawn.tolist() == stepwise(model, PROMPTS[0], NEW, key, hot)
    assert len(set(drawn.tolist())) > 3


def test_stop_tokens_end_rows_independently():
    model = build("swa")
    rows = titans.generate(model, list(PROMPTS), NEW)
    stop = int(rows[0][2])  # row 0's third token; row 1 must not stop before it makes it
    assert stop not in rows[1][:5].tolist()
    ended = titans.generate(model, list(PROMPTS), NEW, stop_tokens=[stop, 259])
    for full, cut in zip(rows, ended):
        where = [i for i, t in enumerate(full.tolist()) if t in (stop, 259)]
        n = where[0] + 1 if where else NEW
        assert cut.tolist() == full[:n].tolist()
    assert len(ended[0]) == 3 and len(ended[1]) > 5
    # Every row ended: the loop stops early, and a streamed run gives the same rows in blocks.
    blocks = []
    streamed = titans.generate(model, list(PROMPTS), NEW, stop_tokens=[stop, 259], on_tokens=blocks.append,
                               stream_every=4)
    assert [r.tolist() for r in streamed] == [r.tolist() for r in ended]
    joined = np.concatenate(blocks, axis=1)
    assert joined[0, 3:].tolist() == [sampling.ENDED] * (joined.shape[1] - 3)
    assert blocks[0].shape[1] == 1 and all(b.shape[1] <= 4 for b in blocks)


def test_one_decode_program_per_batch_shape_and_bucket():
    model = build("lmm")
    before = sampling.DECODE_PROGRAMS["cpu"]._cache_size()
    a = titans.generate(model, [PROMPTS[0], PROMPTS[0][::-1]], 5, 1, temperature=0.7)
    b = titans.generate(model, [PROMPTS[0] + 1, PROMPTS[0]], 11, 2, temperature=1.3, top_p=1.0)
    assert sampling.DECODE_PROGRAMS["cpu"]._cache_size() - before == 1  # 4 and 10 more tokens: one bucket of 16
    assert [len(r) for r in a + b] == [5, 5, 11, 11]


def test_text_in_text_out():
    model = build("swa")
    model.tokenizer = ByteTokenizer()
    ids = titans.generate(model, ByteTokenizer().encode("the memory"), 6)
    assert model.generate("the memory", 6) == ByteTokenizer().decode(ids)
    assert titans.generate(model, ["the memory"], 6) == [ByteTokenizer().decode(ids)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), r"temperature must be >= 0 \(0 is greedy\), got -1.0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be an int >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=""), "prompt 0 is empty"),
    (dict(prompts=[[1, 2, 999]]), r"prompt 0 must hold integer token ids in \[0, 260\)"),
    (dict(prompts="text", tokenizer=None), "text prompts need a tokenizer"),
])
def test_bad_arguments_fail_in_one_line(kwargs, match):
    model = titans.TitansLM(titans.load_preset("tiny", variant="swa"), rngs=nnx.Rngs(0))
    kwargs = {"prompts": [[1, 2]], **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        titans.generate(model, **kwargs)
    assert "\n" not in str(err.value)


def test_prefill_pieces_reuse_few_shapes():
    assert sampling.prefill_pieces(0, 13, 8) == [(0, 8), (8, 4), (12, 1)]
    assert sampling.prefill_pieces(5, 21, 4096) == [(5, 1), (6, 2), (8, 8), (16, 4), (20, 1)]
    assert {size for _, size in sampling.prefill_pieces(0, 100_000, 4096)} <= {2**i for i in range(13)}
    assert sampling.bucket(1) == 16 and sampling.bucket(17) == 32 and sampling.bucket(32) == 32
