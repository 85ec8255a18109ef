"""Byte-level tokenizer: the 256 byte values plus specials. Nothing to download, exactly reversible,
and losses convert to bits per byte directly."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; PAD 256, BOS 257, EOS 258 (ends every document), 259 reserved."""

    name = "byte"
    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 260

    def encode(self, text: str) -> np.ndarray:
        """str -> uint16 token ids (no specials)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Token ids -> str; specials are dropped, invalid UTF-8 (a cut multi-byte char) is replaced."""
        ids = np.asarray(ids).reshape(-1)
        return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", "replace")

    def count_bytes(self, ids) -> int:
        """How many text bytes `ids` stand for (bits per byte divide by this)."""
        return int(np.sum(np.asarray(ids) < 256))


TOKENIZERS = {"byte": ByteTokenizer}


def get_tokenizer(name: str) -> ByteTokenizer:
    if name not in TOKENIZERS:
        raise ValueError(f"data.tokenizer must be one of {', '.join(TOKENIZERS)}, got {name!r}")
    return TOKENIZERS[name]()
