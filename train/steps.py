"""What one training step computes: the next-token loss, AdamW, the jitted train and eval steps,
and state passing's carried memories."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from titans.memory_layer import MemoryLayerState, Telemetry, record
from titans.model import ModelState, TitansLM

GATE_TELEMETRY = Telemetry(gate_means=True)


def make_optimizer(cfg) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """AdamW on `cfg` (a `TrainConfig`) with global-norm clipping, and its learning-rate schedule
    (linear warmup, then cosine decay to `lr * min_lr_ratio`). The step takes the learning rate as
    an argument (`train_step(..., lr=schedule(step - 1))`), so one compiled step serves every
    schedule: a run extended with more steps, or runs of one model at other rates."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * cfg.min_lr_ratio
    )
    return _adamw(cfg.grad_clip, cfg.beta1, cfg.beta2, cfg.weight_decay), schedule


@functools.cache  # equal settings give the same transform, and so the same compiled step
def _adamw(grad_clip: float, b1: float, b2: float, weight_decay: float) -> optax.GradientTransformationExtraArgs:
    """`optax.adamw`, with the same state tree (checkpoints of either restore into the other), but
    scaled by the `lr` the update is given instead of by a schedule of its own."""
    # No decay on gains, biases and gate biases (vectors): only matrices and larger.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)

    def scale_by_lr(updates, state, params=None, *, lr, **extra):
        updates = jax.tree.map(lambda g: -jnp.asarray(lr, g.dtype) * g, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    given_lr = optax.GradientTransformationExtraArgs(
        lambda params: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)), scale_by_lr)
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.chain(optax.scale_by_adam(b1=b1, b2=b2), optax.add_decayed_weights(weight_decay, decay_mask), given_lr),
    )


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits `[B, L, vocab]`, targets `[B, L]` int -> per-token cross-entropy `[B, L]` (nats)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]


def token_nll(model: TitansLM, batch: jax.Array, state: ModelState | None = None) -> tuple[jax.Array, ModelState]:
    """Per-token cross-entropy `[B, L]` (nats) of batch `[B, L + 1]` and the model state after it."""
    logits, end = model.run(batch[:, :-1], state)
    return cross_entropy(logits, batch[:, 1:]), end


def weighted_mean(nll: jax.Array, weights: jax.Array | None) -> jax.Array:
    return jnp.mean(nll) if weights is None else jnp.sum(weights * nll) / jnp.sum(weights)


def next_token_loss(model: TitansLM, batch: jax.Array, weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy (nats) of batch `[B, L + 1]`: its mean, weighted by `weights` `[B, L]` when given,
    and its sum."""
    nll = token_nll(model, batch)[0]
    return weighted_mean(nll, weights), jnp.sum(nll)


class MemoryCarry(NamedTuple):
    """State passing: each block's memory state at the end of the previous step's rows, and which
    rows of this step start from it (`keep [B]` bool; the others start from W^0)."""

    memories: tuple[MemoryLayerState, ...]
    keep: jax.Array


def carried_start(model: TitansLM, carry: MemoryCarry) -> ModelState:
    """Rows' start: the carried memory weights and momentum where `keep`, W^0 and zero momentum
    elsewhere; conv tails and attention always fresh (a row is a new document)."""
    fresh = model.memory_states(model.init_state(carry.keep.shape[0]))
    return model.start_state([f._replace(memory=c.memory.select(carry.keep, f.memory))
                              for f, c in zip(fresh, carry.memories)])


def loss_and_gate_means(model: TitansLM, batch: dict[str, jax.Array], carry: MemoryCarry | None,
                        total_weight: jax.Array | None = None):
    """The loss and ({"theta", "eta", "alpha"}: each gate's mean over the memory calls of the pass
    (empty without memory), the memory states after the rows when passing them, else None). With
    `total_weight`, the loss is the weighted sum over `total_weight`: a micro-batch's share of the
    loss of the batch whose weights sum to it."""
    def loss_fn(model):
        nll, end = token_nll(model, batch["tokens"], None if carry is None else carried_start(model, carry))
        loss = (weighted_mean(nll, batch["weights"]) if total_weight is None else
                jnp.sum(batch["weights"] * nll) / total_weight)
        return loss, None if carry is None else model.memory_states(end)

    (loss, memories), layers = record(model, loss_fn, telemetry=GATE_TELEMETRY)
    calls = [means for layer in layers for means in layer.get("gate_means", ())]
    means = {name: jnp.mean(jnp.stack([c[name] for c in calls])) for name in ("theta", "eta", "alpha")} if calls else {}
    return loss, (means, memories)


def _micro_batches(tree, accum: int):
    """Leaves `[B, ...]` -> `[accum, B / accum, ...]`, micro-batch i taking rows i, accum + i, ...:
    each device's block of rows splits into whole micro-batches, so no row moves between devices.
    Scalars (a memory state's chunk offset) are repeated `accum` times."""
    return jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1) if x.ndim else
                        jnp.broadcast_to(x, (accum,)), tree)


