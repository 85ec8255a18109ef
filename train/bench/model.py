"""Throughput and peak memory of the Titans models: training steps, streaming prefill and decode
(scripts/bench_model.py).

train: one jitted step (forward, next-token cross-entropy, gradients w.r.t. every parameter) on
`[batch, seq]` tokens from a sequence start. prefill: `model.extend` over `seq` tokens in pieces of
`--piece` (the state carried, logits of each piece discarded), timed after a warm-up piece.
decode: after prefilling each of `--decode-contexts` tokens, one token per `extend` call (the
generation loop before issue 21: Python dispatch and a module split per token, greedy argmax outside).
generate: the same context, then `titans.generate`'s compiled loop (`sampling.decode_loop`: the
model step under `vmap` over rows and greedy sampling in one `while_loop`) for `--decode-batches`
rows; the rows are copies of the one prefilled row (the work of distinct rows: decode cost does not
depend on the tokens). Every case runs in its own process, so the peak RSS is that case's;
"state MB" is the streaming state of the case's batch, whose size never depends on the length.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

import numpy as np

from titans.config import VARIANTS
from titans.train.bench.common import (child_main, command_line, machine_line, peak_rss_mb, progress, publish,
                                       repeat, run_in_child, timed)

SECTION = "bench_model"
MODES = ("train", "prefill", "decode", "generate")


@dataclasses.dataclass(frozen=True)
class BenchModelConfig:
    presets: tuple[str, ...] = ("tiny",)
    variants: tuple[str, ...] = VARIANTS
    modes: tuple[str, ...] = MODES
    seq_lens: tuple[int, ...] = (1024,)  # training lengths
    prefill_lens: tuple[int, ...] = (8192,)
    piece: int = 2048
    decode_contexts: tuple[int, ...] = (4096,)
    decode_tokens: int = 32
    decode_batches: tuple[int, ...] = (1,)  # rows of the compiled loop (generate)
    batch: int = 1
    iters: int = 3
    budget_s: float = 30.0
    write: bool = False

    def __post_init__(self):
        for name, allowed in (("variants", VARIANTS), ("modes", MODES)):
            bad = set(getattr(self, name)) - set(allowed)
            if bad:
                raise ValueError(f"--{name} has unknown entries {sorted(bad)}; choose from {', '.join(allowed)}")
        if min(self.seq_lens + self.prefill_lens + self.decode_contexts + self.decode_batches
               + (self.piece, self.decode_tokens)) < 1:
            raise ValueError("lengths, batches, --piece and decode counts must be positive")
        if any(n % self.piece for n in self.prefill_lens + self.decode_contexts):
            raise ValueError(f"prefill lengths and --decode-contexts must be multiples of --piece {self.piece}")

    def cases(self) -> list[dict]:
        out = []
        for preset in self.presets:
            for variant in self.variants:
                lengths = dict(train=self.seq_lens, prefill=self.prefill_lens, decode=self.decode_contexts,
                               generate=self.decode_contexts)
                for mode in self.modes:
                    batches = self.decode_batches if mode == "generate" else (self.batch,)
                    out += [dict(preset=preset, variant=variant, mode=mode, seq=n, batch=b)
                            for n in lengths[mode] for b in batches]
        return out


def run_case(case: dict, cfg: BenchModelConfig) -> dict:
    """One case, in this (child) process."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import titans

    model = titans.TitansLM(titans.load_preset(case["preset"], variant=case["variant"]), rngs=nnx.Rngs(0))
    vocab, seq, batch = model.config.vocab_size, case["seq"], case["batch"]
    tokens = jax.random.randint(jax.random.key(1), (1 if case["mode"] == "generate" else batch, seq + 1), 0, vocab)
    state_mb = sum(x.nbytes for x in jax.tree.leaves(model.init_state(batch))) / 2**20
    xla_temp_mb = None

    if case["mode"] == "train":
        graph, params = nnx.split(model)

        def loss(p, t):
            logits = nnx.merge(graph, p)(t[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
        mem = compiled.memory_analysis()
        xla_temp_mb = round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None
        first, times = repeat(lambda: jax.block_until_ready(compiled(params, tokens)), cfg.iters, cfg.budget_s)
        seconds, counted = statistics.median(times), batch * seq
    elif case["mode"] == "generate":
        seconds, first = generate_seconds(model, np.asarray(tokens[0, :seq]), batch, cfg)
        times, counted = [seconds], batch * cfg.decode_tokens
    else:
        def stream(state, length):
            for i in range(0, length, cfg.piece):
                logits, state = model.extend(tokens[:, i : i + cfg.piece], state)
                jax.block_until_ready(logits)  # one piece in flight: memory stays that of one piece
            return state

        warm = stream(model.init_state(batch), cfg.piece)  # compiles the piece shape
        if case["mode"] == "prefill":
            first = 0.0
            times = [timed(lambda: stream(model.init_state(batch), seq))]
            seconds, counted = times[0], batch * seq
        else:
            state = stream(model.init_state(batch), seq)
            step = lambda s: model.extend(tokens[:, seq : seq + 1], s)
            first = timed(lambda: jax.block_until_ready(step(warm)))  # compiles the decode shape
            step(state)

            def decode():
                s = state
                for _ in range(cfg.decode_tokens):
                    logits, s = step(s)
                jax.block_until_ready(logits)

            times = [timed(decode)]
            seconds, counted = times[0], batch * cfg.decode_tokens
    return dict(case, status="ok", first_call_s=round(first, 3), n_timed=len(times), seconds=round(seconds, 4),
                tokens_per_s=round(counted / seconds, 1), xla_temp_mb=xla_temp_mb, peak_rss_mb=peak_rss_mb(),
                state_mb=round(state_mb, 2), params=titans.count_params(model.config))


def generate_seconds(model, prompt: np.ndarray, batch: int, cfg: BenchModelConfig) -> tuple[float, float]:
    """(seconds of `cfg.decode_tokens` steps of the compiled loop for `batch` rows after `prompt`,
    seconds of its first call, compilation included)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from titans import sampling

    graphdef, params = nnx.split(model)
    rows, logits = sampling.prefill(graphdef, params, model, [prompt], cfg.piece)
    rows, logits = jax.tree.map(lambda x: jnp.repeat(x, batch, axis=0), (rows, logits))
    greedy, key, stop = sampling.Sampler(), jax.random.key(0), np.zeros(0, np.int32)
    token, done = sampling.first_token(logits, key, greedy.values, stop, static=greedy.static)

    start = sampling.Carry(rows, token, np.int32(1), done, np.ones(batch, np.int32))

    def run():  # the loop donates its carry: each run starts from a copy
        out = sampling.decode_loop(graphdef, params, jax.tree.map(jnp.copy, start), key, greedy.values, stop, np.int32(cfg.decode_tokens),
                                   block=sampling.bucket(cfg.decode_tokens), static=greedy.static,
                                   plan=model.plan(0, 1))
        jax.block_until_ready(out)

    first = timed(run)
    return min(timed(run) for _ in range(max(cfg.iters, 1))), first


def table(rows: list[dict]) -> str:
    lines = ["| preset | variant | mode | tokens | batch | tokens/s | XLA temp MB | peak RSS MB | state MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"| {r['preset']} | {r['variant']} | {r['mode']} | {r['seq']} | {r['batch']} |"
        if r.get("status") != "ok":
            lines.append(f"{label} {r['status']} | | | |")
            continue
        temp = "" if r["xla_temp_mb"] is None else r["xla_temp_mb"]
        lines.append(f"{label} {r['tokens_per_s']:.0f} | {temp} | {r['peak_rss_mb']:.0f} | {r['state_mb']:.2f} |")
    return "\n".join(lines)


def main(cfg: BenchModelConfig) -> list[dict]:
    rows = [run_in_child(__name__, case, dataclasses.asdict(cfg)) for case in progress(cfg.cases(), "bench_model")]
    text = (
        f"Command: {command_line()}  \n{machine_line()}  \n"
        f"float32; prefill in pieces of {cfg.piece}; decode = {cfg.decode_tokens} tokens, one per `extend` (the "
        "old loop), and generate = as many in the compiled loop (`titans.generate`, greedy; best of "
        f"{cfg.iters}), after `tokens` of context. train = forward + backward of the next-token loss "
        "from a sequence start. Peak RSS = the case's whole process (JAX runtime included)."
        "\n\n" + table(rows)
    )
    publish(text, SECTION if cfg.write else None)
    return rows


if __name__ == "__main__":
    child_main(sys.argv, run_case, BenchModelConfig)
