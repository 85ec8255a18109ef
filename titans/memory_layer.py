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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.memory import IMPLS, MAX_DEPTH, MemoryState, memory_scan
from kernels.memory.common import ACTIVATIONS, MATMUL_DTYPES, layer_shapes
from titans.conv import ConvProjection
from titans.layers import dense, l2_normalize, rms_norm
from titans.sharding import sharded_init



@dataclasses.dataclass(frozen=True)
class MemoryLayerConfig:
    """Hyper-parameters of one memory layer.

    The memory MLP of each head maps `head_dim -> E -> ... -> head_dim` with
    `E = expansion * head_dim` (depth 1 is a single `[head_dim, head_dim]` matrix).
    `residual_norm=None` picks the spec default: residual + LayerNorm for depth >= 2, plain for 1.
    `theta_init`, `eta_init`, `alpha_init` are the gate values at initialisation (for a zero input);
    `dtype` is the compute dtype of the projections, `param_dtype` that of the parameters and of the
    memory state (float32, or float64 for x64 gradient checks).
    """

    d_model: int
    num_heads: int
    head_dim: int
    depth: int = 2
    expansion: int = 4
    activation: str = "gelu"
    residual_norm: bool | None = None
    chunk_size: int = 16
    max_lr: float = 0.1
    per_layer_lr: bool = True
    theta_init: float = 0.01
    eta_init: float = 0.9
    alpha_init: float = 0.02
    conv_kernel: int = 4
    read_before_write: bool = False
    impl: str = "auto"
    matmul_dtype: str = "float32"  # "bfloat16": the scan's matmul inputs in bf16 (kernels/memory/README.md)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("d_model", "num_heads", "head_dim", "expansion", "chunk_size", "conv_kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MemoryLayerConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or not 1 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"MemoryLayerConfig.depth must be an int in 1..{MAX_DEPTH}, got {self.depth!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MemoryLayerConfig.activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.residual_norm is not None and not isinstance(self.residual_norm, bool):
            raise ValueError(
                f"MemoryLayerConfig.residual_norm must be None (depth default) or a bool, got {self.residual_norm!r}"
            )
        for name in ("per_layer_lr", "read_before_write"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MemoryLayerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not self.max_lr > 0:
            raise ValueError(f"MemoryLayerConfig.max_lr must be > 0, got {self.max_lr!r}")
        if not 0 < self.theta_init < self.max_lr:
            raise ValueError(
                f"MemoryLayerConfig.theta_init must lie strictly between 0 and max_lr={self.max_lr}, "
                f"got {self.theta_init!r}"
            )
        for name in ("eta_init", "alpha_init"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(
                    f"MemoryLayerConfig.{name} must lie strictly between 0 and 1, got {getattr(self, name)!r}"
                )
        if self.impl not in IMPLS:
            raise ValueError(f"MemoryLayerConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"MemoryLayerConfig.matmul_dtype must be one of {MATMUL_DTYPES}, got {self.matmul_dtype!r}")
        dtype = _as_dtype(self.dtype)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"MemoryLayerConfig.dtype must be a floating dtype such as jnp.bfloat16, got {self.dtype!r}"
            )
        if _as_dtype(self.param_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
            raise ValueError(
                f"MemoryLayerConfig.param_dtype must be float32 (float64 only for x64 checks), got {self.param_dtype!r}"
            )

    @property
    def use_residual_norm(self) -> bool:
        return self.depth >= 2 if self.residual_norm is None else self.residual_norm

    @property
    def hidden_dim(self) -> int:
        return self.expansion * self.head_dim

    def memory_shapes(self) -> tuple[tuple[int, int], ...]:
        """`(in, out)` of each memory matrix W_1..W_L (one head)."""
        return layer_shapes(self.head_dim, self.hidden_dim, self.depth)


class MemoryLayerState(NamedTuple):
    """What a caller carries between calls.

    memory: the `MemoryState` of the scan (weights/momentum/anchor `[batch, heads, in, out]`).
    conv: the last `conv_kernel - 1` pre-conv inputs of q, k, v, each `[batch, conv_kernel-1, heads*dim]`
    in the compute dtype (the projections' output dtype, so carrying them is exact).
    """

    memory: MemoryState
    conv: tuple[jax.Array, jax.Array, jax.Array]


def _as_dtype(value) -> jnp.dtype | None:
    try:
        return jnp.dtype(value)
    except TypeError:
        return None


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class NeuralMemory(nnx.Module):
    """The memory itself (spec section 3 up to `y`): q/k/v paths, gates, learned `W^0`, the scan.

    `y, state = memory.scan(x, state)`; `MemoryLayer` adds the output norm, gate and projection,
    while MAG and MAC combine `y` with attention their own way (spec section 4).
    """

    def __init__(self, config: MemoryLayerConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        hd = cfg.num_heads * cfg.head_dim
        path = lambda: ConvProjection(
            cfg.d_model, hd, kernel=cfg.conv_kernel, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.q, self.k, self.v = path(), path(), path()

        # Gate weights at a tenth of the fan-in std: the gates depend on the token from step 0, but
        # for a unit-RMS input the logits spread by only ~0.1 around the biases, so every token
        # starts in the well-conditioned regime of spec section 2.
        gate_init = nnx.initializers.variance_scaling(0.01, "fan_in", "normal", in_axis=0, out_axis=-1)
        theta_axes = (cfg.num_heads, cfg.depth) if cfg.per_layer_lr else (cfg.num_heads,)
        theta_names = ("heads", None) if cfg.per_layer_lr else ("heads",)

        def gate(axes, names, init_value):
            w = sharded_init(gate_init, "embed", *names)(rngs.params(), (cfg.d_model,) + axes, cfg.param_dtype)
            b = sharded_init(nnx.initializers.constant(_logit(init_value)), *names)(
                rngs.params(), axes, cfg.param_dtype
            )
            return nnx.Param(w), nnx.Param(b)

        # theta0 = theta_init (0.01 by default): with eta0 = 0.9 the momentum's steady-state step is
        # theta/(1-eta) = 0.1, inside the stable regime; alpha0 = 0.02 forgets slowly (e-fold ~50
        # tokens) yet keeps the weights bounded while the outer loop learns where to forget.
        self.w_theta, self.b_theta = gate(theta_axes, theta_names, cfg.theta_init / cfg.max_lr)
        self.w_eta, self.b_eta = gate((cfg.num_heads,), ("heads",), cfg.eta_init)
        self.w_alpha, self.b_alpha = gate((cfg.num_heads,), ("heads",), cfg.alpha_init)

        # W^0 per head [heads, in, out]; fan-in scale treating heads as a batch axis.
        mem_init = sharded_init(
            nnx.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
            ),
            "heads", None, None,
        )
        self.init_weights = nnx.List(
            nnx.Param(mem_init(rngs.params(), (cfg.num_heads, n_in, n_out), cfg.param_dtype))
            for n_in, n_out in cfg.memory_shapes()
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
        heads = (x.shape[0], x.shape[1], cfg.num_heads, cfg.head_dim)
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
        x = x.astype(cfg.param_dtype)
        highest = jax.lax.Precision.HIGHEST
        logit = lambda w, b: jnp.einsum("btm,m...->bt...", x, w[...], precision=highest) + b[...]
        theta = cfg.max_lr * jax.nn.sigmoid(logit(self.w_theta, self.b_theta))
        eta = jax.nn.sigmoid(logit(self.w_eta, self.b_eta))
        alpha = jax.nn.sigmoid(logit(self.w_alpha, self.b_alpha))
        return theta, eta, alpha

    def scan(self, x: jax.Array, state: MemoryLayerState | None = None) -> tuple[jax.Array, MemoryLayerState]:
        """The retrieval `y [batch, seq, heads, dim]` (compute dtype) and the new state.

        x: `[batch, seq, d_model]`; `state=None` starts from `init_state(batch)`. Under
        `nnx.capture(..., nnx.Intermediate)` it sows the call's gate means as "gate_means".
        """
        y, state, means = self.scan_with_gate_means(x, state)
        self.sow_gate_means(means)
        return y, state

    def sow_gate_means(self, means: dict[str, jax.Array]) -> None:
        # Only under nnx.capture (flax 0.12 marks it with `__captures__`): outside one, `sow` would
        # add a variable to the module, and so to its state and checkpoints.
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, "gate_means", means)

    def scan_with_gate_means(self, x: jax.Array, state: MemoryLayerState | None = None):
        """`scan` without sowing: (y, state, {"theta", "eta", "alpha"} means of this call).

        For callers inside a JAX loop (MAC's segment scan), where sowing would leak the loop's
        tracers: they return the means from the loop and sow them outside.
        """
        cfg = self.config
        if state is None:
            state = self.init_state(x.shape[0])
        q, k, v, conv = self.project(x, state.conv)
        theta, eta, alpha = self.gates(x)
        means = {"theta": theta.mean(), "eta": eta.mean(), "alpha": alpha.mean()}
        # One token (decode) costs one gradient in the token loop but a whole chunk (two with a
        # traced offset) in the chunk form; both compute the same numbers (spec section 2).
        impl = "reference" if cfg.impl == "auto" and x.shape[1] == 1 and cfg.matmul_dtype == "float32" else cfg.impl
        y, memory = memory_scan(
            state.memory, q, k, v, theta, eta, alpha,
            chunk_size=cfg.chunk_size, activation=cfg.activation, residual_norm=cfg.use_residual_norm,
            read_before_write=cfg.read_before_write, impl=impl, matmul_dtype=cfg.matmul_dtype,
        )
        return y.astype(cfg.dtype), MemoryLayerState(memory, conv), means


class MemoryLayer(nnx.Module):
    """Titans neural-memory mixer (spec section 3): `o, state = layer(x, state)`."""

    def __init__(self, config: MemoryLayerConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        hd = cfg.num_heads * cfg.head_dim
        self.memory = NeuralMemory(cfg, rngs=rngs)
        # Per-head RMSNorm (gain [heads, dim]): each head is a separate retrieval whose scale depends
        # on its own memory and gates (a plain linear memory has no LN inside), so normalising heads
        # separately keeps one loud head from drowning the others, as in Gated DeltaNet's per-head
        # output norm; it also needs no reduction across a heads-sharded (TP) axis.
        norm_init = sharded_init(nnx.initializers.ones, "heads", None)
        self.norm_scale = nnx.Param(norm_init(rngs.params(), (cfg.num_heads, cfg.head_dim), cfg.param_dtype))
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.gate_proj = dense(cfg.d_model, hd, ("embed", "heads"), **kw)
        self.out_proj = dense(hd, cfg.d_model, ("heads", "embed"), **kw)

    def init_state(self, batch_size: int) -> MemoryLayerState:
        return self.memory.init_state(batch_size)

    def __call__(self, x: jax.Array, state: MemoryLayerState | None = None) -> tuple[jax.Array, MemoryLayerState]:
        """x `[batch, seq, d_model]` -> (o `[batch, seq, d_model]` in the compute dtype, new state).

        `state=None` starts from `init_state(batch)`. Calls on consecutive pieces with the carried
        state equal one call on their concatenation.
        """
        cfg = self.config
        y, state = self.memory.scan(x, state)
        y = rms_norm(y, self.norm_scale[...]).astype(cfg.dtype)
        y = y.reshape(y.shape[:2] + (-1,)) * jax.nn.sigmoid(self.gate_proj(x.astype(cfg.dtype)))
        return self.out_proj(y), state
