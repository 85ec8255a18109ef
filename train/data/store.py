"""The token store: a corpus tokenized once into flat shards of token ids, read by random access.

    STORE/index.json            format, dtype, the tokenizer (name, sha256, size, eos), the source,
                                per split ("train", "valid") its shards, tokens and documents, max id
    STORE/train-00000.bin ...   token ids, native-endian uint16 (a vocabulary that fits) or uint32:
    STORE/valid-00000.bin ...   each document's tokens, then EOS, document after document

A split reads as one token stream (`TokenStream`): `stream[a:b]` reads those tokens with `os.pread`
from the shards they lie in, so a process holds only the windows it reads (no memory map whose
touched pages would count towards its resident size) and the store may be far larger than memory.
Flat shards are what nanoGPT and levanter's cache use: the stack reads them with numpy alone, and
a window is one or two reads.

`prepare` streams a corpus into a store (bounded memory; the tokenizer's `encode_batch` runs on every
core) and writes it atomically: a killed prepare leaves a hidden temporary folder, never a store
that looks complete. `prepared` is what training calls: a store folder is used as it is; a raw corpus
(the default one, a folder, a file) is prepared once into a cache keyed by its files and the
tokenizer, so a resume or a second run does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from titans.tokenizer import Tokenizer
from titans.train.data import corpus
from titans.train.data.corpus import CorpusError

FORMAT = 1
INDEX = "index.json"
SPLITS = ("train", "valid")
SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MB shards of uint16
BATCH_BYTES = 8 << 20  # text handed to the tokenizer at once: bounds prepare's memory


def is_store(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


class TokenStream:
    """One split of a store as a read-only token sequence: `len(stream)`, `stream[a:b]` -> np.ndarray."""

    def __init__(self, folder: Path, split: dict, dtype: str):
        self.dtype = np.dtype(dtype)
        self.files = [folder / s["file"] for s in split["shards"]]
        sizes = np.asarray([s["tokens"] for s in split["shards"]], np.int64)
        for path, tokens in zip(self.files, sizes):
            if not path.is_file():
                raise CorpusError(f"{path} is missing: the store is incomplete; prepare it again")
            if path.stat().st_size != tokens * self.dtype.itemsize:
                raise CorpusError(f"{path} holds {path.stat().st_size} bytes, the index says {tokens} tokens of "
                                  f"{self.dtype}: the store is damaged; prepare it again")
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:  # opened on first read, so a stream pickles into grain's workers
            self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self._fds[shard]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a token stream reads contiguous slices stream[a:b]")
        start, stop, _ = index.indices(len(self))
        parts, at = [], start
        while at < stop:
            shard = int(np.searchsorted(self.starts, at, side="right")) - 1
            n = min(stop, int(self.starts[shard + 1])) - at
            raw = os.pread(self._fd(shard), n * self.dtype.itemsize, (at - int(self.starts[shard])) * self.dtype.itemsize)
            parts.append(np.frombuffer(raw, self.dtype))
            at += n
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


def read_index(folder: str | Path) -> dict:
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorpusError(f"{path} is not a readable store index ({err}): prepare the store again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CorpusError(f"{path}: store format {index.get('format') if isinstance(index, dict) else None!r}, this "
                          f"code reads {FORMAT}: prepare the store again")
    return index


def open_store(folder: str | Path, tokenizer: Tokenizer) -> tuple[TokenStream, TokenStream, dict]:
    """The train and valid streams of a store made with `tokenizer` (checked), and its index."""
    folder = Path(folder)
    index = read_index(folder)
    made = index["tokenizer"]
    if made["sha256"] != tokenizer.sha256:
        raise CorpusError(f"{folder} was tokenized with {made['name']} (sha256 {made['sha256'][:12]}), this run uses "
                          f"{tokenizer.name} (sha256 {tokenizer.sha256[:12]}): prepare the store with this tokenizer")
    streams = tuple(TokenStream(folder, index["splits"][s], index["dtype"]) for s in SPLITS)
    return streams[0], streams[1], index


class _ShardWriter:
    """Token ids appended to `<split>-NNNNN.bin` files of at most `shard_tokens` each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards, self.documents, self.file = [], 0, None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next()
            n = min(len(ids), self.shard_tokens - self.shards[-1]["tokens"])
            self.file.write(np.ascontiguousarray(ids[:n], self.dtype).tobytes())
            self.shards[-1]["tokens"] += n
            ids = ids[n:]

    def _next(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = (self.folder / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents}


def _splits(source: Path, text_field: str, on_skipped) -> Iterable[tuple[str, str]]:
    """(split, text) of every document: the train/ and valid/ folders of `source`, or its documents
    with every 20th held out."""
    if source.is_dir() and (source / "train").is_dir() and (source / "valid").is_dir():
        for split in SPLITS:
            yield from ((split, text) for _, text in corpus.iter_documents(source / split, text_field, on_skipped))
        return
    for i, (_, text) in enumerate(corpus.iter_documents(source, text_field, on_skipped)):
        yield ("valid" if corpus.held_out(i) else "train"), text


def prepare(source: str | Path, tokenizer: Tokenizer, out: str | Path, *, text_field: str = "text",
            shard_tokens: int = SHARD_TOKENS, log: Callable[[str], None] = print) -> Path:
    """Tokenize the corpus `source` (a folder, with or without train/ and valid/, or one file) into the
    store `out` (which must not exist), atomically. Returns `out`."""
    source, out = Path(source).expanduser(), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new folder (nothing was overwritten)")
    if not source.exists():
        raise CorpusError(f"corpus {source} does not exist")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        writers = {s: _ShardWriter(stage, s, dtype, shard_tokens) for s in SPLITS}
        eos, max_id = np.asarray([tokenizer.eos]), tokenizer.eos
        skipped = lambda paths: log(f"prepare: skipped {len(paths)} file(s) of no corpus format ({paths[0]}, ...)")
        batch, size = [], 0

        def flush():
            nonlocal max_id
            for (split, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
                writers[split].write(np.concatenate([ids, eos]))
                writers[split].documents += 1
                max_id = max(max_id, int(ids.max()) if len(ids) else 0)
            batch.clear()

        for split, text in _splits(source, text_field, skipped):
            batch.append((split, text))
            size += len(text)
            if size >= BATCH_BYTES:
                flush()
                size = 0
        flush()
        splits = {s: w.close() for s, w in writers.items()}
        corpus.check_split(source, splits["train"]["documents"], splits["valid"]["documents"])
        index = {"format": FORMAT, "dtype": dtype.name, "source": str(source), "text_field": text_field,
                 "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                               "eos": tokenizer.eos},
                 "max_id": max_id, "splits": splits}
        (stage / INDEX).write_text(json.dumps(index, indent=1))
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def cache_dir() -> Path:
    """Where raw corpora are prepared: `$TITANS_JAX_STORES`, default beside the default corpus."""
    return Path(os.environ.get("TITANS_JAX_STORES", corpus.default_dir().parent / "stores"))


def _fingerprint(source: Path, tokenizer: Tokenizer, text_field: str) -> str:
    """What a prepared store depends on: every file's path, size and modification time, the
    tokenizer, the text field and the store format."""
    files = sorted(source.rglob("*")) if source.is_dir() else [source]
    stamp = [(str(p.relative_to(source) if source.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns)
             for p in files if p.is_file()]
    key = json.dumps([FORMAT, str(source.resolve()), stamp, tokenizer.sha256, text_field])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prepared(source: str, tokenizer: Tokenizer, *, text_field: str = "text", log: Callable[[str], None] = print) -> Path:
    """The store of `data.corpus`: a store folder as it is, else the corpus (`"default"`, a folder or a
    file) prepared into `cache_dir()` once per content and tokenizer."""
    path = corpus.ensure(log=log) if source == "default" else Path(source).expanduser()
    if is_store(path):
        return path
    if not path.exists():
        raise CorpusError(f"corpus folder {path} does not exist")
    out = cache_dir() / f"{path.name}-{_fingerprint(path, tokenizer, text_field)}"
    if not is_store(out):
        log(f"tokenizing {path} with {tokenizer.name} into {out}, once")
        try:
            prepare(path, tokenizer, out, text_field=text_field, log=log)
        except OSError:  # another process prepared it meanwhile (FileExistsError, or a rename onto it)
            if not is_store(out):
                raise
    return out