def _whole_batch(tree, like):
    """The inverse of `_micro_batches` on what a scan stacked; a leaf that is a scalar in `like`
    (equal over micro-batches) is taken once."""
    return jax.tree.map(lambda x, ref: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]) if ref.ndim else x[-1], tree, like)


def accumulated_gradients(model: TitansLM, batch: dict[str, jax.Array], carry: MemoryCarry | None, accum: int):
    """`nnx.value_and_grad(loss_and_gate_means)` of the batch, summed over `accum` micro-batches run
    one after another (a scan: the activations of one micro-batch live at a time). The loss and
    gradients are those of the whole batch up to float32 round-off: each micro-batch's loss is its
    weighted sum over the whole batch's total weight."""
    grad_fn = nnx.value_and_grad(loss_and_gate_means, has_aux=True)
    if accum == 1:
        return grad_fn(model, batch, carry)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    total = jnp.sum(batch["weights"])
    # jax's own transform inside the scan: nnx's would see the module's variables of the outer trace.
    loss_of = lambda params, rest, part: loss_and_gate_means(nnx.merge(graphdef, params, rest), *part, total)

    def micro(grads, part):
        (loss, (means, memories)), g = jax.value_and_grad(loss_of, has_aux=True)(params, rest, part)
        return jax.tree.map(jnp.add, grads, g), (loss, means, memories)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, means, memories) = jax.lax.scan(micro, zeros, _micro_batches((batch, carry), accum))
    if carry is not None:
        memories = _whole_batch(memories, carry.memories)
    return (jnp.sum(losses), (jax.tree.map(jnp.mean, means), memories)), grads


@nnx.jit(donate_argnums=(0, 1), static_argnames="accum")
def train_step(model: TitansLM, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], lr: jax.Array,
               carry: MemoryCarry | None = None, accum: int = 1):
    """One optimizer step at learning rate `lr` (a float32 scalar) on a batch {"tokens", "weights"}
    (titans.train.data.pipeline), its gradients accumulated over `accum` micro-batches: (loss,
    gradient global norm, gate means, memory states after the rows when `carry` is given, else None)."""
    (loss, (gate_means, memories)), grads = accumulated_gradients(model, batch, carry, accum)
    optimizer.update(model, grads, lr=lr)
    return loss, optax.tree.norm(grads), gate_means, memories


@nnx.jit
def eval_step(model: TitansLM, batch: jax.Array) -> jax.Array:
    return next_token_loss(model, batch)[1]


def evaluate(model: TitansLM, batches, tokenizer, put=jnp.asarray) -> dict:
    """Held-out loss (nats per token) and bits per byte over `batches` `[B, L + 1]` (numpy, whole on
    every process; `put` makes the model's input of one, e.g. this process's rows of a global batch)."""
    nats = sum(float(eval_step(model, put(b))) for b in batches)
    tokens = sum(b[:, 1:].size for b in batches)
    text_bytes = sum(tokenizer.count_bytes(b[:, 1:]) for b in batches)
    return {"valid_loss": nats / tokens, "valid_bpb": nats / math.log(2) / max(text_bytes, 1)}
