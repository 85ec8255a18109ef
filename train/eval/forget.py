"""Is forgetting what limits a model's needle retrieval? Shift the forget gate and run the grid again
(scripts/forget_probe.py).

For each shift `d`, every memory layer's forget-gate bias becomes `b_alpha + d` (alpha =
sigmoid(x w_alpha + b_alpha), so -3 forgets about 20x less and -30 not at all; +6 forgets within
tens of tokens, a check that the probe is live). Then it runs passkey and S-NIAH-1 at every length and
depth (5 depths, 1 sample). If removing the decay does not extend the lengths that are found, the
needle is lost to the memory's other writes, not to its decay. Prints one table.

`drift` (`--drift N`) asks instead whether the streaming state stays in the range the model was trained on:
for each shift it streams one passkey prompt of N tokens (needle at depth 0, then only filler) and
prints, at every power of two from 4K, the model's bits per token on the last 4096 filler tokens
and each memory layer's weight norm relative to its learned initial weights W^0.

`gate_profile` (`--gates N`) asks how differently the model writes the needle and the filler: it streams one passkey
prompt of N tokens (needle at depth 50%) and prints, per memory layer, the mean write rate theta,
momentum eta and forget rate alpha over the filler, the needle and the question, and the sums of
theta and alpha over the filler that follows the needle (how much the needle is written over and
decayed before the question).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.memory_layer import NeuralMemory, Telemetry, record
from titans.train.data import needles
from titans.train.eval import niah

PROBE_TASKS = ("passkey", "s-niah-1")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def memories(model) -> list[NeuralMemory]:
    """The model's memory layers, in block order."""
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, NeuralMemory)]
    if not layers:
        raise ValueError(f"a {model.config.variant} model has no memory to probe")
    return layers


def shifted(model, shift: float):
    """`model` with `shift` added to the forget-gate bias of each memory layer (in place; shift an
    `nnx.clone` to keep the original)."""
    for layer in memories(model):
        layer.b_alpha[...] = layer.b_alpha[...] + shift
    return model


def shift_grid(model, tokenizer, shifts, lengths, seed: int = 0) -> dict[float, dict]:
    """shift -> the accuracy table (task -> length -> %) of passkey and S-NIAH-1 at 5 depths."""
    grid = niah.Grid(PROBE_TASKS, tuple(lengths), DEPTHS, 1, seed)
    return {shift: niah.accuracy_table(list(niah.run(shifted(nnx.clone(model), shift), tokenizer, grid,
                                                     haystack=None, batch=5)))
            for shift in shifts}


def _norm(weights) -> float:
    """Frobenius norm over all matrices of one memory layer, averaged over batch and heads."""
    squares = sum(np.square(np.asarray(w, np.float64)).sum((-2, -1)) for w in weights)
    return float(np.sqrt(squares).mean())


def drift(model, tokenizer, length: int, piece: int = 4096) -> list[dict]:
    """Stream one passkey prompt of `length` tokens (needle at depth 0); at every power of two from
    `piece` on (and at the end, whose piece closes with the question's few dozen tokens): position,
    bits per token on the last `piece` tokens, and per memory layer `|W| / |W^0|`."""
    tokens = needles.make_sample("passkey", length, 0.0, 0, tokenizer).tokens[None]
    init = [_norm(m.init_weights) for m in memories(model)]
    state, rows, mark = model.init_state(1), [], piece
    for start in range(0, length, piece):
        logits, state = model.extend(tokens[:, start : start + piece], state)
        end = min(start + piece, length)
        if end < mark and end < length:
            continue
        mark *= 2
        logp = jax.nn.log_softmax(logits[0, :-1])
        nll = -np.take_along_axis(np.asarray(logp), tokens[0, start + 1 : end, None], 1).mean()
        rows.append({"position": end, "bits": float(nll / np.log(2)),
                     "norm_ratio": [_norm(s.memory.weights) / w0 for s, w0 in zip(model.memory_states(state), init)]})
    return rows


