"""The training loop: `train(run, out)` trains `run.model` on `run.data` for `run.train.steps` steps
(or `steps=`), writing the run folder `out` (`titans.train.run_dir`: run.json, metrics, TensorBoard,
checkpoints). Rerunning with the same `out` resumes from the newest readable checkpoint; the losses
after a resume equal those of an uninterrupted run to the last bit on CPU. SIGTERM / SIGINT save and
return. On several processes (`titans.train.hosts`) each feeds its rows of the global batch, process 0
writes the run's files, and a signal to any process stops all at the same step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.model import TitansLM
from titans.sampling import generate
from titans.train import hosts, run_dir
from titans.train.config import Diverged, RunConfig, TrainError
from titans.train.data import bpe, needles, pipeline, store
from titans.train.mesh import batch_sharding, global_batch, initial_memories, make_mesh, shard
from titans.train.steps import MemoryCarry, eval_step, evaluate, make_optimizer, train_step


def _mark_absl_flags_parsed() -> None:
    # grain reads absl flags in its workers; unparsed flags raise there (google/grain#1355).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _needle_mix(run: RunConfig, tokenizer) -> pipeline.NeedleMix | None:
    data = run.data
    if not data.needle_fraction and not data.recall_fraction:
        return None
    need = max(needles.fixed_size(t, tokenizer) for t in data.tasks()) + needles.MAX_NEW_TOKENS["uuid"]
    if data.needle_fraction and not need <= data.needle_min_len <= run.train.seq_len + 1:
        raise TrainError(f"data.needle_min_len={data.needle_min_len} must lie in [{need}, train.seq_len + 1 = "
                         f"{run.train.seq_len + 1}] (the task prompts and answers of {data.needle_tasks} need {need})")
    return pipeline.NeedleMix(data.needle_fraction, data.tasks(), data.needle_min_len, data.needle_curriculum_steps,
                              tokenizer, data.needle_answer_weight, data.recall_fraction, data.recall_max_gap)


class _Divergence(Exception):
    """A loss that was not finite (or spiked) at `step`."""

    def __init__(self, step: int, loss: float, why: str):
        super().__init__(f"loss is {loss} at step {step}" if why == "nan" else
                         f"loss spiked to {loss:.4g} at step {step} ({why})")
        self.step = step


class _LossWatch:
    """The losses of steps not yet looked at (device scalars: reading one waits for its step), read
    at the loop's sync points; a non-finite one, or a spike over `spike` x the median of the last 50
    finite ones, raises `_Divergence` naming the first such step."""

    def __init__(self, spike: float):
        self.spike, self.pending, self.recent = spike, [], collections.deque(maxlen=50)

    def add(self, step: int, loss) -> None:
        self.pending.append((step, loss))

    def check(self) -> None:
        pending, self.pending = self.pending, []
        for step, loss in pending:
            loss = float(loss)
            if not math.isfinite(loss):
                raise _Divergence(step, loss, "nan")
            if self.spike and len(self.recent) >= 10 and loss > self.spike * statistics.median(self.recent):
                raise _Divergence(step, loss, f"over train.loss_spike={self.spike:g} x the median of the last "
                                              f"{len(self.recent)} steps, {statistics.median(self.recent):.4g}")
            self.recent.append(loss)

    def reset(self) -> None:
        self.pending.clear()
        self.recent.clear()


def train(run: RunConfig, out: Path, *, steps: int | None = None, log: Callable[[str], None] = print,
          progress: bool = True) -> dict:
    """Train (or resume) into `out`; returns a summary with the last losses and the status
    (`"done"`, or `"stopped by SIGTERM at step N (saved)"` with `signal` set to the signal's name).

    Everything that can be checked is checked before `out` is touched: the step count, the
    tokenizer against the model, the corpus and the batches it gives, the devices, `init_from`.
    """
    _mark_absl_flags_parsed()
    out = Path(out)
    if not hosts.is_main():  # process 0 reports for all; errors still raise everywhere
        log = lambda line: None  # noqa: E731
    cfg = run.train
    steps = cfg.steps if steps is None else steps
    if steps < 1:
        raise TrainError(f"steps must be >= 1 (the total to train to, resumed steps included), got {steps}")
    tokenizer = bpe.resolve(run.data.tokenizer, log, **run.data.specials())
    if run.model.vocab_size < tokenizer.vocab_size:
        raise TrainError(f"model.vocab_size={run.model.vocab_size} is smaller than the {tokenizer.name} tokenizer's "
                         f"{tokenizer.vocab_size}: raise model.vocab_size (or set it to auto)")
    mix = _needle_mix(run, tokenizer)
    # Process 0 tokenizes the corpus first; the others then find its store (on a shared cache
    # folder) or make their own, instead of all tokenizing at once on the same cores.
    prepare = lambda: store.prepared(run.data.corpus, tokenizer, text_field=run.data.text_field, log=log)  # noqa: E731
    folder = prepare() if hosts.is_main() else None
    hosts.barrier("store")
    folder = folder or prepare()
    train_tokens, valid_tokens, index = store.open_store(folder, tokenizer)
    if index["max_id"] >= run.model.vocab_size:
        raise TrainError(f"{folder} holds token id {index['max_id']}, beyond model.vocab_size={run.model.vocab_size}: "
                         "raise model.vocab_size or prepare the store with this run's tokenizer")
    devices, local = jax.device_count(), jax.local_device_count()
    if cfg.batch_size % (devices * cfg.grad_accum):
        raise TrainError(f"train.batch_size={cfg.batch_size} (the global batch) must be a multiple of the {devices} "
                         f"devices x train.grad_accum={cfg.grad_accum}")
    # Evaluation runs a micro-batch's rows at a time (its activations are what fits).
    eval_size = cfg.batch_size // cfg.grad_accum
    valid_batches = pipeline.eval_batches(valid_tokens, seq_len=cfg.seq_len, batch_size=eval_size,
                                          max_batches=cfg.eval_batches)
    if not valid_batches:
        raise TrainError(f"the held-out documents of {run.data.corpus} fill no batch of {eval_size} x "
                         f"{cfg.seq_len + 1} tokens: add held-out text or lower train.batch_size / train.seq_len")
    batches = functools.partial(pipeline.train_dataset, train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                seed=cfg.seed, process=jax.process_index(), processes=jax.process_count(), mix=mix)
    batches()  # checks that the stream fills a batch
    mesh = make_mesh(cfg.fsdp)
    log(f"{jax.process_count()} process(es) x {local} {jax.devices()[0].platform} device(s), mesh "
        f"{dict(mesh.shape)}: batch {cfg.batch_size} = {cfg.batch_size // devices // cfg.grad_accum} rows per device x "
        f"{devices} device(s)" + (f" x {cfg.grad_accum} accumulated micro-batches" if cfg.grad_accum > 1 else ""))
    init = run_dir.initial_weights(run, log) if cfg.init_from else None
    with run_dir.claim(out, run, tokenizer):
        return _train(run, out, steps, tokenizer, batches, valid_batches, mesh, init, log, progress)


def _train(run: RunConfig, out: Path, steps: int, tokenizer, batches, valid_batches, mesh, init, log,
           progress) -> dict:
    cfg = run.train
    model = TitansLM(run.model, rngs=nnx.Rngs(cfg.seed))
    shard(model, mesh)
    tx, schedule = make_optimizer(dataclasses.replace(cfg, steps=steps))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    shard(optimizer, mesh)
    rng = jax.random.key(cfg.seed + 1)

    manager, best = run_dir.checkpoint_managers(out, cfg.keep_checkpoints)
    start, rng, next_batch = run_dir.restore_latest(manager, model, optimizer, rng, log)
    iterator = iter(batches(start=next_batch))
    if not start and init is not None:
        nnx.update(model, init)
        shard(model, mesh)
        log(f"initialised from {cfg.init_from}")

    from tensorboardX import SummaryWriter

    metrics_path = out / run_dir.METRICS_FILE
    writer = metrics_file = None
    main = hosts.is_main()  # process 0 writes the metrics, TensorBoard and the progress bar

    def open_logs(after: int) -> None:
        """(Re)open the metrics and TensorBoard files, dropping what was logged after step `after`."""
        nonlocal writer, metrics_file
        if not main:
            return
        for f in (writer, metrics_file):
            if f is not None:
                f.close()
        writer = SummaryWriter(str(out / "tb"), purge_step=after + 1 if after else None)
        run_dir.trim_metrics(metrics_path, after)
        metrics_file = metrics_path.open("a")

    open_logs(start)
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"train {run.model.variant}", unit="step", dynamic_ncols=True)

    def record(row: dict) -> None:
        if not main:
            return
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, row["step"])

    def save(step: int) -> None:
        manager.save(step, args=run_dir.checkpoint_args(model, optimizer, run_dir.position(rng, next_batch)),
                     force=True)

    def fresh_memories():
        # State passing: every chain starts at W^0 (keep all False) on a process's first step.
        return initial_memories(model, cfg.batch_size, mesh) if cfg.state_passing else None

    status, stopped_by, last, tokens_per_step = "done", None, {}, cfg.batch_size * cfg.seq_len
    # This process's rows of a global training batch and of an evaluation batch.
    eval_size = cfg.batch_size // cfg.grad_accum
    rows, eval_rows = (np.arange(n).reshape(jax.process_count(), -1)[jax.process_index()]
                       for n in (cfg.batch_size, eval_size))
    memories, keep_rng, first = fresh_memories(), np.random.default_rng([cfg.seed, start]), start
    with jax.set_mesh(mesh):  # several processes: compile the steps everywhere before the first runs
        rows_of = lambda n, dtype, *shape: jax.ShapeDtypeStruct((n, *shape), dtype, sharding=batch_sharding(mesh))
        batch = {"tokens": rows_of(cfg.batch_size, jnp.int32, cfg.seq_len + 1),
                 "weights": rows_of(cfg.batch_size, jnp.float32, cfg.seq_len)}
        carry = None if memories is None else MemoryCarry(memories, rows_of(cfg.batch_size, jnp.bool_))
        hosts.compile_together("train_step", train_step, model, optimizer, batch, 0.0, carry, accum=cfg.grad_accum)
        hosts.compile_together("eval_step", eval_step, model, rows_of(eval_size, jnp.int32, cfg.seq_len + 1))
    watch, rollbacks = _LossWatch(cfg.loss_spike), 0
    t_log, logged, step = time.perf_counter(), start, start
    with hosts.Stop() as stop:
        try:
            while step < steps:
                step += 1
                lr = float(schedule(step - 1))
                with jax.set_mesh(mesh):  # the Pallas kernels map themselves over the batch under it
                    carry = None
                    if memories is not None:
                        keep = keep_rng.random(cfg.batch_size)[rows] < cfg.state_passing
                        carry = MemoryCarry(memories, global_batch(keep & (step > first + 1), mesh))
                    loss, grad_norm, gate_means, memories = train_step(
                        model, optimizer, global_batch(next(iterator), mesh), lr, carry, accum=cfg.grad_accum)
                next_batch += 1
                watch.add(step, loss)
                stopping = stop.reached(step)
                logging = step % cfg.log_every == 0 or step == steps
                evaluating = step % cfg.eval_every == 0 or step == steps
                saving = step % cfg.checkpoint_every == 0 or step == steps or stopping
                if logging or evaluating or saving:  # never log, evaluate or save after a divergence
                    try:
                        watch.check()
                    except _Divergence as div:
                        good = _set_aside_diverged(manager, div.step, log)
                        if cfg.on_divergence == "stop" or rollbacks == cfg.max_rollbacks or good is None:
                            why = ("train.on_divergence=stop" if cfg.on_divergence == "stop" else
                                   "no good checkpoint to roll back to" if good is None else
                                   f"train.max_rollbacks={cfg.max_rollbacks} reached")
                            raise Diverged(f"{div}; stopped ({why}). Last good checkpoint: "
                                             f"{'step ' + str(good) if good else 'none'} in {out}: resume with a "
                                             "lower train.lr, or set train.on_divergence=rollback") from None
                        rollbacks += 1
                        step, rng, next_batch = run_dir.restore_latest(manager, model, optimizer, rng, log)
                        next_batch += div.step - step  # skip the batches that led to the divergence
                        iterator = iter(batches(start=next_batch))
                        log(f"{div}: rolled back to step {step} and skipped the {div.step - step} batches after "
                            f"it (rollback {rollbacks} of at most {cfg.max_rollbacks})")
                        open_logs(step)
                        record({"step": step, "rollback_from": div.step, "skipped_batches": div.step - step})
                        memories, first, t_log, logged = fresh_memories(), step, time.perf_counter(), step
                        watch.reset()
                        if bar is not None:
                            bar.n = step
                            bar.refresh()
                        continue
                    loss = float(loss)
                if logging:
                    now = time.perf_counter()
                    rate = tokens_per_step * (step - logged) / (now - t_log)
                    last = {"step": step, "loss": loss, "lr": lr,
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
                        put = lambda b: global_batch(b[eval_rows], mesh)  # noqa: E731
                        result = evaluate(model, valid_batches, tokenizer, put=put)
                    record({"step": step, **result})
                    last.update(result)
                    if step not in best.all_steps():  # a resumed run may evaluate a step again
                        best.save(step, args=run_dir.model_only_args(model), metrics=result, force=True)
                if saving and step not in manager.all_steps():
                    save(step)
                if evaluating or saving:
                    t_log = time.perf_counter()  # tokens/s counts training steps only
                if stopping:
                    stopped_by, status = stop.signal, f"stopped by {stop.signal} at step {step} (saved)"
                    log(status)
                    break
        finally:
            manager.wait_until_finished()
            best.wait_until_finished()
            manager.close()
            best.close()
            for f in (metrics_file, writer):
                if f is not None:  # process 0's
                    f.close()
            if bar is not None:
                bar.close()
    summary = {"status": status, "step": step, **({"signal": stopped_by} if stopped_by else {}),
               **({"rollbacks": rollbacks} if rollbacks else {}), **last}
    if status == "done" and cfg.sample_tokens:
        rng, key = jax.random.split(rng)
        if jax.process_count() > 1:  # process 0 samples alone, from a copy of the weights on its host
            graphdef, state = nnx.split(model)
            model = nnx.merge(graphdef, hosts.host_copy(state))
        if main:
            prompt = tokenizer.encode(cfg.sample_prompt)[None]
            new = generate(model, prompt, cfg.sample_tokens, key, temperature=0.8, top_p=0.95)
            summary["sample"] = cfg.sample_prompt + tokenizer.decode(new[0])
    return summary


def _set_aside_diverged(manager, step: int, log) -> int | None:
    """After a divergence at `step`: set aside the checkpoints from `step - 1` on (the parameters the
    diverging step started from, and anything later); returns the newest checkpoint left, which a
    finite loss has confirmed, or None."""
    for saved in sorted(s for s in manager.all_steps() if s >= step - 1):
        log(f"checkpoint step {saved} led to the divergence at step {step}: moved it to "
            f"{run_dir.set_aside(manager, saved, 'diverged')}")
    return manager.latest_step()
