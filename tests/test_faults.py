"""What a new user's mistakes and a diverging run do: every bad input to the command lines ends in
one line naming the problem, a non-zero exit, no traceback, and nothing written or changed on disk
(the folder trees are compared before and after); a corrupt checkpoint falls back; a diverging run
never keeps the checkpoint that led to it, stops or rolls back, and a resume trains on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.scripts import run_script
from titans.train.config import TrainError, load_run_config
from titans.train.data import corpus
from titans.train.trainer import train

# One worker runs this module, so its fixtures (trained runs) are built once.
pytestmark = pytest.mark.xdist_group("faults")

WORDS = "the memory writes what surprises it and forgets what it no longer needs while attention reads".split()
FIELDS = dict(seq_len=32, batch_size=2, log_every=1, eval_every=4, eval_batches=2, checkpoint_every=2,
              sample_tokens=0, warmup_steps=2)


def settings(corpus: Path, **train) -> list[str]:
    return [f"data.corpus={corpus}"] + [f"train.{k}={v}" for k, v in (FIELDS | train).items()]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A corpus, a trained run folder (checkpoints at steps 2 and 4) and its export, made once."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("valid", 3)):
        (root / "corpus" / split).mkdir(parents=True)
        for i in range(count):
            (root / "corpus" / split / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=150)) + ".\n")
    train(load_run_config("tiny", settings(root / "corpus")), root / "run", steps=4, progress=False,
          log=lambda s: None)
    code, _, err = run_script("export", "--checkpoint", str(root / "run"), "--out", str(root / "export"))
    assert code == 0, err
    return root


def damaged(world: Path, name: str, how) -> Path:
    """A copy of the export whose model.safetensors (or config.json) `how` rewrites."""
    folder = world / name
    if not folder.exists():
        shutil.copytree(world / "export", folder)
        how(folder)
    return folder


def truncate(path: Path, keep: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


CASES = {
    # train.py: the run folder must not appear when the run cannot start
    "missing corpus": ("train", ["--set", "data.corpus={world}/nope"], "does not exist"),
    "empty corpus": ("train", ["--set", "data.corpus={world}/empty"], "no training documents"),
    "one-document corpus": ("train", ["--set", "data.corpus={world}/single"], "holds one document"),
    "not UTF-8": ("train", ["--set", "data.corpus={world}/latin1"], "is not UTF-8"),
    "bad jsonl": ("train", ["--set", "data.corpus={world}/badjsonl"], "bad.jsonl:2"),
    "negative steps": ("train", ["--steps", "-5"], "steps must be >= 1"),
    "zero steps": ("train", ["--steps", "0"], "steps must be >= 1"),
    "unknown key": ("train", ["--set", "model.bogus=1"], "unknown key model.bogus"),
    "old memory key": ("train", ["--set", "model.chunk_size=8"], "model.chunk_size is now model.memory.chunk_size"),
    "unknown preset": ("train", ["--config", "huge"], "unknown preset 'huge'"),
    "bad divergence policy": ("train", ["--set", "train.on_divergence=maybe"], "train.on_divergence must be"),
    "batch larger than the held-out text": ("train", ["--set", "train.batch_size=4096"], "fill no batch of 4096"),
    "batch larger than the training text": ("train", ["--set", "train.batch_size=64", "--set", "train.eval_batches=1",
                                                      "--set", "data.corpus={world}/smalltrain"], "fewer than batch_size"),
    "not a number": ("train", ["--steps", "ten"], "argument --steps: invalid int value: 'ten'", 2),
    "batch not split by grad_accum": ("train", ["--set", "train.grad_accum=3"],
                                      "train.batch_size=2 (the global batch) must be a multiple of the 1 devices x "
                                      "train.grad_accum=3"),
    "zero grad_accum": ("train", ["--set", "train.grad_accum=0"], "train.grad_accum"),
    "init_from nowhere": ("train", ["--set", "train.init_from={world}/nope"], "is neither a run folder"),
    "store missing a shard": ("train", ["--set", "data.corpus={world}/store-missing"], "is missing: the store is incomplete"),
    "store shard cut short": ("train", ["--set", "data.corpus={world}/store-short"], "the store is damaged"),
    "store of another tokenizer": ("train", ["--set", "data.corpus={world}/store-bpe"], "was tokenized with"),
    "store ids beyond the model": ("train", ["--set", "data.corpus={world}/store-range"],
                                   "holds token id 5000, beyond model.vocab_size=260"),
    "tokenizer larger than the model": ("train", ["--set", "data.tokenizer={world}/bpe"],
                                        "model.vocab_size=260 is smaller than the"),
    "no such tokenizer": ("train", ["--set", "data.tokenizer={world}/nope"], "data.tokenizer takes byte"),
    "prepare into a folder that exists": ("prepare_data", ["--corpus", "{world}/corpus", "--out", "{world}/store"],
                                          "already exists"),
    "prepare a missing corpus": ("prepare_data", ["--corpus", "{world}/nope", "--out", "{world}/new"], "does not exist"),
    "a vocabulary below the bytes": ("train_tokenizer", ["--corpus", "{world}/corpus/train", "--vocab-size", "10",
                                                         "--out", "{world}/tok"], "--vocab-size must be at least 258"),
    "another model in the run folder": ("train", ["--out", "{world}/run", "--set", "model.window=8"],
                                        "different model config (model.window"),
    # export.py
    "export of no run": ("export", ["--checkpoint", "{world}/corpus", "--out", "{world}/out"], "is not a run folder"),
    "export over a folder": ("export", ["--checkpoint", "{world}/run", "--out", "{world}/export"], "already exists"),
    # generate.py: arguments are checked before a model is loaded (the model path does not exist)
    "negative temperature": ("generate", ["--model", "{world}/nope", "--temperature", "-1"], "temperature must be >= 0"),
    "top-p above 1": ("generate", ["--model", "{world}/nope", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    "top-p 0": ("generate", ["--model", "{world}/nope", "--top-p", "0"], "top_p must be in (0, 1]"),
    "negative top-k": ("generate", ["--model", "{world}/nope", "--top-k", "-3"], "top_k must be an int >= 0"),
    "negative token count": ("generate", ["--model", "{world}/nope", "--max-new-tokens", "-5"],
                             "--max-new-tokens must be >= 0"),
    "empty prompt": ("generate", ["--model", "{world}/nope", "--prompt", ""], "--prompt must not be empty"),
    "no model": ("generate", ["--model", "{world}/nope"], "is neither a run folder"),
    "truncated weights": ("generate", ["--model", "{world}/half"], "is not a readable safetensors file"),
    "random weights file": ("generate", ["--model", "{world}/noise"], "is not a readable safetensors file"),
    "weights tail cut": ("generate", ["--model", "{world}/tail"], "is not a readable safetensors file"),
    "config not JSON": ("generate", ["--model", "{world}/badconfig"], "is not valid JSON"),
    "no readable checkpoint": ("generate", ["--checkpoint", "{world}/allbad"], "holds no readable checkpoint"),
    "unknown option": ("generate", ["--checkpoint", "{world}/run", "--set", "model.window=8"],
                       "unrecognized arguments: --set model.window=8", 2),
    "set without a preset": ("niah", ["--checkpoint", "{world}/run", "--set", "model.window=8"], "--set changes a preset"),
    # niah.py and the probes
    "unknown task": ("niah", ["--preset", "tiny", "--tasks", "nope"], "unknown task 'nope'"),
    "length below the prompt": ("niah", ["--preset", "tiny", "--lengths", "100"], "length 100 is below"),
    "depth outside [0, 1]": ("niah", ["--preset", "tiny", "--depths", "0.5,1.5"], "depths must lie in [0, 1]"),
    "no samples": ("niah", ["--preset", "tiny", "--samples", "0"], "samples >= 1"),
    "bad length": ("forget_probe", ["--checkpoint", "{world}/run", "--lengths", "4Q"], "is not a positive count"),
    "probe of no run": ("forget_probe", ["--checkpoint", "{world}/nope"], "is neither a run folder"),
    "short recall rows": ("recall_probe", ["--gap", "300", "--seq-len", "64"], "holds less than two episodes"),
}


def _prepare(world: Path) -> None:
    """The bad corpora and damaged model folders the cases name."""
    for name in ("empty/train", "empty/valid", "single", "latin1", "badjsonl", "smalltrain/train", "smalltrain/valid"):
        (world / name).mkdir(parents=True, exist_ok=True)
    (world / "smalltrain" / "train" / "a.txt").write_text("a short training text. " * 20)
    (world / "smalltrain" / "valid" / "a.txt").write_text("a long held-out text. " * 2000)
    (world / "single" / "only.txt").write_text("one document is all there is. " * 50)
    (world / "latin1" / "a.txt").write_text("fine text. " * 50)
    (world / "latin1" / "b.txt").write_bytes("caf\xe9 au lait. ".encode("latin-1") * 50)
    (world / "badjsonl" / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    weights = "model.safetensors"
    damaged(world, "half", lambda f: truncate(f / weights, 0.5))
    damaged(world, "noise", lambda f: (f / weights).write_bytes(os.urandom(4096)))
    damaged(world, "tail", lambda f: truncate(f / weights, 0.999))
    damaged(world, "badconfig", lambda f: (f / "config.json").write_text('{"format_version": 1, "model": {'))
    if not (world / "store").exists():
        from titans.tokenizer import ByteTokenizer, load_tokenizer
        from titans.train.data import bpe, store

        store.prepare(world / "corpus", ByteTokenizer(), world / "store", log=lambda s: None)
        for name, damage in (("store-missing", lambda f: (f / "train-00000.bin").unlink()),
                             ("store-short", lambda f: truncate(f / "train-00000.bin", 0.9)),
                             ("store-range", lambda f: (f / "index.json").write_text(
                                 (f / "index.json").read_text().replace('"max_id": ', '"max_id": 5000, "was": ')))):
            shutil.copytree(world / "store", world / name)
            damage(world / name)
        bpe.train_bpe((t for _, t in corpus.iter_documents(world / "corpus" / "train")), 300, world / "bpe")
        store.prepare(world / "corpus", load_tokenizer(world / "bpe"), world / "store-bpe", log=lambda s: None)
    if not (world / "allbad").exists():
        shutil.copytree(world / "run", world / "allbad")
        for path in (world / "allbad" / "checkpoints").rglob("*"):
            if path.is_file() and path.stat().st_size:
                truncate(path, 0.5)


LAUNCHES = {  # the distributed runtime's variables, checked before JAX is asked to start it
    "no process count": ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID not"),
    "no process id": ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID not"),
    "process id out of range": ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
                                 "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must lie in [0, JAX_NUM_PROCESSES=2)"),
    "process count not a number": ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two",
                                    "JAX_PROCESS_ID": "0"}, "must be integers"),
}


@pytest.mark.parametrize("case", list(LAUNCHES))
def test_bad_launch_is_one_line(world, tmp_path, monkeypatch, case):
    env, message = LAUNCHES[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_script("train", "--config", "tiny", "--out", str(tmp_path / "run"))
    assert code == 1 and err.startswith("train: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, case):
    _prepare(world)
    script, args, message, *status = CASES[case]  # status 2: argparse's usage errors
    args = [a.format(world=world) for a in args]
    if script == "train":
        args = ["--config", "tiny", "--no-progress"] + [a for o in settings(world / "corpus") for a in ("--set", o)] + args
        if "--out" not in args:
            args += ["--out", str(tmp_path / "run")]
    before = tree(world)
    code, _, err = run_script(script, *args)
    assert code == (status or [1])[0] and err.startswith(f"{script}: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert tree(world) == before
    assert not (tmp_path / "run").exists()


def test_a_corrupt_newest_checkpoint_falls_back_when_loading(world):
    """generate --checkpoint on a run whose newest checkpoint is unreadable uses the previous one,
    says so, and leaves the folder as it was."""
    broken = world / "newest-bad"
    if not broken.exists():
        shutil.copytree(world / "run", broken)
        for path in (broken / "checkpoints" / "4").rglob("*"):
            if path.is_file() and path.stat().st_size:
                truncate(path, 0.5)
    before = tree(broken)
    code, out, err = run_script("generate", "--checkpoint", str(broken), "--max-new-tokens", "4", "--prompt", "the")
    assert code == 0 and out.startswith("the"), err
    assert err.startswith(f"checkpoint {broken}/checkpoints/4 is unreadable (") and "; using step 2" in err, err
    assert tree(broken) == before


def test_divergence_stops_sets_aside_the_poisoned_checkpoint_and_resumes(world, tmp_path):
    """A learning rate of 1e6 with a checkpoint every step: the loss goes NaN at some step t; the
    checkpoint of step t - 1 (whose parameters gave that loss) is set aside, the message names the
    last good one, and a resume at a sane rate trains on from it with finite losses."""
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"^loss is nan at step (\d+); stopped \(train.on_divergence=stop\). "
                                         r"Last good checkpoint: step (\d+) in .*: resume with a lower train.lr") as err:
        train(load_run_config("tiny", settings(world / "corpus", lr=1e6, warmup_steps=10, checkpoint_every=1)), out,
              steps=40, progress=False, log=lambda s: None)
    t, good = (int(x) for x in __import__("re").findall(r"step (\d+)", str(err.value))[:2])
    assert good == t - 2
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert str(t - 1) not in names and any(n.startswith(f"diverged-{t - 1}-") for n in names), names
    assert max(int(n) for n in names if n.isdigit()) == good
    summary = train(load_run_config("tiny", settings(world / "corpus", warmup_steps=10, checkpoint_every=1)), out,
                    steps=t + 4, progress=False, log=lambda s: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["loss"] for r in rows if "loss" in r and r["step"] > good]
    assert summary["status"] == "done" and len(resumed) == t + 4 - good and all(np.isfinite(resumed))


def test_rollback_restores_the_last_good_checkpoint_and_skips_the_batches(world, tmp_path, monkeypatch):
    """on_divergence=rollback: a NaN loss at step 7 (injected into the real step's output) sets aside
    checkpoint 6, restores checkpoint 4, skips the batches of steps 5-7, and trains on to the end;
    a second divergence past max_rollbacks=1 stops."""
    from titans.train import trainer

    real, calls = trainer.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        loss, *rest = real(*args, **kwargs)
        return (float("nan") if len(calls) in nan_at else loss, *rest)

    monkeypatch.setattr(trainer, "train_step", step)
    nan_at = {7}
    messages = []
    run = load_run_config("tiny", settings(world / "corpus", on_divergence="rollback", max_rollbacks=1))
    summary = train(run, tmp_path / "run", steps=10, progress=False, log=messages.append)
    assert summary["status"] == "done" and summary["step"] == 10 and summary["rollbacks"] == 1
    assert any("rolled back to step 4 and skipped the 3 batches" in m for m in messages), messages
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert any(n.startswith("diverged-6-") for n in names), names
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))  # steps 5-7 logged once, after it
    assert {"step": 4, "rollback_from": 7, "skipped_batches": 3} in rows

    calls.clear()
    nan_at = {7, 10}  # the second divergence is one too many
    with pytest.raises(TrainError, match=r"loss is nan at step \d+; stopped \(train.max_rollbacks=1 reached\)"):
        train(run, tmp_path / "again", steps=12, progress=False, log=lambda s: None)
