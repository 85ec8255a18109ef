"""The training loop: data, AdamW, a jitted step, metrics, evaluation, checkpoints and resume.

`train(run, out)` trains `run.model` on `run.data` for `run.train.steps` steps (or `steps=`),
writing under `out`:
    run.json          the run configuration (a resume must use the same model config)
    metrics.jsonl     one JSON line per logged step (and per evaluation)
    tb/               TensorBoard event files (tensorboardX)
    checkpoints/      orbax: the last `keep_checkpoints` steps (params, optimizer, data iterator, RNG)
    best/             the parameters with the lowest held-out loss so far
Rerunning with the same `out` resumes from the newest readable checkpoint; the losses after a resume
equal those of an uninterrupted run to the last bit on CPU. SIGTERM / SIGINT save and return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import signal
import time
from pathlib import Path
from typing import Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from kernels.memory import MemoryState
from titans.memory_layer import MemoryLayerState
from titans.model import ModelState, TitansLM
from titans import pretrained
from titans.sampling import generate
from titans.sharding import logical_shardings
from train.config import ConfigError, RunConfig, load_run_config_dict
from train.data import corpus, niah, pipeline
from train.data.tokenizer import get_tokenizer

RUN_FILE = "run.json"
LOCK_FILE = ".lock"


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message is one line saying why and what to do."""


def _mark_absl_flags_parsed() -> None:
    # grain reads absl flags in its workers; unparsed flags raise there (google/grain#1355).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def load_split(data_cfg, log: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Training and held-out document texts."""
    if data_cfg.corpus == "default":
        root = corpus.ensure(log=log)
        train_docs, valid_docs = corpus.read_documents(root / "train"), corpus.read_documents(root / "valid")
    else:
        root = Path(data_cfg.corpus).expanduser()
        if (root / "train").is_dir() and (root / "valid").is_dir():
            train_docs, valid_docs = corpus.read_documents(root / "train"), corpus.read_documents(root / "valid")
        else:
            docs = corpus.read_documents(root)
            train_docs = [d for i, d in enumerate(docs) if i % 20]
            valid_docs = [d for i, d in enumerate(docs) if not i % 20]
    if not train_docs:
        raise TrainError(f"corpus {root} has no training documents (.txt or .jsonl): add text or fix data.corpus")
    if not valid_docs:
        raise TrainError(f"corpus {root} has no held-out documents: add a valid/ folder or more documents")
    return [t for _, t in train_docs], [t for _, t in valid_docs]


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * cfg.min_lr_ratio
    )
    # No decay on gains, biases and gate biases (vectors): only matrices and larger.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask),
    ), schedule


def _nll(model: TitansLM, batch: jax.Array, state: ModelState | None = None) -> tuple[jax.Array, ModelState]:
    """Per-token cross-entropy `[B, L]` (nats) of batch `[B, L + 1]` and the model state after it."""
    logits, end = model.run(batch[:, :-1], state)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], axis=-1)[..., 0], end


def _mean(nll: jax.Array, weights: jax.Array | None) -> jax.Array:
    return jnp.mean(nll) if weights is None else jnp.sum(weights * nll) / jnp.sum(weights)


