"""Is forgetting what limits a model's needle retrieval? Shift the forget gate and run the grid again.

    python scripts/forget_probe.py --checkpoint runs/niah3-lmm --shifts -30,-3,0,6 --lengths 512,2K,4K

For each shift `d`, every memory layer's forget-gate bias becomes `b_alpha + d` (alpha =
sigmoid(x w_alpha + b_alpha), so -3 forgets about 20x less and -30 not at all; +6 forgets within
tens of tokens, a check that the probe is live). Then it runs passkey and S-NIAH-1 at every length and
depth (5 depths, 1 sample). If removing the decay does not extend the lengths that are found, the
needle is lost to the memory's other writes, not to its decay. Prints one table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from flax import nnx  # noqa: E402

from titans.memory_layer import NeuralMemory  # noqa: E402
from train import niah_eval  # noqa: E402
from train.trainer import TrainError, load_model  # noqa: E402

TASKS = ("passkey", "s-niah-1")


def shifted(model, shift: float):
    """`model` with `shift` added to the forget-gate bias of each memory layer (in place)."""
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, NeuralMemory)]
    if not layers:
        raise ValueError(f"a {model.config.variant} model has no memory to probe")
    for layer in layers:
        layer.b_alpha[...] = layer.b_alpha[...] + shift
    return model


def main(args: argparse.Namespace) -> dict:
    shifts = [float(x) for x in args.shifts.split(",")]
    lengths = tuple(niah_eval.parse_length(x) for x in args.lengths.split(","))
    grid = niah_eval.Grid(TASKS, lengths, (0.0, 0.25, 0.5, 0.75, 1.0), 1, args.seed)
    table = {}
    for shift in shifts:
        model, tokenizer = load_model(checkpoint=args.checkpoint)
        results = list(niah_eval.run(shifted(model, shift), tokenizer, grid, haystack=None, batch=5))
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
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, ValueError) as err:
        sys.exit(f"forget_probe: {err}")
