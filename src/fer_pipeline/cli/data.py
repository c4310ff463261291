"""`fer validate`, `fer clean`, `fer split`: the data stages' commands (their dvc.yaml deps)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fer_pipeline import params as P
from fer_pipeline.cli import PROCESSED_DIR


def _validate(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.data.validate import validate_dataset

    validate_dataset(Path(p.data.raw_dir), p.data, p.validate, args.manifest, args.reports)


def _clean(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.data.clean import run_clean

    run_clean(args.manifest, args.report, args.summary, p.data, p.clean)


def _split(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.data.split import run_split

    run_split(args.report, args.out, args.counts, p.data, p.clean, p.split)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="measure the raw files and run the GX suite")
    p.add_argument("--manifest", type=Path, default=Path("data/interim/manifest.csv"))
    p.add_argument("--reports", type=Path, default=Path("reports/validate"))
    p.set_defaults(func=_validate)

    p = sub.add_parser("clean", help="decide kept/dropped for every raw file")
    p.add_argument("--manifest", type=Path, default=Path("data/interim/manifest.csv"))
    p.add_argument("--report", type=Path, default=Path("data/interim/clean_report.csv"))
    p.add_argument("--summary", type=Path, default=Path("reports/clean/summary.json"))
    p.set_defaults(func=_clean)

    p = sub.add_parser("split", help="stratified train/val split; write uint8 arrays")
    p.add_argument("--report", type=Path, default=Path("data/interim/clean_report.csv"))
    p.add_argument("--out", type=Path, default=PROCESSED_DIR)
    p.add_argument("--counts", type=Path, default=Path("reports/split/counts.json"))
    p.set_defaults(func=_split)
