"""Export a training run's parameters: `python scripts/export.py --checkpoint RUN_DIR --out DIR`.

DIR gets `model.safetensors` (dotted parameter paths as keys) and `config.json` (model config,
format version, tokenizer); load it with `titans.TitansLM.from_pretrained(DIR)`. DIR must not exist.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from titans.pretrained import save_pretrained  # noqa: E402
from train.trainer import TrainError, load_trained_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run folder of scripts/train.py")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--which", choices=("latest", "best"), default="latest")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    model, run = load_trained_model(args.checkpoint, args.which)
    folder = save_pretrained(model, args.out, dtype=args.dtype, tokenizer=run.data.tokenizer)
    print(f"wrote {folder} ({run.model.variant}, {args.dtype})")
    return folder


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, FileExistsError, FileNotFoundError, ValueError) as err:
        sys.exit(f"export: {err}")
