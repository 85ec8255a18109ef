"""A run folder (`--out` of scripts/train.py): claiming and locking it, `run.json`, the orbax
checkpoint managers, restoring with fallback, and the metrics file.

    run.json          the run configuration (a resume must use the same model config and data stream)
    .lock             held (flock) by the process that trains into the folder (process 0 of several)
    metrics.jsonl     one JSON line per logged step (and per evaluation)
    tb/               TensorBoard event files (tensorboardX)
    checkpoints/      orbax: the last `keep_checkpoints` steps (params, optimizer, RNG and next batch)
    best/             the parameters with the lowest held-out loss so far
`titans.load` reads the model back for inference.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from titans.configfile import ConfigError, flat_items
from titans.loading import BEST, CHECKPOINTS, MODEL_ITEM, RUN_FILE, load, model_checkpoint_args
from titans.tokenizer import FILE as TOKENIZER_FILE
from titans.train import hosts
from titans.train.config import RunConfig, TrainError, load_run_config_dict

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"


def checkpoint_args(model, optimizer, position: dict | None):
    """Save (or, with `position` None, restore into) params, optimizer state and the run's position:
    {"key": RNG key data, "batch": the index of the next training batch} (numpy, the same on every
    process; the batches are a function of that index, `titans.train.data.pipeline.train_dataset`,
    so a checkpoint resumes on any number of processes)."""
    arrays = ocp.args.StandardSave if position is not None else ocp.args.StandardRestore
    return ocp.args.Composite(**{MODEL_ITEM: model_checkpoint_args(model, position is not None)},
                              optimizer=arrays(nnx.state(optimizer)),
                              position=ocp.args.JsonSave(position) if position is not None else ocp.args.JsonRestore())


def model_only_args(model):
    """What `best/` holds: the model's state alone, as the item `titans.load` restores."""
    return ocp.args.Composite(**{MODEL_ITEM: model_checkpoint_args(model, save=True)})


def checkpoint_managers(out: Path, keep: int) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
    """The managers of `checkpoints/` (the newest `keep` steps) and `best/` (the lowest held-out loss)."""
    manager = ocp.CheckpointManager((out / CHECKPOINTS).absolute(),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    best = ocp.CheckpointManager((out / BEST).absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["valid_loss"], best_mode="min", create=True))
    return manager, best


def _differences(saved: dict, mine: dict, section: str) -> list[str]:
    there, here = dict(flat_items(saved.get(section, {}))), dict(flat_items(mine[section]))
    return [k for k in here if there.get(k) != here[k]]


def claim(out: Path, run: RunConfig, tokenizer):
    """Check that `out` is free or holds this run, lock it (returns the open lock file; closing it
    releases the lock), write run.json and a copy of the tokenizer (so the folder loads anywhere).
    Two processes training into one folder would interleave their checkpoints and metrics."""
    path = out / RUN_FILE
    if path.is_file():
        try:  # fill fields added since the run was made with their defaults
            saved = json.loads(json.dumps(load_run_config_dict(json.loads(path.read_text())).to_dict()))
        except (ValueError, KeyError, ConfigError) as err:
            raise TrainError(f"{path} is not readable as a run ({err}): use another --out") from None
        mine = json.loads(json.dumps(run.to_dict()))
        diff = _differences(saved, mine, "model")
        if diff:
            there, here = dict(flat_items(saved["model"])), dict(flat_items(mine["model"]))
            k = diff[0]
            raise TrainError(f"{out} holds a run with a different model config (model.{k}: "
                             f"{there.get(k)!r} there, {here[k]!r} here): use another --out")
        # The data stream must be the same one for the resumed batches to continue it.
        stream = [("data",)] + [("train", k) for k in ("seed", "seq_len", "batch_size")]
        get = lambda tree, key: tree[key[0]] if len(key) == 1 else tree[key[0]].get(key[1])
        if any(get(saved, key) != get(mine, key) for key in stream):
            raise TrainError(f"{out} holds a run with other data, seed, seq_len or batch_size: use another --out")
        if (out / TOKENIZER_FILE).is_file() and hashlib.sha256((out / TOKENIZER_FILE).read_bytes()).hexdigest() \
                != tokenizer.sha256:
            raise TrainError(f"{out} holds a run with another {TOKENIZER_FILE} than {tokenizer.name}: use another --out")
    out.mkdir(parents=True, exist_ok=True)
    # One lock per job, held by process 0: the processes of a multi-host job share `out`, and fcntl
    # locks are not reliable across hosts on every shared filesystem (NFS without lockd).
    if not hosts.is_main():
        return contextlib.nullcontext()
    lock = (out / LOCK_FILE).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise TrainError(f"another process is training into {out} (it holds {out / LOCK_FILE}): wait for it "
                         "to stop or use another --out") from None
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.to_dict(), indent=1))
    tmp.replace(path)
    tokenizer.save(out)
    return lock


