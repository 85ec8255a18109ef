"""Byte-level BPE tokenizers trained with Hugging Face `tokenizers` (offline), and the named ones
trained on the default corpus on first use.

    train_bpe(texts, vocab_size=32000, out="tok/")      # writes tok/tokenizer.json
    resolve("bpe-32k")                                   # the default corpus's 32K BPE, trained once and cached

A byte-level BPE (GPT-2's scheme, as GPT-NeoX, Llama 3 and Qwen use) never meets an unknown
character; `<|endoftext|>` ends documents and `<|pad|>` pads.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from titans.tokenizer import FILE, Tokenizer, load_tokenizer
from titans.train.data import corpus

SPECIALS = ("<|endoftext|>", "<|pad|>")
NAMED = re.compile(r"bpe-(\d+)(k?)")


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path, *, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE of `vocab_size` ids (specials included) on `texts`; write
    `out/tokenizer.json` atomically (out must not hold one). Returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out)
    if (out / FILE).exists():
        raise FileExistsError(f"{out / FILE} already exists: choose a new folder (nothing was overwritten)")
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"--vocab-size must be at least {256 + len(SPECIALS)} (every byte and the specials), "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out, suffix=".tmp", delete=False) as f:
        f.write(tok.to_str())
    os.replace(f.name, out / FILE)
    return out / FILE


def default_dir(vocab_size: int) -> Path:
    """Where the default corpus's BPE of `vocab_size` is cached (beside the corpus)."""
    return corpus.default_dir().parent / "tokenizers" / f"bpe-{vocab_size}-corpus-v{corpus.VERSION}"


def resolve(spec: str, log: Callable[[str], None] = print, **specials) -> Tokenizer:
    """A `data.tokenizer` value: `byte`, a path, or `bpe-<N>[k]` (a byte-level BPE of N ids trained on
    the default corpus's training split on first use, then cached)."""
    match = NAMED.fullmatch(spec)
    if not match:
        return load_tokenizer(spec, **specials)
    vocab_size = int(match.group(1)) * (1000 if match.group(2) else 1)
    folder = default_dir(vocab_size)
    if not (folder / FILE).is_file():
        root = corpus.ensure(log=log)
        log(f"tokenizer: training {spec} ({vocab_size} ids) on {root / 'train'}, once")
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".bpe-"))
        try:
            train_bpe((text for _, text in corpus.iter_documents(root / "train")), vocab_size, stage)
            os.replace(stage, folder)
        except OSError:  # another process (of a multi-host job) trained it meanwhile: a rename onto it
            if not (folder / FILE).is_file():
                raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return load_tokenizer(folder, name=spec, **specials)
