"""ModelConfig (the memory nested as MemoryConfig), the presets in configs/ and the
`section.field=value` override parser: every preset builds (the big ones by shape only), overrides
are typed, bad configs fail with one clear line, old flat run configs still load."""

from __future__ import annotations

import dataclasses

import pytest
from flax import nnx

import titans
from titans.config import VARIANTS, MemoryConfig, ModelConfig
from titans.configfile import ConfigError, parse_override, read_preset
from titans.mixers import MIXERS
from titans.model import TitansLM, count_params

# Parameter counts of the presets (their default variant, mac), from shapes only. configs/README.md
# lists every variant; a change here is an architecture change and must update that table.
PRESET_PARAMS = {"tiny": 59_760, "small": 5_181_760, "niah": 732_560, "ablate": 732_560, "mqar": 192_976,
                 "170m": 184_250_688, "340m": 541_010_432, "760m": 1_150_074_624}


def test_presets_are_found_and_typed():
    assert titans.preset_names() == sorted(PRESET_PARAMS)
    for name in PRESET_PARAMS:
        sections = read_preset(name)
        assert set(sections) == {"model", "train", "data"}
        cfg = titans.load_preset(name)
        assert isinstance(cfg, ModelConfig) and cfg.variant == "mac"


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_every_preset_counts_its_parameters_without_allocating(name):
    assert count_params(titans.load_preset(name)) == PRESET_PARAMS[name]


def test_tiny_builds_for_every_variant():
    assert set(MIXERS) == set(VARIANTS)
    for variant in VARIANTS:
        model = TitansLM(titans.load_preset("tiny", variant=variant), rngs=nnx.Rngs(0))
        assert model.config.variant == variant


def test_overrides_are_read_as_yaml():
    sections = read_preset("small", ["model.variant=swa", "model.window=64", "train.lr=1e-3",
                                     "model.ffn_dim=null", "model.tie_embeddings=false"])
    assert sections["model"]["variant"] == "swa" and sections["model"]["window"] == 64
    assert sections["train"]["lr"] == 1e-3 and sections["model"]["ffn_dim"] is None
    cfg = titans.load_preset("small", variant="swa", window=64)
    assert (cfg.variant, cfg.window) == ("swa", 64)
    assert parse_override("data.tokenizer=byte") == (("data", "tokenizer"), "byte")
    sections = read_preset("small", ["model.memory.chunk_size=32", "model.memory.depth=1"])
    memory = ModelConfig.from_dict(sections["model"]).memory
    assert (memory.chunk_size, memory.depth, memory.heads) == (32, 1, 4)  # the rest of the preset's group kept


def test_yaml_path_and_replace(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  variant: lmm\n  d_model: 64\n  memory:\n    heads: 1\n  attn_heads: 2\n")
    cfg = titans.load_preset(str(path))
    assert (cfg.variant, cfg.d_model, cfg.memory.heads, cfg.memory.max_lr) == ("lmm", 64, 1, 0.1)
    changed = cfg.replace(memory={"max_lr": 1})
    assert changed.memory.max_lr == 1.0 and isinstance(changed.memory.max_lr, float) and changed.memory.heads == 1
    assert cfg.replace(memory=MemoryConfig(heads=2)).memory == MemoryConfig(heads=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_old_flat_memory_keys_load_from_saved_runs_and_are_renamed_elsewhere():
    """Run folders and exports written before the nesting keep the memory's keys flat under model."""
    flat = {k: v for k, v in titans.load_preset("tiny").to_dict().items() if k != "memory"}
    flat.update(mem_heads=2, mem_head_dim=16, mem_expansion=2, mem_residual_norm=False, max_lr=0.01,
                theta_init=0.001, chunk_size=4)
    assert ModelConfig.from_dict(flat, saved=True) == titans.load_preset("tiny")
    with pytest.raises(ConfigError, match=r"^model.chunk_size is now model.memory.chunk_size: rename it$"):
        ModelConfig.from_dict(flat)


@pytest.mark.parametrize("overrides, match", [
    (dict(bogus=1), "unknown key model.bogus"),
    (dict(window="512"), "model.window must be int"),
    (dict(window=0), "model.window must be >= 1"),
    (dict(tie_embeddings=1), "model.tie_embeddings must be bool"),
    (dict(variant="mamba"), "model.variant must be one of"),
    (dict(segment_len=100), "segment_len=100 must be a multiple of model.memory.chunk_size=16"),
    (dict(memory={"heads": 2}), "must equal memory.heads"),
    (dict(memory={"depth": 9}), "model.memory.depth must be in 1..4"),
    (dict(memory={"depth": "2"}), "model.memory.depth must be int"),
    (dict(memory={"activation": "relu"}), "model.memory.activation must be one of"),
    (dict(memory={"theta_init": 0.5}), "model.memory.theta_init must lie strictly between"),
    (dict(memory={"bogus": 1}), "unknown key model.memory.bogus"),
    (dict(memory=3), "model.memory must be a mapping"),
    (dict(dtype="int8"), "model.dtype must be one of"),
    (dict(d_model=250, attn_heads=4), "not a multiple of model.attn_heads"),
    (dict(ffn_dim=0), "model.ffn_dim must be >= 1"),
    (dict(n_persistent=-1), "model.n_persistent must be >= 0"),
    (dict(attn_impl="cudnn"), "model.attn_impl must be one of reference, blockwise, pallas, mosaic, auto"),
])
def test_bad_model_config_fails_with_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        titans.load_preset("small", **overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("call, match", [
    (lambda: read_preset("huge"), "unknown preset 'huge'"),
    (lambda: read_preset("missing/file.yaml"), "does not exist"),
    (lambda: read_preset("small", ["model.window"]), "section.field=value"),
    (lambda: read_preset("small", ["optim.lr=1"]), "unknown section 'optim'"),
    (lambda: read_preset("small", ["model.window=[1"]), "not valid YAML"),
    (lambda: read_preset("small", ["model.window.size=1"]), "window is a value, not a group of fields"),
])
def test_bad_sources_and_overrides_fail_with_one_line(call, match):
    with pytest.raises(ConfigError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_bad_file_sections(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  variant: swa\noptimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        read_preset(str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_preset(str(path))


def test_config_is_frozen():
    cfg = titans.load_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 3
