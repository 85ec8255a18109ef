"""Tokenizers: the built-in byte tokenizer, and any Hugging Face `tokenizer.json` (the format Llama,
Mistral, GPT-NeoX, Qwen... ship) through the `tokenizers` library.

    tok = load_tokenizer("byte")                          # UTF-8 bytes, 260 ids
    tok = load_tokenizer("path/to/tokenizer.json")        # or the folder holding it
    ids = tok.encode("It is a truth"); text = tok.decode(ids)

Both expose `name`, `vocab_size`, the special ids `eos` (written after every document), `bos` and
`pad` (None where the tokenizer has none), `encode`, `encode_batch`, `decode`, `count_bytes` (the
UTF-8 bytes ids stand for, for bits per byte) and `sha256` (what a token store and a run record, so a
store made with another tokenizer is refused). This module imports nothing of training; the
`bpe-32k`-style names of tokenizers trained on the default corpus resolve in
`titans.train.data.bpe`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

FILE = "tokenizer.json"
# Special tokens looked for, in order, when the config names none.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "[CLS]")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; PAD 256, BOS 257, EOS 258 (ends every document), 259 reserved."""

    name = "byte"
    pad, bos, eos = 256, 257, 258
    vocab_size = 260
    sha256 = "byte"

    def encode(self, text: str) -> np.ndarray:
        """str -> uint16 token ids (no specials)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Token ids -> str; specials are dropped, invalid UTF-8 (a cut multi-byte char) is replaced."""
        ids = np.asarray(ids).reshape(-1)
        return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", "replace")

    def count_bytes(self, ids) -> int:
        """How many text bytes `ids` stand for (bits per byte divide by this)."""
        return int(np.sum(np.asarray(ids) < 256))

    def save(self, folder: Path) -> dict:
        """Nothing to write: the config entry that names it."""
        return {"name": self.name}


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level map, inverted: the printable character each byte is written as in a
    byte-level BPE vocabulary -> the byte (Radford et al. 2019, the `bytes_to_unicode` table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A `tokenizers.Tokenizer` from a `tokenizer.json`; special tokens by name (`eos`, `bos`,
    `pad` strings) or found among the usual names (`EOS_NAMES`, ...)."""

    def __init__(self, path: str | Path, *, name: str | None = None, eos: str = "", bos: str = "", pad: str = ""):
        from tokenizers import Tokenizer

        path = Path(path)
        self.path = path / FILE if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found: data.tokenizer takes byte, a tokenizer name such as "
                                    "bpe-32k, a tokenizer.json or a folder holding one")
        raw = self.path.read_bytes()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - the Rust library raises plain Exceptions
            raise ValueError(f"{self.path} is not a tokenizer.json the tokenizers library reads "
                             f"({str(err).splitlines()[0][:160]})") from None
        self.name = name or str(self.path)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.overrides = {f"{k}_token": v for k, v in (("eos", eos), ("bos", bos), ("pad", pad)) if v}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos = self._special(eos, EOS_NAMES, "eos", required=True)
        self.bos = self._special(bos, BOS_NAMES, "bos")
        self.pad = self._special(pad, PAD_NAMES, "pad")

    def _special(self, given: str, names: Sequence[str], what: str, required: bool = False) -> int | None:
        if given:
            found = self._tok.token_to_id(given)
            if found is None:
                raise ValueError(f"data.{what}_token={given!r} is not a token of {self.path}")
            return found
        found = next((i for i in map(self._tok.token_to_id, names) if i is not None), None)
        if found is None and required:
            raise ValueError(f"{self.path} has none of the usual end-of-text tokens ({', '.join(names)}): name "
                             f"one with data.{what}_token")
        return found

    def encode(self, text: str) -> np.ndarray:
        """str -> token ids (no specials added)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Many texts at once, on every core (the Rust library's thread pool)."""
        return [np.asarray(e.ids, np.uint32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    @functools.cached_property
    def _token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each id. A byte-level vocabulary (GPT-2's, ours) writes every byte as one
        character: exact. Otherwise (SentencePiece-style: "▁" for a space, `<0xXX>` byte fallback)
        a token's bytes are what it adds to the text after a plain token (decoded alone, a leading
        space would be dropped), and a byte-fallback token is one byte."""
        sizes = np.zeros(self.vocab_size, np.int64)
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        vocab = {token: i for token, i in self._tok.get_vocab(with_added_tokens=True).items() if token not in specials}
        if "ByteLevel" in _types(json.loads(self.path.read_text()).get("decoder")):
            alphabet = _byte_level_alphabet()
            for token, i in vocab.items():
                sizes[i] = len(token) if all(c in alphabet for c in token) else len(self._tok.decode([i]).encode())
            return sizes
        anchor = int(self.encode("a")[0])
        base = len(self._tok.decode([anchor]).encode())
        for token, i in vocab.items():
            fallback = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            sizes[i] = 1 if fallback else len(self._tok.decode([anchor, i]).encode()) - base
        return sizes

    def count_bytes(self, ids) -> int:
        """How many text bytes `ids` stand for (bits per byte divide by this)."""
        return int(self._token_bytes[np.asarray(ids).reshape(-1)].sum())

    def save(self, folder: Path) -> dict:
        """Copy `tokenizer.json` into `folder` (atomically); the config entry that names it."""
        target = Path(folder) / FILE
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(self.path, tmp)
        os.replace(tmp, target)
        return {"name": self.name, "file": FILE, "sha256": self.sha256, **self.overrides}


Tokenizer = ByteTokenizer | HFTokenizer


def _types(node) -> set[str]:
    """The `type` fields of a tokenizer.json component and of the components nested in it."""
    if isinstance(node, dict):
        return {node.get("type")} | set().union(*(_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_types(v) for v in node))
    return set()


def load_tokenizer(spec: str | Path, *, eos: str = "", bos: str = "", pad: str = "", name: str | None = None) -> Tokenizer:
    """`"byte"`, or the path of a `tokenizer.json` (or of a folder holding one)."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec, name=name, eos=eos, bos=bos, pad=pad)


def saved_tokenizer(folder: Path, entry: dict) -> Tokenizer:
    """The tokenizer an export or run folder recorded with `save` (its copy of tokenizer.json)."""
    if entry.get("file"):
        return HFTokenizer(Path(folder) / entry["file"], name=entry.get("name"), eos=entry.get("eos_token", ""),
                           bos=entry.get("bos_token", ""), pad=entry.get("pad_token", ""))
    return load_tokenizer(entry.get("name", "byte"))
