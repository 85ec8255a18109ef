"""Training: the data pipeline is deterministic and splits without overlap; a resume after SIGTERM
gives bit-identical losses; a partial or corrupt checkpoint falls back to the previous one; bad runs
fail with one line and overwrite nothing. Tiny preset on a text made here."""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.scripts import logged_losses as losses
from tests.scripts import run_script
from titans.config import _FLAT_MEMORY_KEYS
from titans.loading import restore_trained
from titans.tokenizer import ByteTokenizer
from titans.train.config import TrainError, load_run_config
from titans.train.data import corpus, pipeline
from titans.train.trainer import train

# One worker runs this module, so its fixtures (trained runs) are built once.
pytestmark = pytest.mark.xdist_group("train")

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24  # long enough (8 checkpoints) that the signal, sent as soon as 6 steps are logged, lands mid-run


def overrides(text_corpus: Path, **train) -> list[str]:
    fields = dict(seq_len=32, batch_size=2, log_every=1, eval_every=4, eval_batches=2, checkpoint_every=3,
                  sample_tokens=0, warmup_steps=2) | train
    return [f"data.corpus={text_corpus}", "model.variant=mac"] + [f"train.{k}={v}" for k, v in fields.items()]


def test_pipeline_is_deterministic_and_sharded(text_corpus):
    tok = ByteTokenizer()
    texts = [t for _, t in corpus.read_documents(text_corpus / "train")]
    assert len(texts) == 36  # 30 .txt + 6 .jsonl lines
    tokens = pipeline.pack(texts, tok, seed=3)
    assert np.array_equal(tokens, pipeline.pack(texts, tok, seed=3))
    assert not np.array_equal(tokens, pipeline.pack(texts, tok, seed=4))
    assert np.sum(tokens == tok.eos) == len(texts) and tok.decode(tokens).count(".") >= 30

    def batches(seed, process=0, processes=1, n=6, start=0, batch_size=4):
        it = iter(pipeline.train_dataset(tokens, seq_len=16, batch_size=batch_size, seed=seed, start=start,
                                         process=process, processes=processes))
        rows = [next(it) for _ in range(n)]
        assert all(np.array_equal(r["weights"], np.ones((batch_size // processes, 16))) for r in rows)
        return [r["tokens"] for r in rows]

    a, b = batches(0), batches(0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, batches(1)))
    # Batch i is the same from index 0 or from a resume at i; two processes' rows make it up.
    assert all(np.array_equal(x, y) for x, y in zip(a[2:], batches(0, start=2, n=4)))
    halves = [batches(0, p, 2) for p in (0, 1)]
    assert all(np.array_equal(np.concatenate([x, y]), z) for x, y, z in zip(*halves, a))
    # The first epoch's batches hold each window at most once.
    every = pipeline.windows(tokens, 16)
    seen = collections.Counter(bytes(w) for b in batches(0, n=len(every) // 4) for w in b)
    assert not seen - collections.Counter(bytes(every[i]) for i in range(len(every)))
    # A flat folder is split by document: every document in exactly one side.
    flat = [t for _, t in corpus.read_documents(text_corpus / "train")]
    train_texts, valid_texts = corpus.load_split(str(text_corpus / "train"), log=print)
    assert sorted(train_texts + valid_texts) == sorted(flat) and len(valid_texts) == 2
    assert not set(train_texts) & set(valid_texts)


def test_weighted_loss():
    """Weights of ones give the plain mean; a one-hot weight gives that token's cross-entropy."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import titans
    from titans.train.steps import next_token_loss

    model = titans.TitansLM(titans.load_preset("tiny", variant="swa"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 17)), jnp.int32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(model(tokens[:, :-1])), tokens[:, 1:, None], axis=-1)[..., 0]
    mean, total = next_token_loss(model, tokens)
    assert np.isclose(float(mean), float(jnp.mean(nll)), rtol=1e-6) and np.isclose(float(total), float(jnp.sum(nll)))
    assert np.isclose(float(next_token_loss(model, tokens, jnp.ones((2, 16)))[0]), float(mean), rtol=1e-6)
    one_hot = jnp.zeros((2, 16)).at[1, 5].set(3.0)
    assert np.isclose(float(next_token_loss(model, tokens, one_hot)[0]), float(nll[1, 5]), rtol=1e-6)
    assert float(nll[1, 5]) != pytest.approx(float(mean), rel=1e-3)


def test_read_documents_rejects_bad_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(corpus.CorpusError, match="a.jsonl:2"):
        corpus.read_documents(tmp_path)


@pytest.fixture(scope="module")
def uninterrupted(text_corpus, tmp_path_factory) -> dict[int, float]:
    """The losses of a run that nothing stops (and a check of its logged gate means)."""
    run = load_run_config("tiny", overrides(text_corpus))
    whole = tmp_path_factory.mktemp("whole")
    train(run, whole, steps=STEPS, progress=False, log=lambda s: None)
    want = losses(whole)
    assert sorted(want) == list(range(1, STEPS + 1))
    logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    gates = [(r["gate_theta"], r["gate_eta"], r["gate_alpha"]) for r in logged if "loss" in r]
    assert len(gates) == STEPS and len(set(gates)) > 1  # the gates are logged, and they train
    assert all(0 < theta < run.model.memory.max_lr and 0 < eta < 1 and 0 < alpha < 1 for theta, eta, alpha in gates)
    return want


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_resume_after_a_signal_is_bit_exact(text_corpus, uninterrupted, tmp_path, sig):
    """SIGTERM saves and exits 143 (128 + SIGTERM: stopped, not done); kill -9 with a save every step (so one is usually in flight) loses
    at most the steps since the last complete checkpoint. Either way the resumed run's losses equal
    the uninterrupted run's to the bit."""
    extra = ["train.checkpoint_every=1"] if sig == signal.SIGKILL else []
    run = load_run_config("tiny", overrides(text_corpus) + extra)
    cut = tmp_path / "cut"
    # The child on this process's device count: scripts/train.py would split the rows over every
    # core, and a resume on other devices is the same run only up to summation order.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/titans-jax/jax-cache")),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={jax.device_count()}")
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "tiny", "--out", str(cut), "--steps",
           str(STEPS), "--no-progress"] + [a for o in overrides(text_corpus) + extra for a in ("--set", o)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if (cut / "metrics.jsonl").is_file() and len(losses(cut)) >= 6:
            child.send_signal(sig)
            break
        time.sleep(0.05)
    stdout, stderr = child.communicate(timeout=300)
    if sig == signal.SIGTERM:
        assert child.returncode == 128 + signal.SIGTERM, stderr[-2000:]  # saved, and not "done"
        assert "stopped by SIGTERM" in stdout + stderr
    else:
        assert child.returncode == -signal.SIGKILL, stderr[-2000:]
    stopped_at = max(losses(cut))
    assert stopped_at < STEPS, "the child finished before the signal: make the run longer"

    summary = train(run, cut, steps=STEPS, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and summary["step"] == STEPS
    got = losses(cut)
    for step in range(1, STEPS + 1):
        assert got[step] == uninterrupted[step], (step, got[step], uninterrupted[step])


def test_partial_and_corrupt_checkpoints_fall_back(text_corpus, tmp_path):
    run = load_run_config("tiny", overrides(text_corpus))
    out = tmp_path / "run"
    train(run, out, steps=6, progress=False, log=lambda s: None)  # checkpoints at 3 and 6
    want = losses(out)
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["3", "6"]
    # A save killed mid-way leaves only a tmp folder: ignored.
    (ckpt / "9.orbax-checkpoint-tmp").mkdir()
    # The newest good one is corrupted: every file in it truncated.
    for path in (ckpt / "6").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    messages = []
    summary = train(run, out, steps=6, progress=False, log=messages.append)
    assert any("step 6 is unreadable" in m for m in messages), messages
    assert any("resumed from step 3" in m for m in messages), messages
    assert summary["step"] == 6
    got = losses(out)  # steps 4-6 were trained again from step 3: same losses
    assert all(got[s] == want[s] for s in (4, 5, 6))


def test_bad_runs_fail_with_one_line_and_keep_the_run(text_corpus, tmp_path):
    out = tmp_path / "run"
    train(load_run_config("tiny", overrides(text_corpus)), out, steps=3, progress=False, log=lambda s: None)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = load_run_config("tiny", overrides(text_corpus) + ["model.window=8"])
    with pytest.raises(TrainError, match=r"different model config \(model.window") as err:
        train(other, out, steps=3, progress=False, log=lambda s: None)
    assert "\n" not in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # Another process training into the same folder (it holds the lock): refused, nothing touched.
    with open(out / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TrainError, match="another process is training into"):
            train(load_run_config("tiny", overrides(text_corpus)), out, steps=6, progress=False, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "valid").mkdir()
    with pytest.raises(corpus.CorpusError, match="no training documents"):
        train(load_run_config("tiny", [f"data.corpus={empty}"]), tmp_path / "r2", steps=1, progress=False)
    with pytest.raises(corpus.CorpusError, match="does not exist"):
        train(load_run_config("tiny", [f"data.corpus={tmp_path / 'nope'}"]), tmp_path / "r3", steps=1, progress=False)


def test_script_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "tiny", "--out",
                           str(tmp_path / "r"), "--set", "model.bogus=1"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["train: unknown key model.bogus (known keys: " +
                                                proc.stderr.split("known keys: ")[1].strip()]
    assert not (tmp_path / "r").exists()


def test_export_load_generate(text_corpus, tmp_path):
    import jax

    import titans
    from titans.pretrained import save_pretrained

    run_dir = tmp_path / "run"
    # half the rows dense recall episodes: the trainer's weighted path end to end
    recall = ["data.recall_fraction=0.5", "data.recall_max_gap=4"]
    train(load_run_config("tiny", overrides(text_corpus) + recall), run_dir, steps=3, progress=False, log=lambda s: None)
    trained, _ = restore_trained(run_dir)
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 256)
    want = np.asarray(trained(tokens))

    code, _, err = run_script("export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "f32"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "f32").iterdir()) == ["config.json", "model.safetensors"]
    loaded, tokenizer = titans.load(tmp_path / "f32")
    assert tokenizer.name == "byte"
    assert np.array_equal(np.asarray(loaded(tokens)), want)  # float32 export: identical logits

    # An export (and a run folder) written before the memory settings were nested still loads.
    flat = json.loads((tmp_path / "f32" / "config.json").read_text())
    # Only the keys of that time: the ablation switches (momentum, decay, ...) came later, at their defaults.
    legacy = {name: key for key, name in _FLAT_MEMORY_KEYS.items()}
    flat["model"].update({legacy[k]: v for k, v in flat["model"].pop("memory").items() if k in legacy})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_bytes((tmp_path / "f32" / "model.safetensors").read_bytes())
    (tmp_path / "old" / "config.json").write_text(json.dumps(flat))
    assert np.array_equal(np.asarray(titans.load(tmp_path / "old")[0](tokens)), want)

    save_pretrained(trained, tmp_path / "bf16", dtype="bfloat16")
    half = titans.TitansLM.from_pretrained(tmp_path / "bf16")
    assert np.max(np.abs(np.asarray(half(tokens)) - want)) < 0.05 * np.max(np.abs(want))
    with pytest.raises(FileExistsError, match="already exists"):
        save_pretrained(trained, tmp_path / "bf16")

    code, out, err = run_script("generate", "--model", str(tmp_path / "f32"), "--prompt", "the memory",
                                "--max-new-tokens", "12")
    assert code == 0, err
    assert out.startswith("the memory") and "tokens/s" in err

    # train.init_from: a run folder or an exported model seeds a new run (step 1's learning rate is
    # 0 in the warmup, so its weights are exactly the source's); another model config is refused
    # before the new run folder exists.
    from flax import nnx

    for source in (run_dir, tmp_path / "f32"):
        seeded = tmp_path / f"seeded-{source.name}"
        train(load_run_config("tiny", overrides(text_corpus) + [f"train.init_from={source}"]), seeded, steps=1,
              progress=False, log=lambda s: None)
        got = nnx.to_flat_state(nnx.state(titans.load(seeded)[0], nnx.Param))
        want = dict(nnx.to_flat_state(nnx.state(trained, nnx.Param)))
        assert all(np.array_equal(np.asarray(v[...]), np.asarray(want[k][...])) for k, v in got)
    other = load_run_config("tiny", overrides(text_corpus) + ["model.variant=swa", f"train.init_from={run_dir}"])
    with pytest.raises(TrainError, match=r"has another model config \(model.variant: 'mac' there, 'swa' here\)"):
        train(other, tmp_path / "never", steps=1, progress=False, log=lambda s: None)
    with pytest.raises(TrainError, match="is neither a run folder"):
        train(load_run_config("tiny", overrides(text_corpus) + [f"train.init_from={tmp_path}"]), tmp_path / "never",
              steps=1, progress=False, log=lambda s: None)
    assert not (tmp_path / "never").exists()

    # A run folder whose run.json has the old flat memory keys resumes (same config, same stream).
    run_json = json.loads((run_dir / "run.json").read_text())
    run_json["model"] = flat["model"]
    (run_dir / "run.json").write_text(json.dumps(run_json))
    summary = train(load_run_config("tiny", overrides(text_corpus) + recall), run_dir, steps=4, progress=False,
                    log=lambda s: None)
    assert summary["step"] == 4 and sorted(losses(run_dir)) == [1, 2, 3, 4]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_corpus, tmp_path):
    out = tmp_path / "run"
    good = load_run_config("tiny", overrides(text_corpus))
    train(good, out, steps=3, progress=False, log=lambda s: None)  # checkpoint at step 3
    exploding = load_run_config("tiny", overrides(text_corpus, lr=1e9, warmup_steps=0))
    with pytest.raises(TrainError, match=r"loss is (nan|inf) at step \d+; stopped \(train.on_divergence=stop\). Last good "
                                         r"checkpoint: step 3"):
        train(exploding, out, steps=40, progress=False, log=lambda s: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == "3"
    # Steps that save are checked even when they do not log: no NaN parameters reach a checkpoint.
    rarely_logged = load_run_config("tiny", overrides(text_corpus, lr=1e9, warmup_steps=0, log_every=1000,
                                                      eval_every=1000, checkpoint_every=1))
    with pytest.raises(TrainError, match=r"loss is (nan|inf) at step \d+; stopped \(train.on_divergence=stop\)"):
        train(rarely_logged, out, steps=40, progress=False, log=lambda s: None)
    from flax import nnx

    latest, _ = restore_trained(out)
    assert all(np.all(np.isfinite(np.asarray(v[...]))) for _, v in nnx.to_flat_state(nnx.state(latest, nnx.Param)))


def test_state_passing_step():
    """A step that keeps no row is the plain step; a kept row starts from the carried memory (its loss
    changes) and a row not kept is exactly a fresh row; the carried arrays come back with the batch's
    shapes."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import titans
    from titans.train.steps import MemoryCarry, carried_start, token_nll, train_step

    def step(keep, carried=None):
        model = titans.TitansLM(titans.load_preset("tiny", variant="lmm"), rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 33)), jnp.int32)
        batch = {"tokens": tokens, "weights": jnp.ones((2, 32))}
        if keep is None:
            return train_step(model, opt, batch, 0.1), model
        carried = carried if carried is not None else model.memory_states(model.init_state(2))
        return train_step(model, opt, batch, 0.1, MemoryCarry(carried, jnp.asarray(keep))), model

    (loss, _, _, none), plain = step(None)
    assert none is None
    (loss0, _, _, ends), model0 = step([False, False])
    assert float(loss0) == pytest.approx(float(loss), rel=1e-6)
    same = [np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)),
                                                                     jax.tree.leaves(nnx.state(model0, nnx.Param)))]
    assert all(same)
    assert [a.shape for a in jax.tree.leaves(ends)] == [a.shape for a in jax.tree.leaves(
        model0.memory_states(model0.init_state(2)))]
    (loss1, _, _, _), _ = step([True, False], ends)
    assert abs(float(loss1) - float(loss)) > 1e-4
    # Per row: the kept row reads the carried memory, the other is exactly a fresh row.
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 33)), jnp.int32)
    fresh = np.asarray(token_nll(model0, tokens)[0])
    mixed = np.asarray(token_nll(model0, tokens, carried_start(model0, MemoryCarry(ends, jnp.asarray([True, False]))))[0])
    np.testing.assert_allclose(mixed[1], fresh[1], rtol=1e-6, atol=1e-6)
    assert np.abs(mixed[0] - fresh[0]).max() > 1e-3


class Compiles(logging.Handler):
    """Counts the programs JAX lowers (with `jax_log_compiles`, one record each) by function name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling "):
            self.names.append(record.getMessage().split()[1])

    def __enter__(self):
        import jax

        self.logger = logging.getLogger("jax._src.interpreters.pxla")
        self.logger.addHandler(self)
        self.flag = jax.log_compiles(True)
        self.flag.__enter__()
        return self

    def __exit__(self, *exc):
        self.flag.__exit__(*exc)
        self.logger.removeHandler(self)


def test_state_passing_trains_and_checks_its_config(text_corpus, tmp_path):
    """A run with state passing trains (lmm; its step, with the carry, is this test's own program)
    and compiles that step once: inputs placed otherwise than the step returns them would compile it
    again at step 2."""
    from titans.configfile import ConfigError

    run = load_run_config("tiny", overrides(text_corpus, state_passing=0.5) + ["model.variant=lmm"])
    with Compiles() as compiles:
        summary = train(run, tmp_path / "run", steps=4, progress=False, log=lambda s: None)
    assert summary["status"] == "done" and np.isfinite(summary["loss"])
    assert compiles.names.count("jit(train_step)") == 1, compiles.names
    with pytest.raises(ConfigError, match="a swa model has none"):
        load_run_config("tiny", overrides(text_corpus, state_passing=0.5) + ["model.variant=swa"])
    with pytest.raises(ConfigError, match="multiple of model.memory.chunk_size"):
        load_run_config("tiny", overrides(text_corpus, state_passing=0.5, seq_len=30))
    with pytest.raises(ConfigError, match=r"probability in \[0, 1\]"):
        load_run_config("tiny", overrides(text_corpus, state_passing=1.5))
