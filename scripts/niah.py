"""Needle-in-a-haystack evaluation, passkey and RULER-style S-NIAH-1/2/3, up to 2M tokens.

    python scripts/niah.py --checkpoint runs/niah-mac --tasks passkey,s-niah-2 --lengths 1K,4K,16K,64K
    python scripts/niah.py --model EXPORTED_DIR --tasks passkey --lengths 2M --depths 5
    python scripts/niah.py --preset tiny --lengths 1K,2K      # random weights: a smoke test

Lengths count the model's tokens (bytes for the byte tokenizer); each prompt is exactly that long.
The real-text haystack (s-niah-2/3) is the held-out Austen text of the default corpus unless
`--haystack FILE` is given. Writes OUT/results.json (every sample), OUT/results.md (accuracy by
task x length and by depth x length) and OUT/heatmap.png (needs matplotlib), and prints the table,
tokens/s and the peak resident memory. `--float64` runs the model in float64, to tell whether
precision is what limits a length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from titans.config import ConfigError  # noqa: E402
from titans.model import TitansLM, count_params, recast  # noqa: E402
from train import niah_eval  # noqa: E402
from train.config import DataConfig, load_run_config  # noqa: E402
from train.data import niah  # noqa: E402
from train.data.corpus import read_documents  # noqa: E402
from train.data.tokenizer import get_tokenizer  # noqa: E402
from train.trainer import TrainError, load_model, load_split  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an exported model folder (scripts/export.py)")
    src.add_argument("--checkpoint", help="a run folder of scripts/train.py")
    src.add_argument("--preset", help="a preset with random weights (smoke tests); --set overrides it")
    p.add_argument("--which", choices=("latest", "best"), default="latest", help="checkpoint to load")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="preset override (with --preset only)")
    p.add_argument("--tasks", default="passkey,s-niah-1,s-niah-2,s-niah-3", help=f"comma list of {', '.join(niah.TASKS)}")
    p.add_argument("--lengths", default="1K,2K,4K,8K", help="comma list: 4096, 4K, 2M ...")
    p.add_argument("--depths", default="5", help="a count of evenly spaced depths 0..100%%, or a comma list of fractions")
    p.add_argument("--samples", type=int, default=1, help="samples per length and depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", help="a text file (or folder of .txt/.jsonl) for s-niah-2/3 instead of Austen")
    p.add_argument("--batch", type=int, default=4, help="prompts of one length streamed together")
    p.add_argument("--piece", type=int, default=4096, help="prefill piece in tokens")
    p.add_argument("--out", help="results folder (default niah/<model name>)")
    p.add_argument("--float64", action="store_true",
                   help="run the model in float64 (parameters, state, compute): does precision limit a length?")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _depths(text: str) -> tuple[float, ...]:
    if "," not in text and text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise ValueError(f"--depths {text}: need at least one depth")
        return tuple(float(d) for d in np.linspace(0, 1, count)) if count > 1 else (0.5,)
    try:
        return tuple(float(d) for d in text.split(","))
    except ValueError:
        raise ValueError(f"--depths {text!r} is neither a count nor a comma list of fractions") from None


def _load(args):
    """(model, tokenizer, description)."""
    if args.set and not args.preset:
        raise ValueError("--set changes a preset; a checkpoint or exported model keeps the config it was saved with")
    if args.preset:
        run = load_run_config(args.preset, args.set)
        model, tokenizer = TitansLM(run.model, rngs=nnx.Rngs(run.train.seed)), get_tokenizer(run.data.tokenizer)
        return model, tokenizer, f"preset {args.preset} (random weights)"
    model, tokenizer = load_model(args.model, args.checkpoint, args.which)
    return model, tokenizer, str(args.model or f"{args.checkpoint} ({args.which})")


def _float64(model: TitansLM) -> TitansLM:
    jax.config.update("jax_enable_x64", True)  # this process only evaluates, so the switch is global
    return recast(model, "float64", "float64")


def _haystack(args, tokenizer, tasks) -> tuple[np.ndarray | None, str]:
    if all(niah.TASKS[t].haystack == "noise" for t in tasks):
        return None, "noise"
    if args.haystack:
        path = Path(args.haystack)
        if not path.exists():
            raise FileNotFoundError(f"--haystack {path} does not exist")
        texts, name = ([path.read_text()] if path.is_file() else read_documents(path)), str(path)
    else:
        texts, name = load_split(DataConfig(), lambda s: print(s, file=sys.stderr))[1], "held-out Austen (6 novels)"
    tokens = np.asarray(tokenizer.encode(niah.normalise(" ".join(texts))), np.int32)
    if len(tokens) == 0:
        raise ValueError(f"the haystack {name} is empty")
    return tokens, name


def main(args: argparse.Namespace) -> dict:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    grid = niah_eval.Grid(tasks, tuple(niah_eval.parse_length(n) for n in args.lengths.split(",")),
                          _depths(args.depths), args.samples, args.seed)
    if args.batch < 1 or args.piece < 1:
        raise ValueError("--batch and --piece must be >= 1")
    model, tokenizer, source = _load(args)
    if args.float64:
        model, source = _float64(model), f"{source}, float64"
    niah_eval.check_lengths(grid, tokenizer)
    haystack, haystack_name = _haystack(args, tokenizer, tasks)
    cfg = model.config
    name = Path(args.model or args.checkpoint or args.preset).name
    out = Path(args.out or Path("niah") / name)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{source}: {cfg.variant}, {count_params(cfg) / 1e6:.1f}M parameters, {tokenizer.name} tokenizer, "
             f"haystack {haystack_name}, chunk {cfg.chunk_size}")

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=grid.total_tokens(), unit="tok", unit_scale=True, desc="niah", dynamic_ncols=True)
    results, t0 = [], time.perf_counter()
    try:
        for row in niah_eval.run(model, tokenizer, grid, haystack=haystack, batch=args.batch, piece=args.piece,
                                 on_tokens=bar.update if bar is not None else None):
            results.append(row)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    summary = {"model": source, "variant": cfg.variant, "params": count_params(cfg), "tokenizer": tokenizer.name,
               "haystack": haystack_name, "chunk_size": cfg.chunk_size, "piece": args.piece, "batch": args.batch,
               "seconds": round(seconds, 1), "tokens_per_s": round(grid.total_tokens() / seconds, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "accuracy": niah_eval.accuracy_table(results)}
    table = niah_eval.markdown(results, title)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({**summary, "samples": results}, indent=1))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(table)
    try:
        niah_eval.heatmap(results, out / "heatmap.png", title)
    except ImportError:
        print("heatmap skipped: matplotlib is not installed (pip install -e '.[plots]')", file=sys.stderr)
    print(table)
    print(f"{grid.total_tokens():,} prompt tokens in {seconds:.1f} s ({summary['tokens_per_s']:,.0f} tokens/s), "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB; results in {out}")
    return summary


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ConfigError, TrainError, FileNotFoundError, ValueError) as err:
        sys.exit(f"niah: {err}")
