"""Parameters-only model folders: `model.safetensors` (dotted parameter paths as keys) + `config.json`.

    save_pretrained(model, "out/", dtype="float32", tokenizer=tokenizer)   # + tokenizer.json for a BPE
    model, tokenizer = titans.load("out/")   # or TitansLM.from_pretrained("out/")

Loading parses JSON and safetensors only: no pickle, nothing from the files is executed. Every key
and shape is checked against the model the config builds; bfloat16 files load into float32 params.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.tokenizer import ByteTokenizer

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _flat_params(model) -> dict[str, nnx.Variable]:
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_pretrained(model, folder: str | Path, *, dtype: str = "float32", tokenizer=None) -> Path:
    """Write `folder` (which must not exist) atomically: a temporary folder renamed at the end. The
    tokenizer (default: the byte tokenizer) goes with it: a copy of its tokenizer.json, or its name."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists: choose a new folder (nothing was overwritten)")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    try:
        tensors = {k: np.asarray(jnp.asarray(v[...], dtype)) for k, v in _flat_params(model).items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        config = {"format_version": FORMAT_VERSION, "dtype": dtype, "tokenizer": (tokenizer or ByteTokenizer()).save(tmp),
                  "model": model.config.to_dict()}
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_export_config(folder: str | Path) -> dict:
    """The `config.json` of an exported folder: format version, dtype, tokenizer and the model config."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an exported model folder (make one with scripts/export.py)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): export the model again") from None
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        version = config.get("format_version") if isinstance(config, dict) else None
        raise ValueError(f"{path}: format_version {version!r}, this code reads {FORMAT_VERSION}")
    return config


def load_params(model, folder: str | Path) -> None:
    """Fill `model`'s parameters from `folder/model.safetensors` (keys and shapes must match exactly)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(folder) / WEIGHTS
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({str(err).strip() or type(err).__name__}): "
                         "export the run again") from None
    params = _flat_params(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{folder}: parameters do not match the config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    for key, var in params.items():
        if tensors[key].shape != var.shape:
            raise ValueError(f"{folder}: {key} has shape {tensors[key].shape}, the config builds {var.shape}")
        var[...] = jnp.asarray(tensors[key], var.dtype)
