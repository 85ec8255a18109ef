"""Outer-gradient norm at initialisation against sequence length, for memory settings side by side
(scripts/memory_stability.py).

The memory recurrence is differentiated through every chunk; when its Jacobian expands, the gradient
of the loss grows exponentially with length and training fails from the first step (spec section 2,
"Conditioning"). `table` gives one markdown row per setting: the global gradient norm of the
next-token loss on corpus-free random bytes, batch 2, at each length.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import optax
from flax import nnx

import titans
from titans.train.steps import next_token_loss

# The memory settings compared: the spec's residual + LayerNorm memory, and the presets' plain MLP.
SETTINGS = {
    "residual+LN, max_lr 0.1": dict(residual_norm=True, max_lr=0.1, theta_init=0.01),
    "plain MLP, max_lr 0.1": dict(residual_norm=False, max_lr=0.1, theta_init=0.01),
    "plain MLP, max_lr 0.01 (presets)": dict(residual_norm=False, max_lr=0.01, theta_init=0.001),
}


def grad_norm(cfg: titans.ModelConfig, length: int, seed: int = 0) -> float:
    """The global norm of the loss gradient of a freshly initialised model on random bytes."""
    model = titans.TitansLM(cfg, rngs=nnx.Rngs(seed))
    batch = jax.random.randint(jax.random.key(seed + 1), (2, length + 1), 0, min(cfg.vocab_size, 256))
    graph, params = nnx.split(model)
    loss = lambda p, b: next_token_loss(nnx.merge(graph, p), b)[0]
    return float(jax.jit(lambda p, b: optax.tree.norm(jax.grad(loss)(p, b)))(params, batch))


def table(preset: str, variant: str, lengths: Sequence[int], emit: Callable[[str], None] = print) -> list[str]:
    """The markdown rows (each passed to `emit` as soon as it is measured)."""
    rows = [f"| {preset} {variant} | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    emit("\n".join(rows))
    for name, memory in SETTINGS.items():
        cfg = titans.load_preset(preset, variant=variant, memory=memory)
        rows.append(f"| {name} | " + " | ".join(f"{grad_norm(cfg, n):.3g}" for n in lengths) + " |")
        emit(rows[-1])
    return rows
