"""Typed model configuration: `ModelConfig` with the memory's settings nested as `MemoryConfig`.

Both are frozen dataclasses checked field by field when built (`titans.configfile`): an unknown
key, a wrong type or an inconsistent combination raises `ConfigError` with one line naming the
field by its dotted path (`model.memory.chunk_size`). In YAML and overrides the memory is the
group `model.memory.*`. The memory layer is built from the same `MemoryConfig` object. This
module imports no model code: only the kernels' lists of choices.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp

from titans.configfile import ConfigError, check_field_types, check_positive, from_dict, read_preset
from titans.kernels.attention import IMPLS as ATTENTION_IMPLS
from titans.kernels.memory import ACTIVATIONS, IMPLS as MEMORY_IMPLS, MATMUL_DTYPES, MAX_DEPTH, layer_shapes

VARIANTS = ("swa", "lmm", "mag", "mal", "mac")  # the keys of titans.mixers.MIXERS
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
PARAM_DTYPES = ("float32", "float64")

# Run folders and exports written before the memory settings were nested keep them flat under
# `model`; `ModelConfig.from_dict(..., saved=True)` reads those once, through this map.
_FLAT_MEMORY_KEYS = {
    "mem_heads": "heads", "mem_head_dim": "head_dim", "mem_depth": "depth", "mem_expansion": "expansion",
    "mem_activation": "activation", "mem_residual_norm": "residual_norm", "chunk_size": "chunk_size",
    "max_lr": "max_lr", "per_layer_lr": "per_layer_lr", "theta_init": "theta_init", "eta_init": "eta_init",
    "alpha_init": "alpha_init", "conv_kernel": "conv_kernel", "read_before_write": "read_before_write",
    "mem_impl": "impl", "mem_matmul_dtype": "matmul_dtype",
}


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The neural long-term memory of one layer (spec sections 1-3).

    Each of `heads` heads holds an MLP `head_dim -> hidden_width -> ... -> head_dim` of `depth`
    matrices, `hidden_width = expansion * head_dim` (depth 1 is one `[head_dim, head_dim]` matrix).
    `residual_norm=None` picks the spec default: residual + LayerNorm for depth >= 2, plain for 1.
    `theta_init`, `eta_init`, `alpha_init` are the gates at initialisation (for a zero input), the
    write rate capped by `max_lr` (one per matrix with `per_layer_lr`). `impl` and `matmul_dtype`
    choose the scan's kernel and its matmul input dtype (`titans.kernels.memory.memory_scan`).

    The paper's ablations (Behrouz et al. 2024, Table 5) switch parts off: `momentum=False` fixes
    eta = 0 (the update is the momentary surprise alone), `decay=False` fixes alpha = 0 (no
    forgetting), `data_gates=False` makes theta, eta and alpha learned constants per head instead
    of functions of the token, `conv_kernel=1` leaves no convolution (a 1-tap causal conv is a
    per-channel scale, which the projection absorbs). `inner_loss="mean"` averages the inner loss
    ||M(k) - v||^2 over the head dim instead of summing it (titans-pytorch's choice): its gradient
    is the sum's divided by head_dim, so it is exactly theta / head_dim, and the scan is unchanged.
    """

    heads: int = 4
    head_dim: int = 64
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
    momentum: bool = True
    decay: bool = True
    data_gates: bool = True
    inner_loss: str = "sum"
    impl: str = "auto"
    matmul_dtype: str = "float32"

    def __post_init__(self):
        section = "model.memory"
        check_field_types(self, section)
        check_positive(self, section, "heads", "head_dim", "expansion", "chunk_size", "conv_kernel")
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ConfigError(f"{section}.depth must be in 1..{MAX_DEPTH}, got {self.depth}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"{section}.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not self.max_lr > 0:
            raise ConfigError(f"{section}.max_lr must be > 0, got {self.max_lr}")
        if not 0 < self.theta_init < self.max_lr:
            raise ConfigError(f"{section}.theta_init must lie strictly between 0 and max_lr={self.max_lr}, "
                              f"got {self.theta_init}")
        for name in ("eta_init", "alpha_init"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{section}.{name} must lie strictly between 0 and 1, got {getattr(self, name)}")
        if self.inner_loss not in ("sum", "mean"):
            raise ConfigError(f"{section}.inner_loss must be sum or mean, got {self.inner_loss!r}")
        if self.impl not in MEMORY_IMPLS:
            raise ConfigError(f"{section}.impl must be one of {', '.join(MEMORY_IMPLS)}, got {self.impl!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ConfigError(f"{section}.matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, "
                              f"got {self.matmul_dtype!r}")

    @property
    def width(self) -> int:
        """heads * head_dim: the width of q, k, v and of the retrieval."""
        return self.heads * self.head_dim

    @property
    def hidden_width(self) -> int:
        """The memory MLP's hidden width."""
        return self.expansion * self.head_dim

    @property
    def use_residual_norm(self) -> bool:
        return self.depth >= 2 if self.residual_norm is None else self.residual_norm

    def layer_shapes(self) -> tuple[tuple[int, int], ...]:
        """`(in, out)` of each memory matrix W_1..W_L (one head)."""
        return layer_shapes(self.head_dim, self.hidden_width, self.depth)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of a `TitansLM` (spec sections 3-6).

    `variant` picks the mixer: `swa` (sliding-window attention), `lmm` (memory only), `mag`
    (attention and memory side by side, gated), `mal` (memory then attention), `mac` (memory as
    context: segments of `segment_len` tokens attend to a retrieval from the memory left by the
    previous segments). `ffn_dim=None` is 8/3 d_model rounded up to a multiple of 64;
    `attn_head_dim=None` is d_model / attn_heads. `dtype` is the compute dtype (bfloat16 on
    accelerators); parameters and the memory state stay in `param_dtype` (float32).
    `attn_block` is the query (and key) tile of the attention and `attn_impl` its implementation
    (`titans.kernels.attention.sliding_window_attention`: auto, blockwise, pallas, mosaic, reference), for
    every variant's attention, MAC's included; both are speed knobs only.
    """

    variant: str = "mac"
    vocab_size: int | str = 260  # or "auto" in a run's config: the tokenizer's, rounded up (titans.train.config)
    d_model: int = 256
    n_layers: int = 4
    ffn_dim: int | None = None
    tie_embeddings: bool = True
    # attention
    attn_heads: int = 4
    attn_head_dim: int | None = None
    window: int = 256
    n_persistent: int = 16
    rope_base: float = 10000.0
    attn_block: int = 128
    attn_impl: str = "auto"
    # memory
    memory: MemoryConfig = MemoryConfig()
    # MAC
    segment_len: int = 128
    # precision
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_field_types(self, "model")
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if isinstance(self.vocab_size, str):
            if self.vocab_size != "auto":
                raise ConfigError(f"model.vocab_size must be a count or auto, got {self.vocab_size!r}")
            raise ConfigError("model.vocab_size: auto is resolved from the run's tokenizer by "
                              "titans.train.config.load_run_config: give a count to build a model alone")
        check_positive(self, "model", "vocab_size", "d_model", "n_layers", "attn_heads", "window", "attn_block",
                       "segment_len")
        for name in ("ffn_dim", "attn_head_dim"):
            if getattr(self, name) is not None:
                check_positive(self, "model", name)
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"model.attn_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attn_impl!r}")
        if self.n_persistent < 0:
            raise ConfigError(f"model.n_persistent must be >= 0, got {self.n_persistent}")
        if self.rope_base <= 1:
            raise ConfigError(f"model.rope_base must be > 1, got {self.rope_base}")
        if self.attn_head_dim is None and self.d_model % self.attn_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not a multiple of model.attn_heads={self.attn_heads}: "
                "change one, or set model.attn_head_dim"
            )
        if self.attn_dim % 2:
            raise ConfigError(f"attention head dim {self.attn_dim} must be even (RoPE rotates pairs)")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"model.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"model.param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if self.variant in ("mag", "mac") and self.attn_width != self.memory.width:
            raise ConfigError(
                f"model.variant={self.variant} multiplies attention by memory outputs, so attn_heads*attn_head_dim "
                f"({self.attn_width}) must equal memory.heads*memory.head_dim ({self.memory.width})"
            )
        if self.variant == "mac" and self.segment_len % self.memory.chunk_size:
            raise ConfigError(
                f"model.segment_len={self.segment_len} must be a multiple of model.memory.chunk_size="
                f"{self.memory.chunk_size} (MAC segments end on memory chunk boundaries)"
            )

    @property
    def attn_dim(self) -> int:
        """The attention head dim (`attn_head_dim`, or d_model / attn_heads)."""
        return self.attn_head_dim or self.d_model // self.attn_heads

    @property
    def attn_width(self) -> int:
        return self.attn_heads * self.attn_dim

    @property
    def ffn_width(self) -> int:
        """The SwiGLU hidden width (`ffn_dim`, or 8/3 d_model rounded up to a multiple of 64)."""
        return self.ffn_dim or -(-8 * self.d_model // 3 // 64) * 64

    @property
    def jnp_dtype(self) -> jnp.dtype:
        """`dtype` as a numpy dtype: what activations are computed in."""
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        """`param_dtype` as a numpy dtype: parameters and the memory state."""
        return jnp.dtype(self.param_dtype)

    @property
    def dtypes(self) -> dict[str, jnp.dtype]:
        """`dtype=` and `param_dtype=` of every flax module of the model."""
        return {"dtype": self.jnp_dtype, "param_dtype": self.jnp_param_dtype}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, saved: bool = False) -> ModelConfig:
        """A config from its mapping (a preset's `model` section, or `to_dict()`). `saved=True`
        reads a run folder's or export's config, whose memory settings may be the old flat keys."""
        values = dict(values)
        if saved:
            flat = {key: values.pop(key) for key in list(values) if key in _FLAT_MEMORY_KEYS}
            if flat:
                values["memory"] = {_FLAT_MEMORY_KEYS[k]: v for k, v in flat.items()} | dict(values.get("memory", {}))
        moved = {key: f"memory.{name}" for key, name in _FLAT_MEMORY_KEYS.items()}
        return from_dict(cls, values, "model", moved)

    def replace(self, **changes) -> ModelConfig:
        """A copy with fields changed (`memory=` takes a `MemoryConfig` or a mapping of its changes)."""
        values = self.to_dict()
        if isinstance(changes.get("memory"), Mapping):
            changes["memory"] = values["memory"] | dict(changes["memory"])
        return ModelConfig.from_dict(values | changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_preset(name_or_path: str | Path, **model_overrides) -> ModelConfig:
    """The `ModelConfig` of a preset name (`tiny`, `small`, `niah`, `170m`, `340m`, `760m`) or YAML
    path, with keyword overrides of model fields (`load_preset("small", variant="swa")`,
    `load_preset("tiny", memory={"depth": 1})`)."""
    return ModelConfig.from_dict(read_preset(name_or_path)["model"]).replace(**model_overrides)
