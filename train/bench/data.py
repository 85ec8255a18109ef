"""The data path's speed and memory (scripts/bench_data.py): tokenization MB/s, the token-store
loader's windows/s, and the peak resident memory of preparing and of training on stores of two
sizes, which must not grow with the store.

Corpora are generated (words drawn from the default corpus's vocabulary, written as 64 MB files)
into a work folder and kept there for the next run. Every case runs in its own process, so its
peak RSS is its own; the BPE cases set `RAYON_RS_NUM_CPUS` (the tokenizers library's threads).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from titans.train.bench.common import child_main, command_line, machine_line, peak_rss_mb, progress, run_in_child
from titans.train.bench.common import publish

SECTION = "bench_data"
FILE_MB = 64


@dataclasses.dataclass(frozen=True)
class BenchDataConfig:
    work: str = "/tmp/titans-bench-data"
    store_mbs: tuple[int, ...] = (50, 2048)  # generated corpus sizes (MB of text)
    tokenizers: tuple[str, ...] = ("byte", "bpe-32k")
    threads: tuple[int, ...] = (1, 2)
    batch: int = 8
    seq_len: int = 4096
    loader_batches: int = 300
    train_steps: int = 3
    write: bool = False

    def __post_init__(self):
        if min(self.store_mbs + self.threads + (self.batch, self.seq_len, self.loader_batches, self.train_steps)) < 1:
            raise ValueError("sizes, thread counts, --batch, --seq-len and step counts must be >= 1")

    def cases(self) -> list[dict]:
        out = [dict(kind="tokenize", tokenizer=t, threads=n) for t in self.tokenizers for n in self.threads]
        out += [dict(kind=kind, mb=mb) for mb in self.store_mbs for kind in ("prepare", "loader", "train")]
        return out


def corpus_dir(cfg: BenchDataConfig, mb: int) -> Path:
    """A corpus of about `mb` MB of text: documents of 2-20 KB of words drawn from the default corpus
    in their frequencies, as .jsonl files of 64 MB."""
    import json

    import numpy as np

    from titans.train.data import corpus

    folder = Path(cfg.work) / f"corpus-{mb}mb"
    if (folder / "DONE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    words = np.asarray(" ".join(t for _, t in corpus.read_documents(corpus.ensure(log=print) / "train")).split())
    rng = np.random.default_rng(mb)
    for i in range(-(-mb // FILE_MB)):
        size, lines = min(FILE_MB, mb - i * FILE_MB) << 20, []
        while size > 0:
            doc = " ".join(words[rng.integers(len(words), size=int(rng.integers(400, 4000)))])
            lines.append(json.dumps({"text": doc}))
            size -= len(doc)
        (folder / f"part{i:03d}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "DONE").write_text("")
    return folder


def _store(cfg: BenchDataConfig, mb: int) -> Path:
    return Path(cfg.work) / f"store-{mb}mb"


def run_case(case: dict, cfg: BenchDataConfig) -> dict:
    """One case, in this (child) process."""
    from titans.tokenizer import ByteTokenizer
    from titans.train.data import bpe, corpus, pipeline, store

    if case["kind"] == "tokenize":
        texts = [t for _, t in corpus.read_documents(corpus.ensure(log=print) / "train")]
        tok = ByteTokenizer() if case["tokenizer"] == "byte" else bpe.resolve(case["tokenizer"])
        mb = sum(len(t.encode()) for t in texts) / 2**20
        t0 = time.perf_counter()
        tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        seconds = time.perf_counter() - t0
        return dict(case, mb_s=round(mb / seconds, 1), tokens_per_byte=round(tokens / (mb * 2**20), 3))
    if case["kind"] == "prepare":
        source, out = corpus_dir(cfg, case["mb"]), _store(cfg, case["mb"])
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        store.prepare(source, ByteTokenizer(), out, log=lambda s: None)
        seconds = time.perf_counter() - t0
        return dict(case, mb_s=round(case["mb"] / seconds, 1), peak_rss_mb=peak_rss_mb())
    if case["kind"] == "loader":
        train_tokens, _, _ = store.open_store(_store(cfg, case["mb"]), ByteTokenizer())
        it = iter(pipeline.train_dataset(train_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch, seed=0))
        next(it)
        t0 = time.perf_counter()
        for _ in range(cfg.loader_batches):
            next(it)
        seconds = time.perf_counter() - t0
        windows = cfg.loader_batches * cfg.batch
        return dict(case, windows_s=round(windows / seconds), tokens_s=round(windows * cfg.seq_len / seconds),
                    peak_rss_mb=peak_rss_mb())
    # train: the tiny model a few steps on the store, in a process of its own (scripts/train.py)
    out = Path(cfg.work) / f"run-{case['mb']}mb"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    sets = [f"data.corpus={_store(cfg, case['mb'])}", f"train.seq_len={cfg.seq_len}", f"train.batch_size={cfg.batch}",
            "train.eval_batches=1", "train.sample_tokens=0", "train.log_every=1"]
    cmd = [sys.executable, str(Path("scripts") / "train.py"), "--config", "tiny", "--steps", str(cfg.train_steps),
           "--out", str(out), "--no-progress", *[a for s in sets for a in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return dict(case, status=f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child waited for: train.py
    return dict(case, seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=round(children / 1024, 1))


def table(rows: list[dict], cfg: BenchDataConfig) -> str:
    lines = ["| case | store / tokenizer | threads | result | peak RSS MB |", "|---|---|---|---|---|"]
    for r in rows:
        what = f"{r['mb']} MB" if "mb" in r else r["tokenizer"]
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['kind']} | {what} | | {r['status']} | |")
        elif r["kind"] == "tokenize":
            lines.append(f"| tokenize | {what} | {r['threads']} | {r['mb_s']} MB/s ({r['tokens_per_byte']} tokens/byte) | |")
        elif r["kind"] == "prepare":
            lines.append(f"| prepare_data (byte) | {what} | 1 | {r['mb_s']} MB/s | {r['peak_rss_mb']:.0f} |")
        elif r["kind"] == "loader":
            lines.append(f"| loader, batch {cfg.batch} x {cfg.seq_len} | {what} | 1 | {r['windows_s']:,} windows/s, "
                         f"{r['tokens_s'] / 1e6:.1f}M tokens/s | {r['peak_rss_mb']:.0f} |")
        else:
            lines.append(f"| train tiny, {cfg.train_steps} steps of {cfg.batch} x {cfg.seq_len} | {what} | | "
                         f"{r['seconds']} s | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(cfg: BenchDataConfig) -> list[dict]:
    for mb in cfg.store_mbs:
        corpus_dir(cfg, mb)
    rows = []
    for case in progress(cfg.cases(), SECTION):
        env = dict(os.environ, RAYON_RS_NUM_CPUS=str(case.get("threads", os.cpu_count())))
        rows.append(run_in_child(__name__, case, dataclasses.asdict(cfg), env))
    rss = {r["kind"]: [] for r in rows}
    for r in rows:
        if "peak_rss_mb" in r and "mb" in r:
            rss[r["kind"]].append(r["peak_rss_mb"])
    spread = {k: (max(v) - min(v)) / statistics.mean(v) for k, v in rss.items() if len(v) > 1}
    text = (f"Command: {command_line()}  \n{machine_line()}  \n"
            f"Generated corpora of {', '.join(f'{mb} MB' for mb in cfg.store_mbs)} (byte tokenizer stores); the "
            "tokenize rows encode the default corpus's 15.8 MB training split. Peak RSS across store sizes: "
            + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in spread.items()) + "\n\n" + table(rows, cfg))
    publish(text, SECTION if cfg.write else None)
    return rows


if __name__ == "__main__":
    child_main(sys.argv, run_case, BenchDataConfig)
