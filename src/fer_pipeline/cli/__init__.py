"""`fer`: one subcommand per pipeline stage, plus `predict`, `serve`, `export` and `run`.

The only package that knows argparse. Each stage's command is its own module here (data,
teach, train, evaluate; the rest in tools), loaded only when that command runs, so a stage's
dvc.yaml deps are this file and its command's module: editing `fer predict` or `fer train`'s
flags reruns no other stage. Each handler loads params.yaml once (`params.load`) and calls its
stage's one function, importing the stage inside the handler. Errors the user can act on
(`FerError`) print as one line; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from fer_pipeline.errors import ERROR_FILE_ENV, EXIT_ERROR, EXIT_TRANSIENT, FerError

PROCESSED_DIR = Path("data/processed")   # dvc.yaml's split outs (arrays.PROCESSED_DIR; not imported:
                                         # every stage would then load arrays.py)

# command -> the module of this package that defines it (its `register(sub)`), in help order
COMMANDS = {"validate": "data", "clean": "data", "split": "data", "train": "train",
            "teach": "teach", "evaluate": "evaluate", "promote": "tools", "predict": "tools",
            "serve": "tools", "export": "tools", "run": "tools", "worker": "tools",
            "schemas": "tools"}


def _with_globals(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options before the command (`--params`, `-v`)."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and tracebacks for user errors too")
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in argv (None for `fer --help`, a typo, or none given)."""
    _, rest = _with_globals(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    return rest[0] if rest and rest[0] in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """`fer`'s parser; with `command`, only that command's module is loaded and registered."""
    parser = _with_globals(argparse.ArgumentParser(prog="fer",
                                                   description=__doc__.splitlines()[0]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _report_error(exc: FerError) -> None:
    """Tell a runner the error's type (it sees `dvc repro`'s output, not our exit status)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        Path(path).write_text(json.dumps({"type": type(exc).__name__,
                                          "transient": exc.transient, "message": str(exc)}))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("great_expectations", "mlflow.utils", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except FerError as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        _report_error(exc)
        print(f"fer {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_TRANSIENT if exc.transient else EXIT_ERROR
    except KeyboardInterrupt:
        print(f"fer {args.command}: interrupted", file=sys.stderr)
        return 130

