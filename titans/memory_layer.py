"""The Titans memory layer around `memory_scan` (spec section 3).

From the block input `x [batch, seq, d_model]`:
    q, k, v = SiLU(causal_conv(x @ W_{q,k,v}))  split into heads  [batch, seq, heads, dim]
    q, k    = l2-normalised per head
    theta   = max_lr * sigmoid(x @ w_theta + b_theta)   [batch, seq, heads] or [..., heads, depth]
    eta     = sigmoid(x @ w_eta + b_eta)                [batch, seq, heads]
    alpha   = sigmoid(x @ w_alpha + b_alpha)            [batch, seq, heads]
    y, M    = memory_scan(M, q, k, v, theta, eta, alpha)
    o       = (RMSNorm(y) * sigmoid(x @ W_g)) @ W_o     [batch, seq, d_model]

The layer is stateful across calls through `MemoryLayerState` (memory weights/momentum/anchor and
the last `conv_kernel - 1` pre-conv inputs of q, k, v), so calling it on consecutive pieces with the
carried state equals one call on the whole sequence (spec invariant 4).

Sharding: every parameter carries logical axis names in its `out_sharding` metadata ("embed" for
d_model, "heads" for the memory-head axis or a head-major `heads * dim` axis, None otherwise).
Placement is not eager, so the layer builds without a mesh; to shard it, create it under `nnx.jit`
with out_shardings from `nnx.get_partition_spec` mapped through logical axis rules.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from titans.config import MemoryConfig
from titans.conv import ConvProjection
from titans.kernels.memory import MemoryState, memory_scan
from titans.layers import dense, l2_normalize, rms_norm
from titans.sharding import sharded_init



@dataclasses.dataclass(frozen=True)
class Telemetry:
    """What the memory layers record while they run (flax's sow API, `nnx.Intermediate`).

    gate_means: each memory call's mean write rate, momentum and forget rate, sown as "gate_means"
        (`{"theta", "eta", "alpha"}` scalars).
    gates: each call's gates themselves, sown as "gates" (`(theta, eta, alpha)`, each
        `[batch, seq, heads]`, theta `[..., heads, depth]` with per_layer_lr).
    Everything is off by default; `record` switches a model's memories on for one call and
    collects what they sowed, so nothing recorded ever lands in a model's state.
    """

    gate_means: bool = False
    gates: bool = False


class MemoryLayerState(NamedTuple):
    """What a caller carries between calls.

    memory: the `MemoryState` of the scan (weights/momentum/anchor `[batch, heads, in, out]`).
    conv: the last `conv_kernel - 1` pre-conv inputs of q, k, v, each `[batch, conv_kernel-1, heads*dim]`
    in the compute dtype (the projections' output dtype, so carrying them is exact).
    """

    memory: MemoryState
    conv: tuple[jax.Array, jax.Array, jax.Array]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class NeuralMemory(nnx.Module):
    """The memory itself (spec section 3 up to `y`): q/k/v paths, gates, learned `W^0`, the scan.

    `y, state = memory.scan(x, state)`; `MemoryLayer` adds the output norm, gate and projection,
    while MAG and MAC combine `y` with attention their own way (spec section 4). `d_model` is the
    width of the input `x`; `dtype` the compute dtype of the projections, `param_dtype` that of the
    parameters and of the memory state (float32, or float64 for x64 checks).
    """

    def __init__(self, config: MemoryConfig, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = cfg = config
        self.d_model, self.dtype, self.param_dtype = d_model, jnp.dtype(dtype), jnp.dtype(param_dtype)
        self.telemetry = Telemetry()
        path = lambda: ConvProjection(d_model, cfg.width, kernel=cfg.conv_kernel, dtype=self.dtype,
                                      param_dtype=self.param_dtype, rngs=rngs)
        self.q, self.k, self.v = path(), path(), path()

        # Gate weights at a tenth of the fan-in std: the gates depend on the token from step 0, but
        # for a unit-RMS input the logits spread by only ~0.1 around the biases, so every token
        # starts in the well-conditioned regime of spec section 2.
        gate_init = nnx.initializers.variance_scaling(0.01, "fan_in", "normal", in_axis=0, out_axis=-1)
        theta_axes = (cfg.heads, cfg.depth) if cfg.per_layer_lr else (cfg.heads,)
        theta_names = ("heads", None) if cfg.per_layer_lr else ("heads",)

        def gate(axes, names, init_value):
            w = None
            if cfg.data_gates:
                w = nnx.Param(sharded_init(gate_init, "embed", *names)(rngs.params(), (d_model,) + axes,
                                                                        self.param_dtype))
            b = sharded_init(nnx.initializers.constant(_logit(init_value)), *names)(
                rngs.params(), axes, self.param_dtype
            )
            return w, nnx.Param(b)

        # theta0 = theta_init (0.01 by default): with eta0 = 0.9 the momentum's steady-state step is
        # theta/(1-eta) = 0.1, inside the stable regime; alpha0 = 0.02 forgets slowly (e-fold ~50
        # tokens) yet keeps the weights bounded while the outer loop learns where to forget.
        self.w_theta, self.b_theta = gate(theta_axes, theta_names, cfg.theta_init / cfg.max_lr)
        # Ablations (MemoryConfig) leave a switched-off gate without parameters: nothing to learn or decay.
        self.w_eta, self.b_eta = gate((cfg.heads,), ("heads",), cfg.eta_init) if cfg.momentum else (None, None)
        self.w_alpha, self.b_alpha = gate((cfg.heads,), ("heads",), cfg.alpha_init) if cfg.decay else (None, None)

        # W^0 per head [heads, in, out]; fan-in scale treating heads as a batch axis.
        mem_init = sharded_init(
            nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
            ),
            "heads", None, None,
        )
        self.init_weights = nnx.List(
            nnx.Param(mem_init(rngs.params(), (cfg.heads, n_in, n_out), self.param_dtype))
            for n_in, n_out in cfg.layer_shapes()
        )

    def init_state(self, batch_size: int) -> MemoryLayerState:
        """Learned W^0 broadcast over the batch, zero momentum, zero conv tails, offset 0."""
        weights = tuple(jnp.broadcast_to(w[...], (batch_size,) + w.shape) for w in self.init_weights)
        tails = tuple(path.zero_tail(batch_size) for path in (self.q, self.k, self.v))
        return MemoryLayerState(MemoryState.create(weights), tails)

    def project(self, x: jax.Array, conv=None):
        """q, k, v `[batch, seq, heads, dim]` (compute dtype; q, k unit-norm) and the new conv tails.

        x: `[batch, seq, d_model]`; conv: the carried tails (zeros when None, i.e. sequence start).
        """
        cfg = self.config
        conv = (None, None, None) if conv is None else conv
        heads = (x.shape[0], x.shape[1], cfg.heads, cfg.head_dim)
        outs, tails = [], []
        for path, tail in zip((self.q, self.k, self.v), conv):
            out, new_tail = path(x, tail)
            outs.append(out.reshape(heads))
            tails.append(new_tail)
        q, k, v = outs
        return l2_normalize(q), l2_normalize(k), v, tuple(tails)

    def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """theta `[batch, seq, heads]` (`[..., heads, depth]` with per_layer_lr); eta, alpha `[batch, seq, heads]`.

        Computed in the parameter dtype (float32) at full matmul precision whatever the compute
        dtype: they enter the float32 recurrence, and decay products over a chunk amplify rounding
        in `1 - alpha` and `eta`.
        """
        cfg = self.config
        x = x.astype(self.param_dtype)
        highest = jax.lax.Precision.HIGHEST

        def gate(w, b):  # [batch, seq, *b.shape]; a switched-off gate (w = b = None) is 0
            if b is None:
                return jnp.zeros(x.shape[:2] + (cfg.heads,), x.dtype)
            if w is None:
                return jnp.broadcast_to(jax.nn.sigmoid(b[...]), x.shape[:2] + b.shape)
            return jax.nn.sigmoid(jnp.einsum("btm,m...->bt...", x, w[...], precision=highest) + b[...])

        scale = cfg.max_lr / (cfg.head_dim if cfg.inner_loss == "mean" else 1)
        return scale * gate(self.w_theta, self.b_theta), gate(self.w_eta, self.b_eta), gate(self.w_alpha, self.b_alpha)

    def scan(self, x: jax.Array, state: MemoryLayerState | None = None) -> tuple[jax.Array, MemoryLayerState]:
        """The retrieval `y [batch, seq, heads, dim]` (compute dtype) and the new state.

        x: `[batch, seq, d_model]`; `state=None` starts from `init_state(batch)`. Sows what
        `self.telemetry` asks for (see `record`).
        """
        y, state, records = self.scan_unrecorded(x, state)
        self.record(records)
        return y, state

    def scan_unrecorded(self, x: jax.Array, state: MemoryLayerState | None = None):
        """`scan` without sowing: (y, state, what `self.telemetry` asks to record of this call).

        For callers inside a JAX loop (MAC's segment scan), where sowing would leak the loop's
        tracers: they return the records from the loop and pass them to `record` outside it.
        """
        cfg = self.config
        if state is None:
            state = self.init_state(x.shape[0])
        q, k, v, conv = self.project(x, state.conv)
        theta, eta, alpha = self.gates(x)
        records = {}
        if self.telemetry.gate_means:
            records["gate_means"] = {"theta": theta.mean(), "eta": eta.mean(), "alpha": alpha.mean()}
        if self.telemetry.gates:
            records["gates"] = (theta, eta, alpha)
        # One token (decode) costs one gradient in the token loop but a whole chunk (two with a
        # traced offset) in the chunk form; both compute the same numbers (spec section 2).
        impl = "reference" if cfg.impl == "auto" and x.shape[1] == 1 and cfg.matmul_dtype == "float32" else cfg.impl
        y, memory = memory_scan(
            state.memory, q, k, v, theta, eta, alpha,
            chunk_size=cfg.chunk_size, activation=cfg.activation, residual_norm=cfg.use_residual_norm,
            read_before_write=cfg.read_before_write, impl=impl, matmul_dtype=cfg.matmul_dtype,
        )
        return y.astype(self.dtype), MemoryLayerState(memory, conv), records

    def record(self, records: dict, stacked: bool = False) -> None:
        """Sow the records of one call, or with `stacked` of equal-length calls stacked on a leading
        axis by a loop (gate means are averaged over them, gates joined along the sequence)."""
        if stacked:  # [calls, batch, seq, ...] -> [batch, calls * seq, ...]
            join = lambda g: g.swapaxes(0, 1).reshape(g.shape[1], g.shape[0] * g.shape[2], *g.shape[3:])
            fold = {"gate_means": lambda means: jax.tree.map(lambda m: m.mean(0), means),
                    "gates": lambda gates: tuple(map(join, gates))}
            records = {name: fold[name](value) for name, value in records.items()}
        for name, value in records.items():
            self.sow(nnx.Intermediate, name, value)


def record(module: nnx.Module, fn: Callable[..., Any], *args, telemetry: Telemetry) -> tuple[Any, list[dict]]:
    """Run `fn(module, *args)` with every memory layer of `module` recording `telemetry`.

    Returns `fn`'s result and, per memory layer (in graph order, i.e. block order), a dict
    `{name: (one value per memory call, ...)}` of what it recorded. The layers record for this call
    only: afterwards their telemetry is off again and `module`'s state holds nothing new.
    """
    memories = [(path, node) for path, node in nnx.iter_graph(module) if isinstance(node, NeuralMemory)]
    for _, memory in memories:
        memory.telemetry = telemetry
    try:
        out, sown = nnx.capture(fn, nnx.Intermediate)(module, *args)
    finally:
        for _, memory in memories:
            memory.telemetry = Telemetry()
    by_module = defaultdict(dict)
    for path, var in nnx.to_flat_state(sown):
        by_module[tuple(path[:-1])][path[-1]] = var.get_value()
    return out, [by_module.get(tuple(path), {}) for path, _ in memories]


class MemoryLayer(nnx.Module):
    """Titans neural-memory mixer (spec section 3): `o, state = layer(x, state)`."""

    def __init__(self, config: MemoryConfig, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.memory = NeuralMemory(config, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = jnp.dtype(dtype)
        # Per-head RMSNorm (gain [heads, dim]): each head is a separate retrieval whose scale depends
        # on its own memory and gates (a plain linear memory has no LN inside), so normalising heads
        # separately keeps one loud head from drowning the others, as in Gated DeltaNet's per-head
        # output norm; it also needs no reduction across a heads-sharded (TP) axis.
        norm_init = sharded_init(nnx.initializers.ones, "heads", None)
        self.norm_scale = nnx.Param(norm_init(rngs.params(), (config.heads, config.head_dim), param_dtype))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = dense(d_model, config.width, ("embed", "heads"), **kw)
        self.out_proj = dense(config.width, d_model, ("heads", "embed"), **kw)

    def init_state(self, batch_size: int) -> MemoryLayerState:
        return self.memory.init_state(batch_size)

    def __call__(self, x: jax.Array, state: MemoryLayerState | None = None) -> tuple[jax.Array, MemoryLayerState]:
        """x `[batch, seq, d_model]` -> (o `[batch, seq, d_model]` in the compute dtype, new state).

        `state=None` starts from `init_state(batch)`. Calls on consecutive pieces with the carried
        state equal one call on their concatenation.
        """
        y, state = self.memory.scan(x, state)
        y = rms_norm(y, self.norm_scale[...]).astype(self.dtype)
        y = y.reshape(y.shape[:2] + (-1,)) * jax.nn.sigmoid(self.gate_proj(x.astype(self.dtype)))
        return self.out_proj(y), state