def next_token_loss(model: TitansLM, batch: jax.Array, weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy (nats) of batch `[B, L + 1]`: its mean, weighted by `weights` `[B, L]` when given,
    and its sum."""
    nll = _nll(model, batch)[0]
    return _mean(nll, weights), jnp.sum(nll)


class Carry(NamedTuple):
    """State passing: each block's memory state at the end of the previous step's rows, and which
    rows of this step start from it (`keep [B]` bool; the others start from W^0)."""

    memories: tuple[MemoryLayerState, ...]
    keep: jax.Array


def _start_state(model: TitansLM, carry: Carry) -> ModelState:
    """Rows' start: the carried memory weights and momentum where `keep`, W^0 and zero momentum
    elsewhere; conv tails and attention always fresh (a row is a new document)."""
    fresh = model.memory_states(model.init_state(carry.keep.shape[0]))
    pick = lambda f, c: jnp.where(carry.keep.reshape((-1,) + (1,) * (f.ndim - 1)), c, f)
    memories = []
    for f, c in zip(fresh, carry.memories):
        weights = tuple(map(pick, f.memory.weights, c.memory.weights))
        momentum = tuple(map(pick, f.memory.momentum, c.memory.momentum))
        # Rows end on a chunk boundary (RunConfig checks), where the anchor equals the weights.
        memories.append(f._replace(memory=MemoryState(weights, momentum, weights, f.memory.offset)))
    return model.start_state(memories)


def _loss_and_gate_means(model: TitansLM, batch: dict[str, jax.Array], carry: Carry | None):
    """The loss and ({"theta", "eta", "alpha"}: each gate's mean over the memory calls of the pass
    (empty without memory), the memory states after the rows when passing them, else None)."""
    def loss_fn(model):
        nll, end = _nll(model, batch["tokens"], None if carry is None else _start_state(model, carry))
        return _mean(nll, batch["weights"]), None if carry is None else model.memory_states(end)

    (loss, memories), sown = nnx.capture(loss_fn, nnx.Intermediate)(model)
    calls = [means for path, var in nnx.to_flat_state(sown) if path[-1] == "gate_means" for means in var.get_value()]
    means = {name: jnp.mean(jnp.stack([c[name] for c in calls])) for name in ("theta", "eta", "alpha")} if calls else {}
    return loss, (means, memories)


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: TitansLM, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], carry: Carry | None = None):
    """One optimizer step on a batch {"tokens", "weights"} (train/data/pipeline.py): (loss, gradient
    global norm, gate means, memory states after the rows when `carry` is given, else None)."""
    (loss, (gate_means, memories)), grads = nnx.value_and_grad(_loss_and_gate_means, has_aux=True)(model, batch, carry)
    optimizer.update(model, grads)
    return loss, optax.tree.norm(grads), gate_means, memories


@nnx.jit
def eval_step(model: TitansLM, batch: jax.Array) -> jax.Array:
    return next_token_loss(model, batch)[1]


# Logical parameter axes -> mesh axes: FSDP shards every d_model axis over "fsdp"; memory heads,
# MLP and vocabulary axes stay whole (a "tensor" axis would take "heads" and "mlp").
SHARDING_RULES = {"embed": "fsdp"}


def make_mesh(fsdp: int) -> jax.sharding.Mesh:
    """A ("data", "fsdp") mesh over every device (of every process)."""
    count = jax.device_count()
    if count % fsdp:
        raise TrainError(f"train.fsdp={fsdp} does not divide the {count} devices")
    return jax.make_mesh((count // fsdp, fsdp), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto))


def shard_model(model: TitansLM, mesh: jax.sharding.Mesh) -> None:
    """Place the parameters on `mesh` by their logical names (in place)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, logical_shardings(state, mesh, SHARDING_RULES)))


def global_batch(local, mesh: jax.sharding.Mesh):
    """This process's rows (a pytree of arrays) -> arrays whose batch axis is split over every device."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, rows), local)


def initial_memories(model: TitansLM, batch_size: int, mesh: jax.sharding.Mesh) -> tuple[MemoryLayerState, ...]:
    """This process's `batch_size` rows of W^0 memory states, batch-sharded like `global_batch`."""
    return jax.tree.map(lambda a: global_batch(np.asarray(a), mesh) if np.ndim(a) else a,
                        model.memory_states(model.init_state(batch_size)))


class _Stop:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and returns."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _checkpoint_args(model, optimizer, iterator, rng, save: bool):
    """Save (or restore into) params, optimizer state, data iterator and RNG as one orbax Composite."""
    arrays = ocp.args.StandardSave if save else ocp.args.StandardRestore
    data = grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore
    return ocp.args.Composite(model=arrays(nnx.state(model)), optimizer=arrays(nnx.state(optimizer)),
                              data=data(iterator), rng=arrays({"key": jax.random.key_data(rng)}))


def _get(tree: dict, key: tuple[str, ...]):
    for k in key:
        tree = tree.get(k, {}) if isinstance(tree, dict) else None
    return tree


