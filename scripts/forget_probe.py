"""Is forgetting what limits a model's needle retrieval? Shift the forget gate and run the grid again.

    python scripts/forget_probe.py --checkpoint runs/niah3-lmm --shifts -30,-3,0,6 --lengths 512,2K,4K
    python scripts/forget_probe.py --checkpoint runs/niah3-lmm-8k --shifts -30,0 --drift 256K

For each shift `d`, every memory layer's forget-gate bias becomes `b_alpha + d` (alpha =
sigmoid(x w_alpha + b_alpha), so -3 forgets about 20x less and -30 not at all; +6 forgets within
tens of tokens, a check that the probe is live). Then it runs passkey and S-NIAH-1 at every length and
depth (5 depths, 1 sample). If removing the decay does not extend the lengths that are found, the
needle is lost to the memory's other writes, not to its decay. Prints one table.

`--drift N` asks instead whether the streaming state stays in the range the model was trained on:
for each shift it streams one passkey prompt of N tokens (needle at depth 0, then only filler) and
prints, at every power of two from 4K, the model's bits per token on the last 4096 filler tokens
and each memory layer's weight norm relative to its learned initial weights W^0.

`--gates N` asks how differently the model writes the needle and the filler: it streams one passkey
prompt of N tokens (needle at depth 50%) and prints, per memory layer, the mean write rate theta,
momentum eta and forget rate alpha over the filler, the needle and the question, and the sums of
theta and alpha over the filler that follows the needle (how much the needle is written over and
decayed before the question).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from titans.memory_layer import NeuralMemory  # noqa: E402
from train import niah_eval  # noqa: E402
from train.data import niah  # noqa: E402
from train.trainer import TrainError, load_model  # noqa: E402

TASKS = ("passkey", "s-niah-1")


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


def _norm(weights) -> float:
    """Frobenius norm over all matrices of one memory layer, averaged over batch and heads."""
    squares = sum(np.square(np.asarray(w, np.float64)).sum((-2, -1)) for w in weights)
    return float(np.sqrt(squares).mean())


def drift(model, tokenizer, length: int, piece: int = 4096) -> list[dict]:
    """Stream one passkey prompt of `length` tokens (needle at depth 0); at every power of two from
    `piece` on (and at the end, whose piece closes with the question's few dozen tokens): position,
    bits per token on the last `piece` tokens, and per memory layer `|W| / |W^0|`."""
    tokens = niah.make_sample("passkey", length, 0.0, 0, tokenizer).tokens[None]
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


@nnx.jit
def _run_with_gates(model, tokens, state):
    """`model.run` and every memory layer's gates (theta, eta, alpha), in block order (not mac)."""
    (_, state), sown = nnx.capture(lambda m: m.run(tokens, state), nnx.Intermediate,
                                      method_outputs=nnx.Intermediate)(model)
    flat = jax.tree_util.tree_flatten_with_path(sown, is_leaf=lambda x: isinstance(x, tuple))[0]
    # a sown value is the tuple of its calls; run calls each layer's gates once
    gates = [calls[0] for path, calls in flat if "'gates'" in jax.tree_util.keystr(path)]
    return state, gates


def gate_profile(model, tokenizer, length: int, piece: int = 4096) -> list[dict]:
    """Stream one passkey prompt of `length` tokens (needle at depth 50%); per memory layer the mean
    theta, eta, alpha over each part of the prompt (heads and, for theta, memory layers averaged)
    and the sums of theta and alpha over the filler after the needle."""
    memories(model)  # a model without memory fails here
    if model.config.variant == "mac":
        raise ValueError("--gates cannot read mac's gates (its memory runs inside the segment loop); "
                         "use an lmm, mag or mal run")
    sample = niah.make_sample("passkey", length, 0.5, 0, tokenizer)
    needle_end = sample.needle_at + sample.needle_len
    part = np.zeros(length, np.int32)  # 0 filler (and header), 1 needle, 2 question
    part[sample.needle_at:needle_end], part[length - sample.question_len:] = 1, 2
    tokens, state, pieces = sample.tokens[None], model.init_state(1), []
    for start in range(0, length, piece):
        chunk = tokens[:, start : start + piece]
        state, gates = _run_with_gates(model, chunk, state)
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


def main_gates(args: argparse.Namespace) -> list[dict]:
    length = niah_eval.parse_length(args.gates)
    model, tokenizer = load_model(checkpoint=args.checkpoint)
    rows = gate_profile(model, tokenizer, length)
    print(f"{args.checkpoint}: gates over one passkey prompt of {length} tokens (needle at depth 50%); "
          "means per part, and sums over the filler between the needle and the question\n")
    print("| layer | part | theta | eta | alpha |")
    print("|---|---|---:|---:|---:|")
    for n, row in enumerate(rows, 1):
        for name in ("filler", "needle", "question"):
            g = row[name]
            print(f"| {n} | {name} | {g['theta']:.2e} | {g['eta']:.3f} | {g['alpha']:.2e} |")
        print(f"| {n} | sum after the needle | {row['theta_sum_after']:.2f} | | {row['alpha_sum_after']:.3f} |")
    return rows


def main_drift(args: argparse.Namespace) -> dict:
    length = niah_eval.parse_length(args.drift)
    model, tokenizer = load_model(checkpoint=args.checkpoint)
    table = {}
    for shift in [float(x) for x in args.shifts.split(",")]:
        table[shift] = drift(shifted(nnx.clone(model), shift), tokenizer, length)
    positions = [r["position"] for r in next(iter(table.values()))]
    print(f"{args.checkpoint}: one passkey prompt of {length} tokens (needle at depth 0, then filler) with the "
          "forget-gate bias shifted; bits per token on the last 4096 tokens, and |W| / |W^0| per memory layer\n")
    print("| shift | measure | " + " | ".join(niah_eval.format_length(n) for n in positions) + " |")
    print("|---|---|" + "---:|" * len(positions))
    for shift, rows in table.items():
        print(f"| {shift:+g} | bits/token | " + " | ".join(f"{r['bits']:.3f}" for r in rows) + " |")
        print("| | norm W / W0 | " + " | ".join(" ".join(f"{x:.2f}" for x in r["norm_ratio"]) for r in rows) + " |")
    return table


def main(args: argparse.Namespace) -> dict:
    if args.drift:
        return main_drift(args)
    if args.gates:
        return main_gates(args)
    shifts = [float(x) for x in args.shifts.split(",")]
    lengths = tuple(niah_eval.parse_length(x) for x in args.lengths.split(","))
    grid = niah_eval.Grid(TASKS, lengths, (0.0, 0.25, 0.5, 0.75, 1.0), 1, args.seed)
    model, tokenizer = load_model(checkpoint=args.checkpoint)
    table = {}
    for shift in shifts:
        results = list(niah_eval.run(shifted(nnx.clone(model), shift), tokenizer, grid, haystack=None, batch=5))
        table[shift] = niah_eval.accuracy_table(results)
    print(f"{args.checkpoint}: accuracy % (passkey / S-NIAH-1) with the forget-gate bias shifted\n")
    print("| shift | " + " | ".join(map(str, lengths)) + " |")
    print("|---|" + "---:|" * len(lengths))
    for shift, acc in table.items():
        cells = [f"{acc['passkey'][n]:.0f} / {acc['s-niah-1'][n]:.0f}" for n in lengths]
        print(f"| {shift:+g} | " + " | ".join(cells) + " |")
    return table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run folder of scripts/train.py")
    p.add_argument("--shifts", default="-30,-3,0,6", help="comma list of logit shifts of the forget gate")
    p.add_argument("--lengths", default="512,1K,2K,4K", help="comma list: 512, 4K, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drift", metavar="LENGTH", help="instead of the grid: the state over one prompt this long")
    p.add_argument("--gates", metavar="LENGTH", help="instead of the grid: the gates over one prompt this long")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, ValueError) as err:
        sys.exit(f"forget_probe: {err}")
