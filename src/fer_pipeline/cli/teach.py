"""`fer teach`: the teach@<model> stages' command (distillation targets)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fer_pipeline import params as P
from fer_pipeline.cli import PROCESSED_DIR
from fer_pipeline.errors import FerError
from fer_pipeline.soft_labels import TEACHER_DIR  # the stage loads it anyway (teach.py)


def _teach(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    names = list(p.models) if args.all else args.model
    if not names:
        raise FerError("give --model NAME (repeatable) or --all")
    recipes = {n: p.model(n) for n in names}
    from fer_pipeline.teach import teach_model

    for name, recipe in recipes.items():
        teach_model(name, recipe.distill, args.processed_dir / "train.npz", args.out_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teach", help="teacher probabilities on the train split for "
                                     "models.<NAME>.distill (distillation)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="model key under `models:` in params.yaml (repeatable)")
    p.add_argument("--all", action="store_true", help="every model in params.yaml")
    p.add_argument("--processed-dir", type=Path, default=PROCESSED_DIR,
                   help="directory of train.npz (default: %(default)s)")
    p.add_argument("--out-dir", type=Path, default=TEACHER_DIR,
                   help="where NAME.npz goes (default: %(default)s; train reads it there)")
    p.set_defaults(func=_teach)