def first_line(err: BaseException, limit: int = 160) -> str:
    """An exception as one line for a notice: its type and the first line of its message, cut at a
    word boundary (library messages can hold whole reprs)."""
    text = (str(err).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def set_aside(manager, step: int, why: str) -> str:
    """Move checkpoint `step` to `<why>-<step>-<time>` beside it (kept, never deleted), so the run
    neither restores it nor is kept from saving that step again; returns the new name. Process 0
    moves it while the others wait."""
    manager.wait_until_finished()
    folder = Path(manager.directory) / str(step)
    stamp = f"{why}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside = folder.with_name(stamp)
    for n in range(2, 1000):  # the same step set aside twice in a second (a rollback that saved it again)
        if not aside.exists():
            break
        aside = folder.with_name(f"{stamp}-{n}")
    if hosts.is_main():
        folder.rename(aside)
    hosts.barrier(f"set-aside-{why}-{step}")
    manager.reload()
    return aside.name


def restore_latest(manager, model, optimizer, rng, log) -> tuple[int, jax.Array, int]:
    """Restore the newest readable checkpoint (falling back to older ones, saying so); (step, rng,
    the index of the next training batch), or (0, rng, 0) with none.

    An unreadable step folder is set aside as `unreadable-<step>-<time>`.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        legacy = not (Path(manager.directory) / str(step) / "position").exists()
        try:
            if legacy:  # saved before the position item: the RNG alone, the data iterator at `step`
                args = ocp.args.Composite(**{MODEL_ITEM: model_checkpoint_args(model, False)},
                                          optimizer=ocp.args.StandardRestore(nnx.state(optimizer)),
                                          rng=ocp.args.StandardRestore())
            else:
                args = checkpoint_args(model, optimizer, None)
            restored = manager.restore(step, args=args)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back, never delete it
            aside = set_aside(manager, step, "unreadable")
            log(f"checkpoint step {step} is unreadable ({first_line(err)}); moved it to {aside} and trying the "
                "previous one")
            continue
        nnx.update(model, restored[MODEL_ITEM])
        nnx.update(optimizer, restored["optimizer"])
        position = {"key": restored["rng"]["key"], "batch": step} if legacy else restored["position"]
        log(f"resumed from step {step}")
        return step, jax.random.wrap_key_data(jnp.asarray(np.asarray(position["key"], np.uint32))), position["batch"]
    return 0, rng, 0


def position(rng: jax.Array, batch: int) -> dict:
    """What a checkpoint saves of the run's position (`checkpoint_args`)."""
    return {"key": np.asarray(jax.random.key_data(rng)).tolist(), "batch": batch}


def trim_metrics(path: Path, step: int) -> None:
    """Keep the rows up to the restored `step`: the rows a stopped run logged after its last checkpoint
    are trained again, and a line cut by kill -9 would corrupt the file. Rewritten atomically."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a partial line
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)


def initial_weights(run: RunConfig, log: Callable[[str], None]) -> nnx.State:
    """The weights named by train.init_from: a run folder's latest checkpoint or an exported model,
    of the same model config."""
    source = run.train.init_from
    try:
        model, _ = load(source, log=log)
    except (FileNotFoundError, ValueError) as err:
        raise TrainError(f"train.init_from={source}: {err}") from None
    mine, theirs = dict(flat_items(run.model.to_dict())), dict(flat_items(model.config.to_dict()))
    diff = [k for k in mine if mine[k] != theirs.get(k)]
    if diff:
        raise TrainError(f"train.init_from={source} has another model config (model.{diff[0]}: {theirs.get(diff[0])!r} "
                         f"there, {mine[diff[0]]!r} here): initialise from a model of this config")
    return nnx.state(model)
