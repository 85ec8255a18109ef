"""Preset files and `section.field=value` overrides: the YAML machinery every config section shares.

A preset is a YAML file with the sections `model`, `train` and `data` (`configs/`, shipped as the
package data `titans.presets`); an override is a dotted path and a value read as YAML
(`model.window=512`, `model.memory.chunk_size=32`, `train.lr=3e-4`, `model.ffn_dim=null`). Typed
frozen dataclasses are built from the mappings with `from_dict`, which checks every field: an
unknown key, a wrong type or a bad value raises `ConfigError` with one line naming the field by its
dotted path and what to do. This module imports nothing of the model or of training.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

SECTIONS = ("model", "train", "data")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; accept the YAML 1.2 / Python float forms."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)?|\.\d[\d_]*(?:[eE][-+]?\d+)?|\.inf|\.nan)$", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _allowed(hint) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def check_field_types(obj, section: str) -> None:
    """Each field's value against its annotation (`int`, `float`, `bool`, `str`, a dataclass, `X | None`);
    an int given for a float field becomes a float."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, allowed = getattr(obj, f.name), _allowed(hints[f.name])
        ok = any(
            (value is None and t is type(None))
            or (t is bool and isinstance(value, bool))
            or (t is int and isinstance(value, int) and not isinstance(value, bool))
            or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (t is str and isinstance(value, str))
            or (dataclasses.is_dataclass(t) and isinstance(value, t))
            for t in allowed
        )
        if not ok:
            names = " or ".join("null" if t is type(None) else "a mapping" if dataclasses.is_dataclass(t)
                                else t.__name__ for t in allowed)
            raise ConfigError(f"{section}.{f.name} must be {names}, got {value!r}")
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(obj, f.name, float(value))


def check_positive(obj, section: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{section}.{name} must be >= 1, got {getattr(obj, name)!r}")


def from_dict(cls, values: Mapping[str, Any], section: str, moved: Mapping[str, str] | None = None):
    """Build the dataclass `cls` from a mapping; a field typed as a dataclass is built from a nested
    mapping. Unknown keys raise `ConfigError`, naming where a key in `moved` now lives."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section} must be a mapping of field: value, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        key = unknown[0]
        if moved and key in moved:
            raise ConfigError(f"{section}.{key} is now {section}.{moved[key]}: rename it")
        raise ConfigError(f"unknown key {section}.{key} (known keys: {', '.join(sorted(known))})")
    fields = dict(values)
    for name, value in values.items():
        nested = [t for t in _allowed(hints[name]) if dataclasses.is_dataclass(t)]
        if nested and isinstance(value, Mapping):
            fields[name] = from_dict(nested[0], value, f"{section}.{name}")
    return cls(**fields)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def flat_items(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf of nested mappings: what two configs are compared by."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`"section.field=value"` (or `section.group.field=value`) -> (path, value read as YAML)."""
    match = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)=(.*)", text.strip(), flags=re.S)
    if not match:
        raise ConfigError(f"override {text!r} must look like section.field=value, e.g. model.variant=mac")
    path, raw = tuple(match.group(1).split(".")), match.group(2)
    if path[0] not in SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {path[0]!r} (sections: {', '.join(SECTIONS)})")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({str(err).splitlines()[0]})") from None
    return path, value


def apply_override(sections: dict[str, Any], text: str) -> None:
    """Set the field an override names inside `sections` (nested mappings, made where missing)."""
    path, value = parse_override(text)
    node = sections
    for key in path[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {key} is a value, not a group of fields")
        node = child
    node[path[-1]] = value


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in importlib.resources.files("titans.presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name_or_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The sections of a preset (`"small"`) or YAML file, with `section.field=value` overrides applied.

    Returns plain mappings per section; `ModelConfig.from_dict` and the training configs type them.
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
        raw = load_yaml(source.read_text())
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
        apply_override(sections, override)
    return sections
