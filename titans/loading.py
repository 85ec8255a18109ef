"""`load(path)`: a trained model and its tokenizer, from a run folder or an exported folder.

    model, tokenizer = titans.load("runs/small-mac")             # scripts/train.py --out
    model, tokenizer = titans.load("runs/small-mac", "best")     # its lowest held-out loss
    model, tokenizer = titans.load("exported/small-mac")         # scripts/export.py --out

A run folder holds `run.json` (the run's config: `model`, `train` and `data` sections) and orbax
checkpoints under `checkpoints/` (the newest few) and `best/` (one); an exported folder holds
`config.json` and `model.safetensors` (`titans.pretrained`). This module reads both for inference
and imports nothing of training: only the model's part of a checkpoint is restored. A checkpoint
that cannot be read is skipped for the previous one, with a line saying so (training does the same
and moves it aside; loading never changes the folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from flax import nnx

from titans.config import ModelConfig
from titans.configfile import ConfigError
from titans.model import TitansLM
from titans.pretrained import CONFIG, read_export_config
from titans.tokenizer import FILE as TOKENIZER_FILE
from titans.tokenizer import Tokenizer, saved_tokenizer

RUN_FILE = "run.json"
CHECKPOINTS, BEST = "checkpoints", "best"
MODEL_ITEM = "model"  # the orbax item of a training checkpoint that holds the parameters


def read_run_file(run_dir: str | Path) -> dict:
    """A run folder's `run.json` as a mapping, or one line saying why it is not a run folder."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder ({RUN_FILE} missing): pass the --out of "
                                "scripts/train.py")
    try:
        run = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): it is not a run this code wrote") from None
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise ValueError(f"{path} has no model section: it is not a run this code wrote")
    return run


def model_checkpoint_args(model: nnx.Module, save: bool):
    """The orbax argument that saves (or restores into) a model's whole state as one item."""
    import orbax.checkpoint as ocp

    return (ocp.args.StandardSave if save else ocp.args.StandardRestore)(nnx.state(model))


def restore_trained(run_dir: str | Path, which: str = "latest",
                    log: Callable[[str], None] | None = None) -> tuple[TitansLM, dict]:
    """The model of a run folder at its newest (`latest`) readable checkpoint, or at its lowest
    held-out loss (`best`); and the run's config mapping (`run.json`)."""
    import orbax.checkpoint as ocp

    if which not in ("latest", "best"):
        raise ValueError(f"which must be latest or best, got {which!r}")
    run_dir = Path(run_dir)
    run = read_run_file(run_dir)
    try:
        config = ModelConfig.from_dict(run["model"], saved=True)
    except ConfigError as err:
        raise ConfigError(f"{run_dir / RUN_FILE}: {err}") from None
    model = TitansLM(config, rngs=nnx.Rngs(0))
    folder = (run_dir / (BEST if which == "best" else CHECKPOINTS)).absolute()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} holds no checkpoint yet: train first (scripts/train.py --out {run_dir})")
    with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if which == "best" and manager.best_step() is not None:
            steps = [manager.best_step()]
        skipped = []  # said only once a checkpoint loads: otherwise the one error line says it all
        for step in steps:
            try:
                restored = manager.restore(
                    step, args=ocp.args.Composite(**{MODEL_ITEM: model_checkpoint_args(model, save=False)}))
            except Exception as err:  # noqa: BLE001 - orbax raises many types for an unreadable or mismatched step
                skipped.append(f"checkpoint {folder / str(step)} is unreadable ({type(err).__name__})")
                continue
            for notice in skipped if log is not None else ():
                log(f"{notice}; using step {step}")
            nnx.update(model, restored[MODEL_ITEM])
            return model, run
    raise FileNotFoundError(f"{folder} holds no readable checkpoint (tried {len(steps)}): train again or restore "
                            "the folder")


def load(path: str | Path, which: str = "latest",
         log: Callable[[str], None] | None = None) -> tuple[TitansLM, Tokenizer]:
    """(model, tokenizer) from a run folder (its `which` checkpoint: `latest` or `best`) or an
    exported folder (`which` does not apply). The model carries the tokenizer too (`model.tokenizer`),
    so `model.generate("text")` needs nothing else."""
    path = Path(path).expanduser()
    if (path / CONFIG).is_file() and not (path / RUN_FILE).is_file():
        model, tokenizer = TitansLM.from_pretrained(path), saved_tokenizer(path, read_export_config(path)["tokenizer"])
    elif not (path / RUN_FILE).is_file():
        raise FileNotFoundError(f"{path} is neither a run folder ({RUN_FILE}) nor an exported model ({CONFIG}): pass "
                                "the --out of scripts/train.py or of scripts/export.py")
    else:
        model, run = restore_trained(path, which, log)
        tokenizer = run_tokenizer(path, run)
    model.tokenizer = tokenizer
    return model, tokenizer


def run_tokenizer(run_dir: Path, run: dict) -> Tokenizer:
    """A run folder's tokenizer: its copy of tokenizer.json (written when training started), or the
    byte tokenizer."""
    data = run.get("data", {})
    entry = {"name": data.get("tokenizer", "byte"), "file": TOKENIZER_FILE if (run_dir / TOKENIZER_FILE).is_file() else None,
             **{k: data.get(k, "") for k in ("eos_token", "bos_token", "pad_token")}}
    return saved_tokenizer(run_dir, entry)
