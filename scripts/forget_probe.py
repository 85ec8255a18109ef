"""Is forgetting what limits a model's needle retrieval? Shift the forget gate and run the grid again.

    python scripts/forget_probe.py --checkpoint runs/niah3-lmm --shifts -30,-3,0,6 --lengths 512,2K,4K
    python scripts/forget_probe.py --checkpoint runs/niah3-lmm-8k --shifts -30,0 --drift 256K
    python scripts/forget_probe.py --checkpoint runs/niah3-lmm-8k --gates 16K

The grid: passkey and S-NIAH-1 accuracy at 5 depths per length, per forget-gate shift. `--drift N`:
the filler's bits per token and each memory's |W| / |W^0| along one N-token prompt, per shift.
`--gates N`: each memory layer's theta, eta, alpha on the filler, needle and question of one prompt.
What each measures and why: `titans.train.eval.forget`.
"""

from __future__ import annotations

from titans.train import cli


def main(argv=None):
    p = cli.parser(__doc__)
    cli.add_model_args(p)
    p.add_argument("--shifts", default="-30,-3,0,6", help="comma list of logit shifts of the forget gate")
    p.add_argument("--lengths", default="512,1K,2K,4K", help="comma list: 512, 4K, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drift", metavar="LENGTH", help="instead of the grid: the state over one prompt this long")
    p.add_argument("--gates", metavar="LENGTH", help="instead of the grid: the gates over one prompt this long")
    args = p.parse_args(argv)

    from flax import nnx

    from titans.train.eval import forget, niah

    shifts = cli.split_list(args.shifts, float, "--shifts")
    length = niah.parse_length(args.drift or args.gates) if args.drift or args.gates else None
    lengths = cli.split_list(args.lengths, niah.parse_length, "--lengths")
    model, tokenizer, source = cli.load_model(args)
    if args.gates:
        rows = forget.gate_profile(model, tokenizer, length)
        print(f"{source}: gates over one passkey prompt of {length} tokens (needle at depth 50%); means per part, "
              f"and sums over the filler between the needle and the question\n\n{forget.gates_table(rows)}")
        return rows
    if args.drift:
        table = {shift: forget.drift(forget.shifted(nnx.clone(model), shift), tokenizer, length) for shift in shifts}
        print(f"{source}: one passkey prompt of {length} tokens (needle at depth 0, then filler) with the forget-gate "
              f"bias shifted; bits per token on the last 4096 tokens, and |W| / |W^0| per memory layer\n\n"
              f"{forget.drift_table(table)}")
        return table
    table = forget.shift_grid(model, tokenizer, shifts, lengths, args.seed)
    print(f"{source}: accuracy % (passkey / S-NIAH-1) with the forget-gate bias shifted\n\n"
          f"{forget.shift_table(table, lengths)}")
    return table


if __name__ == "__main__":
    cli.run("forget_probe", main)