def _claim_run_dir(out: Path, run: RunConfig):
    """Check that `out` is free or holds this run, lock it (returns the open lock file; closing it
    releases the lock) and write run.json. Two processes training into one folder would interleave
    their checkpoints and metrics."""
    path = out / RUN_FILE
    if path.is_file():
        try:  # fill fields added since the run was made with their defaults
            saved = json.loads(json.dumps(load_run_config_dict(json.loads(path.read_text())).to_dict()))
        except (ValueError, KeyError, ConfigError) as err:
            raise TrainError(f"{path} is not readable as a run ({err}): use another --out") from None
        mine = json.loads(json.dumps(run.to_dict()))
        diff = [k for k in mine["model"] if saved.get("model", {}).get(k) != mine["model"][k]]
        if diff:
            k = diff[0]
            raise TrainError(f"{out} holds a run with a different model config (model.{k}: "
                             f"{saved['model'].get(k)!r} there, {mine['model'][k]!r} here): use another --out")
        # The data stream must be the same one for the resumed batches to continue it.
        stream = [("data",)] + [("train", k) for k in ("seed", "seq_len", "batch_size")]
        if any(_get(saved, key) != _get(mine, key) for key in stream):
            raise TrainError(f"{out} holds a run with other data, seed, seq_len or batch_size: use another --out")
    out.mkdir(parents=True, exist_ok=True)
    # One lock per job: the processes of a multi-host job share `out`, and process 0 holds it.
    lock = contextlib.nullcontext()
    if jax.process_index() == 0:
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
    return lock


