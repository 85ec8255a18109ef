"""Typed `train` and `data` sections of a preset, and the whole run configuration.

`load_run_config("small", ["model.variant=swa", "train.steps=100"])` reads the same YAML files and
overrides as `titans.load_preset` (`titans.configfile`); unknown keys and wrong types fail with one
line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from titans.config import ModelConfig
from titans.configfile import ConfigError, check_field_types, check_positive, from_dict, read_preset
from titans.train.data.needles import TASKS


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message is one line saying why and what to do."""


class Diverged(TrainError):
    """A run stopped by a loss that was not finite or spiked (`train.on_divergence`)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. AdamW with linear warmup then cosine decay to
    `lr * min_lr_ratio`; weight decay on matrices only; global-norm clipping."""

    seq_len: int = 512
    batch_size: int = 8
    steps: int = 2000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    sample_tokens: int = 200
    sample_prompt: str = "The "
    # Start from these weights instead of a random init (a later stage of a curriculum, or a
    # fine-tune): a run folder of scripts/train.py (its latest checkpoint) or an exported model
    # folder, with the same model config. The optimizer and data stream start fresh.
    init_from: str = ""
    fsdp: int = 1  # devices on the mesh's "fsdp" axis (parameters sharded); the rest is the "data" axis
    # `batch_size` is the global batch, over every device of every process; its gradient is summed
    # over `grad_accum` micro-batches run one after another (the same update, less activation memory).
    grad_accum: int = 1
    # Several processes: seconds without a heartbeat after which the coordination service declares a
    # process dead and the others stop (titans.train.hosts).
    heartbeat_timeout: int = 100
    # State passing (Buitrago Ruiz & Gu 2025, arXiv 2507.02782): the probability that a row's memory
    # starts from the memory its batch slot ended the previous step with, instead of W^0. Chains of
    # rows show training the states of streams far longer than one row, which is what a recurrent
    # model meets past its training length (EVALS.md). Chains restart when a run resumes.
    state_passing: float = 0.0
    # A loss that is not finite, or above `loss_spike` times the median of the last 50 (0: no spike
    # check), is a divergence. `stop` ends the run with an error; `rollback` restores the last good
    # checkpoint, skips the batches from there to the divergence and trains on, at most
    # `max_rollbacks` times (PaLM's recovery, Chowdhery et al. 2022, section 5.1). Either way the
    # checkpoint the diverging step started from is set aside: a checkpoint counts as good only
    # once the step after it gave a finite loss. README, "When things go wrong".
    on_divergence: str = "stop"
    max_rollbacks: int = 3
    loss_spike: float = 0.0

    def __post_init__(self):
        check_field_types(self, "train")
        check_positive(self, "train", "seq_len", "batch_size", "steps", "log_every", "eval_every", "eval_batches",
                       "checkpoint_every", "keep_checkpoints", "fsdp", "grad_accum", "heartbeat_timeout")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.lr must be > 0 and train.min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0 or self.sample_tokens < 0:
            raise ConfigError("train.warmup_steps, weight_decay, sample_tokens must be >= 0 and grad_clip > 0")
        if not 0 <= self.state_passing <= 1:
            raise ConfigError(f"train.state_passing must be a probability in [0, 1], got {self.state_passing}")
        if self.on_divergence not in ("stop", "rollback"):
            raise ConfigError(f"train.on_divergence must be stop or rollback, got {self.on_divergence!r}")
        if self.max_rollbacks < 0 or not (self.loss_spike == 0 or self.loss_spike > 1):
            raise ConfigError(f"train.max_rollbacks must be >= 0 and train.loss_spike 0 (off) or > 1, got "
                              f"{self.max_rollbacks}, {self.loss_spike}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`corpus`: "default" (the offline corpus of `titans.train.data.corpus`), a token store
    (scripts/prepare_data.py), or a folder (or file) of `.txt`, `.jsonl`, `.jsonl.gz` or `.parquet`
    documents, their text in `text_field`; a folder with `train/` and `valid/` subfolders uses them
    as the split, otherwise every 20th document (sorted by path) is held out. A corpus that is not a
    store is tokenized once into a cached store (`titans.train.data.store.prepared`).
    `tokenizer`: `byte`, `bpe-<N>[k]` (a byte-level BPE trained on the default corpus on first use,
    `titans.train.data.bpe`), or a `tokenizer.json` / a folder holding one; `eos_token`,
    `bos_token`, `pad_token` name its special tokens where the usual names are not in it."""

    corpus: str = "default"
    tokenizer: str = "byte"
    text_field: str = "text"
    eos_token: str = ""
    bos_token: str = ""
    pad_token: str = ""
    # The retrieval recipe (`titans.train.data.pipeline.NeedleMix`): this fraction of the training rows
    # end in a needle task of `needle_tasks` (comma list), min_len..row length tokens long, the
    # longest length reached after `needle_curriculum_steps`; the answer's tokens weigh
    # `needle_answer_weight` in the loss (every other token 1). Another `recall_fraction` of the
    # rows are dense recall episodes (needles.recall_row), their recalled digits weighted like
    # answers, with fillers of up to `recall_max_gap` tokens once the curriculum is done.
    needle_fraction: float = 0.0
    needle_tasks: str = "passkey,s-niah-1,s-niah-2"
    needle_min_len: int = 512
    needle_curriculum_steps: int = 0
    needle_answer_weight: float = 1.0
    recall_fraction: float = 0.0
    recall_max_gap: int = 0

    def __post_init__(self):
        check_field_types(self, "data")
        if not self.tokenizer or not self.text_field:
            raise ConfigError("data.tokenizer and data.text_field must not be empty (data.tokenizer=byte is the default)")
        if not 0 <= self.needle_fraction <= 1 or self.needle_curriculum_steps < 0:
            raise ConfigError(f"data.needle_fraction must be in [0, 1] and data.needle_curriculum_steps >= 0, got "
                              f"{self.needle_fraction}, {self.needle_curriculum_steps}")
        if not 0 <= self.recall_fraction <= 1 - self.needle_fraction or self.recall_max_gap < 0:
            raise ConfigError(f"data.recall_fraction must be in [0, 1 - data.needle_fraction] and data.recall_max_gap "
                              f">= 0, got {self.recall_fraction}, {self.recall_max_gap}")
        if not self.needle_answer_weight > 0:
            raise ConfigError(f"data.needle_answer_weight must be > 0, got {self.needle_answer_weight}")
        unknown = [t for t in self.tasks() if t not in TASKS]
        if unknown or not self.tasks():
            raise ConfigError(f"data.needle_tasks: unknown task {unknown[0] if unknown else '(none)'!r}; choose from "
                              f"{', '.join(TASKS)}")

    def tasks(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.needle_tasks.split(",") if t.strip())

    def specials(self) -> dict[str, str]:
        """The special-token overrides, as `titans.tokenizer.load_tokenizer` takes them."""
        return {"eos": self.eos_token, "bos": self.bos_token, "pad": self.pad_token}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig

    def __post_init__(self):
        if self.train.state_passing:
            if self.model.variant == "swa":
                raise ConfigError("train.state_passing passes memory states, and a swa model has none: set it to 0")
            if self.train.seq_len % self.model.memory.chunk_size:
                raise ConfigError(f"train.state_passing needs train.seq_len ({self.train.seq_len}) to be a multiple "
                                  f"of model.memory.chunk_size ({self.model.memory.chunk_size}), so rows end on a "
                                  "chunk boundary")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_run_config(config: str | Path, overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> RunConfig:
    """The run configuration of a preset name or YAML file, with `section.field=value` overrides.
    `model.vocab_size: auto` becomes the tokenizer's size rounded up to a multiple of 128 (loading,
    or first training, the tokenizer)."""
    sections = read_preset(config, overrides)
    data = from_dict(DataConfig, sections["data"], "data")
    if sections["model"].get("vocab_size") == "auto":
        from titans.train.data.bpe import resolve

        size = resolve(data.tokenizer, log, **data.specials()).vocab_size
        sections["model"]["vocab_size"] = -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return RunConfig(ModelConfig.from_dict(sections["model"]), from_dict(TrainConfig, sections["train"], "train"), data)


VOCAB_MULTIPLE = 128  # model.vocab_size: auto rounds up to it (matmul tiles)


def load_run_config_dict(values: dict) -> RunConfig:
    """A `RunConfig` from its `to_dict()` (a run folder's run.json, possibly of an older version)."""
    return RunConfig(ModelConfig.from_dict(values["model"], saved=True), from_dict(TrainConfig, values["train"], "train"),
                     from_dict(DataConfig, values["data"], "data"))
