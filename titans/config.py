"""Typed model configuration, the preset files in `configs/`, and `section.field=value` overrides.

One parser serves `titans.load_preset` and `scripts/train.py`: a preset is a YAML file with the
sections `model`, `train` and `data`; an override is `section.field=value` with the value read as
YAML (`model.window=512`, `model.variant=mac`, `train.lr=3e-4`, `model.ffn_dim=null`). Every field
is checked against its dataclass: an unknown key, a wrong type or an inconsistent combination
raises `ConfigError` with one line naming the field and what to do.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import yaml

from kernels.attention import IMPLS as ATTENTION_IMPLS
from titans.memory_layer import MemoryLayerConfig

SECTIONS = ("model", "train", "data")
VARIANTS = ("swa", "lmm", "mag", "mal", "mac")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
PARAM_DTYPES = ("float32", "float64")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; accept the YAML 1.2 / Python float forms."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?|\.inf|\.nan)$", re.X),
    list("-+0123456789."),
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field and the fix."""


def check_field_types(obj, section: str) -> None:
    """Each field's value against its annotation (`int`, `float`, `bool`, `str`, `X | None`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        ok = any(
            (value is None and t is type(None))
            or (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t is str and isinstance(value, str))
            for t in allowed
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"{section}.{f.name} must be {names}, got {value!r}")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, float(value))


def check_positive(obj, section: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{section}.{name} must be >= 1, got {getattr(obj, name)!r}")


# ModelConfig field -> MemoryLayerConfig field, so the memory's own checks report model names.
_MEMORY_FIELDS = {
    "d_model": "d_model", "mem_heads": "num_heads", "mem_head_dim": "head_dim", "mem_depth": "depth",
    "mem_expansion": "expansion", "mem_activation": "activation", "mem_residual_norm": "residual_norm",
    "chunk_size": "chunk_size", "max_lr": "max_lr", "per_layer_lr": "per_layer_lr",
    "theta_init": "theta_init", "eta_init": "eta_init", "alpha_init": "alpha_init",
    "conv_kernel": "conv_kernel", "read_before_write": "read_before_write", "mem_impl": "impl",
    "mem_matmul_dtype": "matmul_dtype",
}


def _memory_default(model_field: str):
    return next(f.default for f in dataclasses.fields(MemoryLayerConfig) if f.name == _MEMORY_FIELDS[model_field])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of a `TitansLM` (spec sections 3-6).

    `variant` picks the mixer: `swa` (sliding-window attention), `lmm` (memory only), `mag`
    (attention and memory side by side, gated), `mal` (memory then attention), `mac` (memory as
    context: segments of `segment_len` tokens attend to a retrieval from the memory left by the
    previous segments). `ffn_dim=None` is 8/3 d_model rounded up to a multiple of 64;
    `attn_head_dim=None` is d_model / attn_heads. `dtype` is the compute dtype (bfloat16 on
    accelerators); parameters and the memory state stay in `param_dtype` (float32).
    `attn_block` is the query (and key) tile of the sliding-window attention and `attn_impl` its
    implementation (`kernels.attention.sliding_window_attention`: auto, blockwise, pallas,
    reference); both are speed knobs only.
    """

    variant: str = "mac"
    vocab_size: int = 260
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
    # memory (spec sections 1-3); defaults are MemoryLayerConfig's, stated once there
    mem_heads: int = 4
    mem_head_dim: int = 64
    mem_depth: int = _memory_default("mem_depth")
    mem_expansion: int = _memory_default("mem_expansion")
    mem_activation: str = _memory_default("mem_activation")
    mem_residual_norm: bool | None = _memory_default("mem_residual_norm")
    chunk_size: int = _memory_default("chunk_size")
    max_lr: float = _memory_default("max_lr")
    per_layer_lr: bool = _memory_default("per_layer_lr")
    theta_init: float = _memory_default("theta_init")
    eta_init: float = _memory_default("eta_init")
    alpha_init: float = _memory_default("alpha_init")
    conv_kernel: int = _memory_default("conv_kernel")
    read_before_write: bool = _memory_default("read_before_write")
    mem_impl: str = _memory_default("mem_impl")
    mem_matmul_dtype: str = _memory_default("mem_matmul_dtype")
    # MAC
    segment_len: int = 128
    # precision
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        check_field_types(self, "model")
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
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
        if self.head_dim % 2:
            raise ConfigError(f"attention head dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"model.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ConfigError(f"model.param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")
        if self.variant in ("mag", "mac") and self.attn_width != self.mem_width:
            raise ConfigError(
                f"model.variant={self.variant} multiplies attention by memory outputs, so attn_heads*attn_head_dim "
                f"({self.attn_width}) must equal mem_heads*mem_head_dim ({self.mem_width})"
            )
        if self.variant == "mac" and self.segment_len % self.chunk_size:
            raise ConfigError(
                f"model.segment_len={self.segment_len} must be a multiple of model.chunk_size={self.chunk_size} "
                "(MAC segments end on memory chunk boundaries)"
            )
        try:
            self.memory_config()
        except ValueError as err:
            message = str(err)
            for model_name, layer_name in _MEMORY_FIELDS.items():
                message = message.replace(f"MemoryLayerConfig.{layer_name} ", f"model.{model_name} ")
            raise ConfigError(message) from None

    @property
    def head_dim(self) -> int:
        """Attention head dim."""
        return self.attn_head_dim or self.d_model // self.attn_heads

    @property
    def attn_width(self) -> int:
        return self.attn_heads * self.head_dim

    @property
    def mem_width(self) -> int:
        return self.mem_heads * self.mem_head_dim

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width."""
        return self.ffn_dim or -(-8 * self.d_model // 3 // 64) * 64

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def memory_config(self, d_model: int | None = None) -> MemoryLayerConfig:
        """The memory layer's config; `d_model` overrides the input width (MAC's memory reads `y`)."""
        fields = {layer: getattr(self, model) for model, layer in _MEMORY_FIELDS.items()}
        fields["d_model"] = d_model or self.d_model
        return MemoryLayerConfig(**fields, dtype=self.compute_dtype, param_dtype=self.params_dtype)

    def replace(self, **changes) -> ModelConfig:
        return from_dict(ModelConfig, {**dataclasses.asdict(self), **changes}, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls, values: Mapping[str, Any], section: str):
    """Build the dataclass `cls` from a mapping; unknown keys raise `ConfigError`."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {section!r} must be a mapping of field: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]} (known keys: {', '.join(sorted(known))})")
    return cls(**values)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`"section.field=value"` -> (section, field, value read as YAML)."""
    match = re.fullmatch(r"([A-Za-z_]\w*)\.([A-Za-z_]\w*)=(.*)", text.strip(), flags=re.S)
    if not match:
        raise ConfigError(f"override {text!r} must look like section.field=value, e.g. model.variant=mac")
    section, name, raw = match.groups()
    if section not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r} (sections: {', '.join(SECTIONS)})")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({str(err).splitlines()[0]})") from None
    return section, name, value


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in importlib.resources.files("titans.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The sections of a preset (`"small"`) or YAML file, with `section.field=value` overrides applied.

    Returns plain mappings per section; `model_config` (and the training config) type them.
    """
    text = str(name_or_path)
    if text in preset_names():
        source = importlib.resources.files("titans.presets") / f"{text}.yaml"
    elif text.endswith((".yaml", ".yml")) or "/" in text:
        source = Path(text)
        if not source.is_file():
            raise ConfigError(f"config file {text} does not exist (presets: {', '.join(preset_names())})")
    else:
        raise ConfigError(f"unknown preset {text!r}: use one of {', '.join(preset_names())} or a path to a .yaml file")
    try:
        raw = _load_yaml(source.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{text}: not valid YAML ({str(err).splitlines()[0]})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{text}: must be a mapping with sections {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{text}: unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    sections = {name: dict(raw.get(name) or {}) for name in SECTIONS}
    for override in overrides:
        section, name, value = parse_override(override)
        sections[section][name] = value
    return sections


def load_preset(name_or_path: str | Path, **model_overrides) -> ModelConfig:
    """The `ModelConfig` of a preset name (`tiny`, `small`, `170m`, `340m`, `760m`) or YAML path,
    with keyword overrides of model fields (`load_preset("small", variant="swa")`)."""
    model = read_config(name_or_path)["model"]
    model.update(model_overrides)
    return from_dict(ModelConfig, model, "model")
