"""Train a byte-level BPE tokenizer: `python scripts/train_tokenizer.py --corpus PATH --vocab-size 32000 --out DIR`.

Writes DIR/tokenizer.json (Hugging Face `tokenizers`, offline; `<|endoftext|>` ends documents).
Point a run at it with `--set data.tokenizer=DIR`. The corpus is a folder or file of .txt, .jsonl,
.jsonl.gz or .parquet documents, or `default` (the default corpus's training split).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from titans.train import cli


def main(argv=None) -> Path:
    p = cli.parser(__doc__)
    p.add_argument("--corpus", default="default", help="a folder or file of documents, or default")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in all, the two specials included")
    p.add_argument("--out", required=True, help="folder for tokenizer.json (must not hold one)")
    p.add_argument("--text-field", default="text", help="the text of a .jsonl line or .parquet row")
    p.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged")
    args = p.parse_args(argv)

    from titans.train.data import bpe, corpus

    source = corpus.ensure(log=print) / "train" if args.corpus == "default" else Path(args.corpus).expanduser()
    skipped = lambda paths: print(f"skipped {len(paths)} file(s) of no corpus format ({paths[0]}, ...)", file=sys.stderr)
    texts = (text for _, text in corpus.iter_documents(source, args.text_field, skipped))
    t0 = time.perf_counter()
    path = bpe.train_bpe(texts, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"wrote {path} ({args.vocab_size} ids, trained on {source} in {time.perf_counter() - t0:.0f} s)")
    return path


if __name__ == "__main__":
    cli.run("train_tokenizer", main)
