"""`TitansLM`: embedding, `n_layers` pre-norm blocks (mixer + SwiGLU), final RMSNorm, head (spec section 4).

    logits = model(tokens)                         # parallel forward, [batch, seq] -> [batch, seq, vocab]
    state = model.init_state(batch)                # fixed-size streaming state
    logits, state = model.extend(tokens, state)    # any piece length >= 1; equals the parallel pass
    text = model.generate("It is a truth", 100)    # titans.generate: compiled sampling (titans.sampling)

`run(tokens, state, plan)` is the pure form of both (usable under `jax.jit` / `nnx.jit`); `extend`
is its eager convenience, compiled once per piece shape and MAC segment plan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.config import ModelConfig
from titans.layers import RMSNorm, SwiGLU, dense
from titans.memory_layer import MemoryLayerState
from titans.mixers import MIXERS, segment_plan
from titans.sharding import sharded_init


class ModelState(NamedTuple):
    """Everything streaming carries: the absolute position (int32 `[]`) and each block's mixer state."""

    position: jax.Array
    layers: tuple[Any, ...]


class Block(nnx.Module):
    """`x += mixer(x); x += SwiGLU(RMSNorm(x))` (the mixer applies its own pre-norms)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(**cfg.dtypes, rngs=rngs)
        self.mixer = MIXERS[cfg.variant](cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, **kw)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_width, **kw)

    def __call__(self, x, state, start, plan):
        delta, state = self.mixer(x, state, start, plan)
        x = x + delta
        return x + self.mlp(self.mlp_norm(x)), state


class TitansLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig (see titans.load_preset), got {type(config).__name__}")
        self.config = cfg = config
        kw = dict(**cfg.dtypes, rngs=rngs)
        # std 0.02 (GPT-2 / Llama): with a tied head the logits start at std ~0.02 * sqrt(d_model).
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.d_model, **cfg.dtypes,
            embedding_init=sharded_init(nnx.initializers.normal(0.02), "vocab", "embed"), rngs=rngs,
        )
        self.blocks = nnx.List(Block(cfg, rngs=rngs) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, **kw)
        self.head = None if cfg.tie_embeddings else dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), **kw)

    @classmethod
    def from_pretrained(cls, folder) -> TitansLM:
        """A model from a folder written by `titans.pretrained.save_pretrained` (scripts/export.py);
        `titans.load(folder)` gives its tokenizer too."""
        from titans.pretrained import load_params, read_export_config

        model = cls(ModelConfig.from_dict(read_export_config(folder)["model"], saved=True), rngs=nnx.Rngs(0))
        load_params(model, folder)
        return model

    def init_state(self, batch_size: int) -> ModelState:
        """The state before any token: position 0, each mixer's initial state."""
        return ModelState(np.zeros((), np.int32), tuple(b.mixer.init_state(batch_size) for b in self.blocks))

    def memory_states(self, state: ModelState) -> tuple[MemoryLayerState, ...]:
        """The memory layers' states inside `state`, one per block (empty for swa)."""
        is_memory = lambda node: isinstance(node, MemoryLayerState)
        return tuple(node for node in jax.tree.leaves(state.layers, is_leaf=is_memory) if is_memory(node))

    def start_state(self, memories) -> ModelState:
        """A sequence start, like `run(tokens, None)`, except that each block's memory begins from
        `memories[i]` (a `MemoryLayerState`, its conv tails included) instead of `W^0`: no attention
        context and position 0. Training with state passing (`titans.train.steps`) starts rows this way.
        """
        if self.config.variant == "swa" or len(memories) != len(self.blocks):
            raise ValueError(f"start_state needs one memory state per block ({len(self.blocks)}), got "
                             f"{len(memories)} for a {self.config.variant} model")
        return ModelState(np.zeros((), np.int32),
                          tuple(b.mixer.start_state(m) for b, m in zip(self.blocks, memories)))

    def plan(self, start, length: int) -> tuple[int, ...] | None:
        """MAC's split of `length` tokens at segment boundaries (None for the other variants).

        Needs a concrete `start`: under `jit` pass `plan=` to `run` yourself.
        """
        if self.config.variant != "mac":
            return None
        if isinstance(start, jax.core.Tracer):
            raise ValueError(
                "MAC splits a piece at segment boundaries, which needs a concrete state.position: call extend "
                "outside jit, or pass plan=segment_plan(position, length, segment_len) to run"
            )
        return segment_plan(int(start), length, self.config.segment_len)

    def run(self, tokens: jax.Array, state: ModelState | None = None,
            plan: tuple[int, ...] | None = None, last_only: bool = False) -> tuple[jax.Array, ModelState]:
        """tokens `[batch, seq]` int -> (logits `[batch, seq, vocab]` float32, state after them).

        `state=None` is a sequence start without a carried attention window (the training pass).
        `last_only`: logits of the last token only, `[batch, 1, vocab]` (a prefill needs no more,
        and the head over a whole piece costs `seq * d_model * vocab`, a quarter of a 32K-vocab model).
        """
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be [batch, seq] with seq >= 1, got shape {tokens.shape}")
        start = 0 if state is None else state.position
        if plan is None:
            plan = self.plan(start, tokens.shape[1])
        layer_states = (None,) * cfg.n_layers if state is None else state.layers
        x = self.embed(tokens)
        new_states = []
        for block, layer_state in zip(self.blocks, layer_states):
            x, layer_state = block(x, layer_state, start, plan)
            new_states.append(layer_state)
        x = self.final_norm(x[:, -1:] if last_only else x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        position = jnp.asarray(start, jnp.int32) + tokens.shape[1]
        return logits.astype(jnp.float32), ModelState(position, tuple(new_states))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """The parallel forward pass from a sequence start: tokens `[batch, seq]` -> logits `[batch, seq, vocab]`."""
        return self.run(tokens)[0]

    def generate(self, prompts, max_new_tokens: int = 64, key=None, **options):
        """`titans.generate(self, prompts, ...)`: text or token ids in, the continuation out."""
        from titans.sampling import generate

        return generate(self, prompts, max_new_tokens, key, **options)

    def extend(self, tokens, state: ModelState) -> tuple[jax.Array, ModelState]:
        """Consume `tokens [batch, n]` (n >= 1) after `state`; returns their logits and the new state.

        Prefill in large pieces, decode one token at a time: the result equals the parallel pass
        over the whole stream, and the state's size never changes. Compiled once per piece shape
        (and MAC segment plan); call it eagerly, not under `jit` (use `run` there).
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [batch, n] with n >= 1, got {tokens.dtype}{list(tokens.shape)}")
        if not isinstance(state, ModelState):
            raise ValueError(f"state must be the ModelState of init_state / extend, got {type(state).__name__}")
        state_batch = jax.tree.leaves(state.layers)[0].shape[0]
        if state_batch != tokens.shape[0]:
            raise ValueError(f"state is for batch {state_batch}, tokens have batch {tokens.shape[0]}: "
                             "make the state with init_state(batch)")
        graphdef, params = nnx.split(self)
        plan = self.plan(int(state.position), tokens.shape[1])
        return _run(graphdef, params, tokens, state, plan)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _run(graphdef, params, tokens, state, plan):
    return nnx.merge(graphdef, params).run(tokens, state, plan)


def count_params(config: ModelConfig) -> int:
    """Parameter count of a `TitansLM` for `config`, from shapes only (`nnx.eval_shape`: nothing
    allocated). The blocks are alike, so models of one and two blocks give the count at any depth
    exactly; tracing the initialisation of a deep model costs seconds per block."""
    def shapes_only(n_layers: int) -> int:
        abstract = nnx.eval_shape(lambda: TitansLM(config.replace(n_layers=n_layers), rngs=nnx.Rngs(0)))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

    one, two = shapes_only(1), shapes_only(2)
    return one + (config.n_layers - 1) * (two - one)


def recast(model: TitansLM, dtype: str, param_dtype: str) -> TitansLM:
    """A model with `model`'s weights in other dtypes: compute in `dtype`, parameters and memory state
    in `param_dtype` (names as in `ModelConfig`). float64 needs `jax_enable_x64`; running a model
    in float64 beside float32 tells whether precision is what limits it."""
    if "float64" in (dtype, param_dtype) and not jax.config.jax_enable_x64:
        raise ValueError("float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True)")
    config = dataclasses.replace(model.config, dtype=dtype, param_dtype=param_dtype)
    out = nnx.eval_shape(lambda: TitansLM(config, rngs=nnx.Rngs(0)))
    wide = jnp.dtype(param_dtype)
    nnx.update(out, jax.tree.map(lambda x: x.astype(wide) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 nnx.state(model)))
    return out