@nnx.jit(static_argnums=(3,))
def _run_with_gates(model, tokens, state, plan):
    """`model.run` and each memory layer's gates (theta, eta, alpha) over `tokens`, in block order."""
    (_, state), layers = record(model, lambda m: m.run(tokens, state, plan), telemetry=Telemetry(gates=True))
    # a layer called more than once (mac's pieces) recorded one tuple per call, in order
    return state, [tuple(jnp.concatenate(g, axis=1) for g in zip(*layer["gates"])) for layer in layers]


def gate_profile(model, tokenizer, length: int, piece: int = 4096) -> list[dict]:
    """Stream one passkey prompt of `length` tokens (needle at depth 50%); per memory layer the mean
    theta, eta, alpha over each part of the prompt (heads and, for theta, memory layers averaged)
    and the sums of theta and alpha over the filler after the needle."""
    memories(model)  # a model without memory fails here
    sample = needles.make_sample("passkey", length, 0.5, 0, tokenizer)
    needle_end = sample.needle_at + sample.needle_len
    part = np.zeros(length, np.int32)  # 0 filler (and header), 1 needle, 2 question
    part[sample.needle_at:needle_end], part[length - sample.question_len:] = 1, 2
    tokens, state, pieces = sample.tokens[None], model.init_state(1), []
    for start in range(0, length, piece):
        chunk = tokens[:, start : start + piece]
        state, gates = _run_with_gates(model, chunk, state, model.plan(start, chunk.shape[1]))
        # per layer [3, seq]: theta, eta, alpha of the one row, averaged over heads (and theta's memory layers)
        pieces.append([np.stack([np.asarray(g[0]).reshape(g.shape[1], -1).mean(-1) for g in layer]) for layer in gates])
    rows = []
    after = (np.arange(length) >= needle_end) & (part == 0)
    for layer in zip(*pieces):
        theta, eta, alpha = np.concatenate(layer, axis=1)
        means = {name: {g: float(v[part == i].mean()) for g, v in (("theta", theta), ("eta", eta), ("alpha", alpha))}
                 for i, name in enumerate(("filler", "needle", "question"))}
        rows.append({**means, "theta_sum_after": float(theta[after].sum()), "alpha_sum_after": float(alpha[after].sum())})
    return rows


def gates_table(rows: list[dict]) -> str:
    lines = ["| layer | part | theta | eta | alpha |", "|---|---|---:|---:|---:|"]
    for n, row in enumerate(rows, 1):
        for name in ("filler", "needle", "question"):
            g = row[name]
            lines.append(f"| {n} | {name} | {g['theta']:.2e} | {g['eta']:.3f} | {g['alpha']:.2e} |")
        lines.append(f"| {n} | sum after the needle | {row['theta_sum_after']:.2f} | | {row['alpha_sum_after']:.3f} |")
    return "\n".join(lines)


def drift_table(table: dict[float, list[dict]]) -> str:
    positions = [r["position"] for r in next(iter(table.values()))]
    lines = ["| shift | measure | " + " | ".join(niah.format_length(n) for n in positions) + " |",
             "|---|---|" + "---:|" * len(positions)]
    for shift, rows in table.items():
        lines.append(f"| {shift:+g} | bits/token | " + " | ".join(f"{r['bits']:.3f}" for r in rows) + " |")
        lines.append("| | norm W / W0 | " + " | ".join(" ".join(f"{x:.2f}" for x in r["norm_ratio"]) for r in rows) + " |")
    return "\n".join(lines)


def shift_table(table: dict[float, dict], lengths) -> str:
    lines = ["| shift | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
    for shift, acc in table.items():
        cells = [f"{acc['passkey'][n]:.0f} / {acc['s-niah-1'][n]:.0f}" for n in lengths]
        lines.append(f"| {shift:+g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
