"""Generate text: `python scripts/generate.py --model DIR --prompt "It is a truth"` (DIR from
scripts/export.py; or `--checkpoint RUN_DIR` for a training run). Streams the text as it is made
and prints tokens/s at the end."""

from __future__ import annotations

import sys
import time

from titans.train import cli


def main(argv=None) -> str:
    p = cli.parser(__doc__)
    cli.add_model_args(p)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.prompt:
        raise ValueError("--prompt must not be empty: the model continues a text")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), --top-p in (0, 1] and --max-new-tokens >= 1, got "
                         f"{args.temperature}, {args.top_p}, {args.max_new_tokens}")

    import jax

    from titans.sampling import generate

    model, tokenizer, _ = cli.load_model(args, log=lambda s: print(s, file=sys.stderr))
    prompt = tokenizer.encode(args.prompt)
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
    cli.run("generate", main)
