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
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=0.95, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stream-every", type=int, default=8, help="tokens per streamed block")
    args = p.parse_args(argv)

    from titans.sampling import Sampler, generate

    # Checked before the model loads: a typo costs no loading time.
    Sampler(args.temperature, args.top_k, args.top_p)
    if not args.prompt:
        raise ValueError("--prompt must not be empty: the model continues a text")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")

    model, tokenizer, _ = cli.load_model(args, log=lambda s: print(s, file=sys.stderr))
    print(args.prompt, end="", flush=True)
    pending = []

    def show(block):  # [1, k]; a multi-byte character's bytes can straddle two blocks
        pending.extend(int(i) for i in block[0] if i != tokenizer.eos and i >= 0)
        text = tokenizer.decode(pending)
        if "\ufffd" not in text or len(pending) >= 8:
            print(text, end="", flush=True)
            pending.clear()

    t0 = time.perf_counter()
    new = generate(model, tokenizer.encode(args.prompt), args.max_new_tokens, args.seed,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=[tokenizer.eos],
                   on_tokens=show, stream_every=args.stream_every)
    seconds = time.perf_counter() - t0
    print(tokenizer.decode(pending))
    print(f"[{len(new)} new tokens in {seconds:.1f} s: {len(new) / seconds:.1f} tokens/s, prompt prefill and "
          "compilation included]", file=sys.stderr)
    return args.prompt + tokenizer.decode(new)


if __name__ == "__main__":
    cli.run("generate", main)
