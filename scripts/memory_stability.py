"""Outer-gradient norm at initialisation against sequence length, for memory settings side by side.

    python scripts/memory_stability.py --preset small --lengths 256,1024,4096

The memory recurrence is differentiated through every chunk; when its Jacobian expands, the gradient
of the loss grows exponentially with length and training fails from the first step (spec section 2,
"Conditioning"). Prints one markdown row per setting: the global gradient norm of the next-token loss
on corpus-free random bytes, batch 2, at each length.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import titans  # noqa: E402
from train.trainer import next_token_loss  # noqa: E402

SETTINGS = {
    "residual+LN, max_lr 0.1": dict(mem_residual_norm=True, max_lr=0.1, theta_init=0.01),
    "plain MLP, max_lr 0.1": dict(mem_residual_norm=False, max_lr=0.1, theta_init=0.01),
    "plain MLP, max_lr 0.01 (presets)": dict(mem_residual_norm=False, max_lr=0.01, theta_init=0.001),
}


def grad_norm(cfg, length: int, seed: int = 0) -> float:
    model = titans.TitansLM(cfg, rngs=nnx.Rngs(seed))
    batch = jax.random.randint(jax.random.key(seed + 1), (2, length + 1), 0, min(cfg.vocab_size, 256))
    graph, params = nnx.split(model)
    loss = lambda p, b: next_token_loss(nnx.merge(graph, p), b)[0]
    return float(jax.jit(lambda p, b: optax.tree.norm(jax.grad(loss)(p, b)))(params, batch))


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--variant", default="mac")
    p.add_argument("--lengths", default="256,1024,4096")
    args = p.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = [f"| {args.preset} {args.variant} | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths)]
    print("\n".join(rows), flush=True)
    for name, over in SETTINGS.items():
        cfg = titans.load_preset(args.preset, variant=args.variant, **over)
        rows.append(f"| {name} | " + " | ".join(f"{grad_norm(cfg, n):.3g}" for n in lengths) + " |")
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
