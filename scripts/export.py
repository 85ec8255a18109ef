"""Export a training run's parameters: `python scripts/export.py --checkpoint RUN_DIR --out DIR`.

DIR gets `model.safetensors` (dotted parameter paths as keys), `config.json` (model config, format
version, tokenizer) and the run's `tokenizer.json` (a subword tokenizer); load it with
`titans.load(DIR)`. DIR must not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

from titans.train import cli


def main(argv=None) -> Path:
    p = cli.parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder of scripts/train.py")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--which", choices=("latest", "best"), default="latest")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    if Path(args.out).exists():
        raise FileExistsError(f"{args.out} already exists: choose a new folder (nothing was overwritten)")

    from titans.loading import restore_trained, run_tokenizer
    from titans.pretrained import save_pretrained

    model, run = restore_trained(args.checkpoint, args.which, log=lambda s: print(s, file=sys.stderr))
    tokenizer = run_tokenizer(Path(args.checkpoint), run)
    folder = save_pretrained(model, args.out, dtype=args.dtype, tokenizer=tokenizer)
    print(f"wrote {folder} ({model.config.variant}, {args.dtype})")
    return folder


if __name__ == "__main__":
    cli.run("export", main)