def _restore_latest(manager, model, optimizer, iterator, rng, log) -> tuple[int, jax.Array]:
    """Restore the newest readable checkpoint (falling back to older ones, saying so); (step, rng).

    An unreadable step folder is moved aside to `unreadable-<step>` (kept, never deleted), so that
    the run can save that step again.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=_checkpoint_args(model, optimizer, iterator, rng, save=False))
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: fall back, never delete it
            folder = Path(manager.directory) / str(step)
            aside = folder.with_name(f"unreadable-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(aside)
            manager.reload()
            log(f"checkpoint step {step} is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                f"moved it to {aside.name} and trying the previous one")
            continue
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        rng = jax.random.wrap_key_data(jnp.asarray(restored["rng"]["key"]))
        log(f"resumed from step {step}")
        return step, rng
    return 0, rng


def evaluate(model, batches, tokenizer) -> dict:
    nats = sum(float(eval_step(model, jnp.asarray(b))) for b in batches)
    tokens = sum(b[:, 1:].size for b in batches)
    text_bytes = sum(tokenizer.count_bytes(b[:, 1:]) for b in batches)
    return {"valid_loss": nats / tokens, "valid_bpb": nats / math.log(2) / max(text_bytes, 1)}


def _trim_metrics(path: Path, step: int) -> None:
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


def _needle_mix(run: RunConfig, tokenizer) -> pipeline.NeedleMix | None:
    data = run.data
    if not data.needle_fraction and not data.recall_fraction:
        return None
    need = max(niah.fixed_size(t, tokenizer) for t in data.tasks()) + niah.MAX_NEW_TOKENS["uuid"]
    if data.needle_fraction and not need <= data.needle_min_len <= run.train.seq_len + 1:
        raise TrainError(f"data.needle_min_len={data.needle_min_len} must lie in [{need}, train.seq_len + 1 = "
                         f"{run.train.seq_len + 1}] (the task prompts and answers of {data.needle_tasks} need {need})")
    return pipeline.NeedleMix(data.needle_fraction, data.tasks(), data.needle_min_len, data.needle_curriculum_steps,
                              tokenizer, data.needle_answer_weight, data.recall_fraction, data.recall_max_gap)


def train(run: RunConfig, out: Path, *, steps: int | None = None, log: Callable[[str], None] = print,
          progress: bool = True) -> dict:
    """Train (or resume) into `out`; returns a summary with the last losses and the status."""
    _mark_absl_flags_parsed()
    out = Path(out)
    cfg = run.train
    steps = steps or cfg.steps
    tokenizer = get_tokenizer(run.data.tokenizer)
    if run.model.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"model.vocab_size={run.model.vocab_size} is smaller than the {tokenizer.name} tokenizer's "
                         f"{tokenizer.vocab_size}: raise model.vocab_size")
    needles = _needle_mix(run, tokenizer)
    init = _init_weights(run) if cfg.init_from else None  # checked before the run folder is touched
    with _claim_run_dir(out, run):
        return _train(run, out, steps, tokenizer, needles, init, log, progress)


def _train(run: RunConfig, out: Path, steps: int, tokenizer, needles, init, log, progress) -> dict:
    cfg = run.train
    train_texts, valid_texts = load_split(run.data, log)
    train_tokens = pipeline.pack(train_texts, tokenizer, seed=cfg.seed)
    valid_batches = pipeline.eval_batches(pipeline.pack(valid_texts, tokenizer, seed=None), seq_len=cfg.seq_len,
                                          batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
    dataset = pipeline.train_dataset(train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                     shard_index=jax.process_index(), shard_count=jax.process_count(),
                                     needles=needles)
    iterator = iter(dataset)

    mesh = make_mesh(cfg.fsdp)
    if cfg.batch_size % (jax.device_count() // jax.process_count()):
        raise TrainError(f"train.batch_size={cfg.batch_size} (per process) must be a multiple of the "
                         f"{jax.local_device_count()} local devices")
    model = TitansLM(run.model, rngs=nnx.Rngs(cfg.seed))
    shard_model(model, mesh)
    tx, schedule = make_optimizer(dataclasses.replace(cfg, steps=steps))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = jax.random.key(cfg.seed + 1)

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    manager = ocp.CheckpointManager((out / "checkpoints").absolute(), options=options)
    best = ocp.CheckpointManager((out / "best").absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m["valid_loss"], best_mode="min", create=True))
    start, rng = _restore_latest(manager, model, optimizer, iterator, rng, log)
    if not start and init is not None:
        nnx.update(model, init)
        shard_model(model, mesh)
        log(f"initialised from {cfg.init_from}")

    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)
    _trim_metrics(out / "metrics.jsonl", start)
    metrics_file = (out / "metrics.jsonl").open("a")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"train {run.model.variant}", unit="step", dynamic_ncols=True)

    def record(row: dict) -> None:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, row["step"])

    def save(step: int) -> None:
        manager.save(step, args=_checkpoint_args(model, optimizer, iterator, rng, save=True), force=True)

    status, last, tokens_per_step = "done", {}, cfg.batch_size * cfg.seq_len * jax.process_count()
    # State passing: every chain starts at W^0 (keep all False) on the first step of this process.
    memories, keep_rng = None, np.random.default_rng([cfg.seed, jax.process_index(), start])
    if cfg.state_passing:  # placeholders of the carry's shapes: the first step keeps none of them
        memories = initial_memories(model, cfg.batch_size, mesh)
    t_log, logged, step = time.perf_counter(), start, start
    with _Stop() as stop:
        try:
            for step in range(start + 1, steps + 1):
                with jax.set_mesh(mesh):  # the Pallas kernels map themselves over the batch under it
                    carry = None
                    if memories is not None:
                        keep = keep_rng.random(cfg.batch_size) < cfg.state_passing
                        carry = Carry(memories, global_batch(keep & (step > start + 1), mesh))
                    loss, grad_norm, gate_means, memories = train_step(model, optimizer, global_batch(next(iterator), mesh),
                                                                       carry)
                logging = step % cfg.log_every == 0 or step == steps
                evaluating = step % cfg.eval_every == 0 or step == steps
                saving = step % cfg.checkpoint_every == 0 or step == steps or stop.signal is not None
                if logging or evaluating or saving:  # never evaluate or save parameters after a NaN
                    loss = float(loss)
                    if not math.isfinite(loss):
                        good = manager.latest_step()
                        raise TrainError(f"loss is {loss} at step {step}; stopped without saving. Last good "
                                         f"checkpoint: {'step ' + str(good) if good else 'none'} in {out}")
                if logging:
                    now = time.perf_counter()
                    rate = tokens_per_step * (step - logged) / (now - t_log)
                    last = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                            "grad_norm": float(grad_norm), "tokens_per_s": round(rate, 1),
                            **{f"gate_{k}": float(v) for k, v in gate_means.items()}}
                    t_log, logged = now, step
                    record(last)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                if evaluating:
                    with jax.set_mesh(mesh):
                        result = evaluate(model, valid_batches, tokenizer)
                    record({"step": step, **result})
                    last.update(result)
                    if step not in best.all_steps():  # a resumed run may evaluate a step again
                        best.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(model))),
                                  metrics=result, force=True)
                if saving and step not in manager.all_steps():
                    save(step)
                if evaluating or saving:
                    t_log = time.perf_counter()  # tokens/s counts training steps only
                if stop.signal:
                    if step not in manager.all_steps():  # the signal came after this step's save check
                        save(step)
                    status = f"stopped by {stop.signal} at step {step} (saved)"
                    log(status)
                    break
        finally:
            manager.wait_until_finished()
            best.wait_until_finished()
            manager.close()
            best.close()
            metrics_file.close()
            writer.close()
            if bar is not None:
                bar.close()
    summary = {"status": status, "step": step, **last}
    if status == "done" and cfg.sample_tokens:
        rng, key = jax.random.split(rng)
        prompt = tokenizer.encode(cfg.sample_prompt)[None]
        new = generate(model, prompt, cfg.sample_tokens, key, temperature=0.8, top_p=0.95)
        summary["sample"] = cfg.sample_prompt + tokenizer.decode(new[0])
    return summary


def _init_weights(run: RunConfig) -> nnx.State:
    """The weights named by train.init_from: a run folder's latest checkpoint or an exported model."""
    source = run.train.init_from
    path = Path(source).expanduser()
    if not ((path / RUN_FILE).is_file() or (path / "config.json").is_file()):
        raise TrainError(f"train.init_from={source} is neither a run folder ({RUN_FILE}) nor an exported model "
                         "(config.json): pass the --out of scripts/train.py or of scripts/export.py")
    source_model, _ = load_model(**{"checkpoint" if (path / RUN_FILE).is_file() else "model_dir": path})
    mine, theirs = run.model.to_dict(), source_model.config.to_dict()
    diff = [k for k in mine if mine[k] != theirs.get(k)]
    if diff:
        raise TrainError(f"train.init_from={source} has another model config (model.{diff[0]}: {theirs.get(diff[0])!r} "
                         f"there, {mine[diff[0]]!r} here): initialise from a model of this config")
    return nnx.state(source_model)


