"""Generate text: `python scripts/generate.py --model DIR --prompt "It is a truth"` (DIR from
scripts/export.py; or `--checkpoint RUN_DIR` for a training run). Streams the text as it is made
and prints tokens/s at the end."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import jax  # noqa: E402

from titans.sampling import generate  # noqa: E402
from train.trainer import TrainError, load_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an exported model folder")
    src.add_argument("--checkpoint", help="a run folder of scripts/train.py (its newest checkpoint)")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    model, tokenizer = load_model(args.model, args.checkpoint)
    prompt = tokenizer.encode(args.prompt)
    if len(prompt) == 0:
        raise ValueError("--prompt must not be empty")
    print(args.prompt, end="", flush=True)
    pending = []

    def show(ids):  # bytes of a multi-byte character arrive one token at a time
        pending.append(int(ids[0]))
        text = tokenizer.decode(pending)
        if "\ufffd" not in text or len(pending) >= 4:
            print(text, end="", flush=True)
            pending.clear()

    t0 = time.perf_counter()
    new = generate(model, prompt[None], args.max_new_tokens, jax.random.key(args.seed),
                   temperature=args.temperature, top_p=args.top_p, on_token=show)
    seconds = time.perf_counter() - t0
    print(tokenizer.decode(pending))
    print(f"[{new.shape[1]} new tokens in {seconds:.1f} s: {new.shape[1] / seconds:.1f} tokens/s, prompt prefill included]",
          file=sys.stderr)
    return args.prompt + tokenizer.decode(new[0])


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainError, FileNotFoundError, ValueError) as err:
        sys.exit(f"generate: {err}")
