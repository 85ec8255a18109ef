"""Tokenize a corpus into a token store: `python scripts/prepare_data.py --corpus PATH --tokenizer T --out DIR`.

The corpus is a folder (with train/ and valid/ subfolders, or every 20th document held out) or a
file of .txt, .jsonl, .jsonl.gz or .parquet documents; the tokenizer `byte`, `bpe-32k` or a
tokenizer.json. DIR gets flat shards of token ids and index.json, written atomically; train on it
with `--set data.corpus=DIR --set data.tokenizer=T`. `titans.train.data.store` says how it reads.
"""

from __future__ import annotations

import time
from pathlib import Path

from titans.train import cli


def main(argv=None) -> Path:
    p = cli.parser(__doc__)
    p.add_argument("--corpus", required=True, help="a folder or file of documents, or default")
    p.add_argument("--tokenizer", default="byte", help="byte, bpe-<N>[k], or a tokenizer.json (or its folder)")
    p.add_argument("--out", required=True, help="the store folder to write (must not exist)")
    p.add_argument("--text-field", default="text", help="the text of a .jsonl line or .parquet row")
    args = p.parse_args(argv)
    if Path(args.out).exists():
        raise FileExistsError(f"{args.out} already exists: choose a new folder (nothing was overwritten)")

    from titans.train.data import bpe, corpus, store

    tokenizer = bpe.resolve(args.tokenizer)
    source = corpus.ensure(log=print) if args.corpus == "default" else Path(args.corpus)
    t0 = time.perf_counter()
    out = store.prepare(source, tokenizer, args.out, text_field=args.text_field)
    seconds = time.perf_counter() - t0
    index = store.read_index(out)
    parts = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents" for s, v in index["splits"].items())
    print(f"wrote {out}: {parts} ({index['dtype']}, {seconds:.1f} s)")
    return out


if __name__ == "__main__":
    cli.run("prepare_data", main)
