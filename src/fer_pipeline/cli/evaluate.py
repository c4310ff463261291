"""`fer evaluate`: the evaluate stage's command (scores, comparison, the registry's champion)."""

from __future__ import annotations

import argparse

from fer_pipeline import params as P


def _evaluate(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.evaluate.stage import evaluate_models

    result = evaluate_models(p.models, p.train, p.mlflow, p.evaluate, p.registry,
                             names=args.model, register=False if args.no_register else None,
                             promote=True if args.promote else None)
    print((result.reports_dir / "comparison.md").read_text())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score trained models on the test split, compare, "
                                        "register the champion")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="evaluate only this model (repeatable; default: every trained model)")
    p.add_argument("--no-register", action="store_true",
                   help="do not touch the model registry (params registry.enabled=false does too)")
    p.add_argument("--promote", action="store_true",
                   help="let this run promote even with registry.promote=false or a --model "
                        "subset (the policy still decides)")
    p.set_defaults(func=_evaluate)
