"""`fer train`: the train@<model> stages' command (a dvc.yaml dep of those stages only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fer_pipeline import params as P
from fer_pipeline.cli import PROCESSED_DIR
from fer_pipeline.errors import FerError


def _train(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    names = list(p.models) if args.all else args.model
    if not names:
        raise FerError("give --model NAME (repeatable) or --all")
    recipes = {n: p.model(n) for n in names}   # every name checked before anything trains
    from fer_pipeline.train.stage import train_model

    for name, recipe in recipes.items():
        train_model(name, recipe, p.train, p.mlflow, processed_dir=args.processed_dir)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train models.<NAME> on the split arrays (MLflow)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="model key under `models:` in params.yaml (repeatable)")
    p.add_argument("--all", action="store_true", help="train every model in params.yaml")
    p.add_argument("--processed-dir", type=Path, default=PROCESSED_DIR,
                   help="directory of train/val npz (default: %(default)s)")
    p.set_defaults(func=_train)