def load_trained_model(run_dir: str | Path, which: str = "latest") -> tuple[TitansLM, RunConfig]:
    """The model of a run folder at its newest (`latest`) or lowest-held-out-loss (`best`) checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise TrainError(f"{run_dir} is not a run folder ({RUN_FILE} missing): pass the --out of scripts/train.py")
    run = load_run_config_dict(json.loads((run_dir / RUN_FILE).read_text()))
    model = TitansLM(run.model, rngs=nnx.Rngs(0))
    folder = (run_dir / ("best" if which == "best" else "checkpoints")).absolute()
    with ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            raise TrainError(f"{folder} holds no checkpoint yet")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(nnx.state(model))))
        except Exception as err:  # orbax raises several types for a tree that differs from the target
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainError(f"{folder}/{step} does not match the model of {run_dir / RUN_FILE}: {first}") from None
    nnx.update(model, restored["model"])
    return model, run


def load_model(model_dir: str | Path | None = None, checkpoint: str | Path | None = None,
               which: str = "latest") -> tuple[TitansLM, object]:
    """(model, tokenizer) from an exported folder (`model_dir`) or a run folder (`checkpoint`)."""
    if model_dir is not None:
        return TitansLM.from_pretrained(model_dir), get_tokenizer(pretrained.read_config(model_dir)["tokenizer"]["name"])
    model, run = load_trained_model(checkpoint, which)
    return model, get_tokenizer(run.data.tokenizer)
