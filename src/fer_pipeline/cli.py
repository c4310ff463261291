"""`fer` console script: one subcommand per pipeline stage.

Each subcommand lives in its stage's module as `add_cli(subparsers)` that registers a parser
with `func=` set; this file only lists the modules, so heavy imports (TensorFlow, MLflow, GX)
happen only for the stage that runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (subcommand, module that defines add_cli). Order = pipeline order in --help.
COMMANDS: list[tuple[str, str]] = [
    ("validate", "fer_pipeline.data.validate"),
    ("clean", "fer_pipeline.data.clean"),
    ("split", "fer_pipeline.data.split"),
    ("train", "fer_pipeline.train.stage"),
    ("evaluate", "fer_pipeline.evaluate.stage"),
    ("predict", "fer_pipeline.predict"),
    ("run", "fer_pipeline.profiles"),
]


class StageError(RuntimeError):
    """A stage failed for a reason the user can act on; printed without a traceback."""


def _lazy_parser(sub: argparse._SubParsersAction, name: str, module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("fer_pipeline"):
            return  # stage not implemented yet
        raise
    mod.add_cli(sub)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module in COMMANDS:
        # Import only the requested stage's module (fast start); all of them for --help.
        if wanted in (None, name) or wanted not in dict(COMMANDS):
            _lazy_parser(sub, name, module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("great_expectations", "mlflow.utils", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (StageError, FileNotFoundError, ValueError) as exc:
        if args.verbose:  # a bug that raises ValueError must stay debuggable
            import traceback

            traceback.print_exc()
        print(f"fer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
