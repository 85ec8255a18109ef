"""What the command lines in `scripts/` share: the config and model-source arguments, list parsing,
and the exit with one line (`<name>: <what went wrong and what to do>`) on a user's mistake."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from titans.configfile import ConfigError
from titans.train.config import TrainError
from titans.train.data.corpus import CorpusError

# The errors whose message is written for the user: a command exits with it, without a traceback.
USER_ERRORS = (ConfigError, CorpusError, TrainError, FileNotFoundError, FileExistsError, ValueError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage error as one line (argparse's own prints the usage first), status 2 as argparse's."""
        self.exit(2, f"{self.prog.removesuffix('.py')}: {message} (--help lists the options)\n")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a script's docstring; a usage error
    exits 2 with one line."""
    return _Parser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_args(p: argparse.ArgumentParser, default: str | None = "small", help_extra: str = "") -> None:
    """`--config` (a preset name or a YAML file) and repeatable `--set section.field=value`."""
    p.add_argument("--config", default=default, help="preset name (tiny, small, niah, 170m, ...) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set model.variant=swa or model.memory.depth=1 (repeatable)"
                   + help_extra)


def add_model_args(p: argparse.ArgumentParser, *, preset: bool = False, required: bool = True) -> None:
    """Where a trained model comes from: `--model` (an exported folder) or `--checkpoint` (a run
    folder, with `--which`), and with `preset` also `--preset` (random weights, for smoke tests)."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--model", help="an exported model folder (scripts/export.py)")
    src.add_argument("--checkpoint", help="a run folder of scripts/train.py")
    if preset:
        src.add_argument("--preset", help="a preset with random weights (smoke tests); --set overrides it")
    p.add_argument("--which", choices=("latest", "best"), default="latest", help="the run folder's checkpoint to load")


def load_model(args: argparse.Namespace, log: Callable[[str], None] = print):
    """(model, tokenizer, description) of the source `add_model_args` parsed."""
    from flax import nnx

    import titans
    from titans.train.config import load_run_config
    from titans.train.data.bpe import resolve

    if getattr(args, "preset", None):
        run = load_run_config(args.preset, args.overrides, log)
        model = titans.TitansLM(run.model, rngs=nnx.Rngs(run.train.seed))
        return model, resolve(run.data.tokenizer, log, **run.data.specials()), f"preset {args.preset} (random weights)"
    if getattr(args, "overrides", None):
        raise ValueError("--set changes a preset; a checkpoint or exported model keeps the config it was saved with")
    path = args.model or args.checkpoint
    model, tokenizer = titans.load(path, args.which, log=log)
    return model, tokenizer, path if args.model else f"{path} ({args.which})"


def split_list(text: str, cast: Callable = str, name: str = "list") -> tuple:
    """`"a,b"` -> ("a", "b") through `cast`; an empty list or a bad entry is one line naming `name`."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{name} is empty")
    try:
        return tuple(cast(x) for x in items)
    except ValueError as err:
        raise ValueError(f"{name} {text!r}: {err}") from None


def run(name: str, main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None):
    """`main(argv)`, exiting with one line `name: message` (status 1) on a user error. The libraries'
    own log lines below CRITICAL (orbax reports, through absl, every file of a corrupt checkpoint
    that the loaders then skip) stay out of the command's output."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        return main(argv)
    except USER_ERRORS as err:
        sys.exit(f"{name}: {err}")
    finally:
        absl.setLevel(level)
