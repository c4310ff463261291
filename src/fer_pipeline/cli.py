"""`fer`: one subcommand per pipeline stage, plus `predict` and `run`.

The only module that knows argparse. Each handler loads params.yaml once (`params.load`) and
calls its stage's one function; stage modules are imported inside the handler, so a stage
loads only its own code (what dvc.yaml lists as its deps) and `fer --help` stays fast. Errors
the user can act on (`FerError`) print as one line; anything else is a bug and shows its
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fer_pipeline import params as P
from fer_pipeline.errors import ERROR_FILE_ENV, EXIT_ERROR, EXIT_TRANSIENT, FerError

PROCESSED_DIR = Path("data/processed")   # dvc.yaml's split outs (arrays.PROCESSED_DIR; not imported:
                                         # every stage would then load arrays.py)
TEACHER_DIR = Path("data/teacher")       # teach@<name>'s outs (soft_labels.TEACHER_DIR; likewise)


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


def _train(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    names = list(p.models) if args.all else args.model
    if not names:
        raise FerError("give --model NAME (repeatable) or --all")
    recipes = {n: p.model(n) for n in names}   # every name checked before anything trains
    from fer_pipeline.train.stage import train_model

    for name, recipe in recipes.items():
        train_model(name, recipe, p.train, p.mlflow, processed_dir=args.processed_dir)


def _teach(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    names = list(p.models) if args.all else args.model
    if not names:
        raise FerError("give --model NAME (repeatable) or --all")
    recipes = {n: p.model(n) for n in names}
    from fer_pipeline.teach import teach_model

    for name, recipe in recipes.items():
        teach_model(name, recipe.distill, args.processed_dir / "train.npz", args.out_dir)


def _evaluate(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.evaluate.stage import evaluate_models

    result = evaluate_models(p.models, p.train, p.mlflow, p.evaluate, p.registry,
                             names=args.model, register=False if args.no_register else None,
                             promote=True if args.promote else None)
    print((result.reports_dir / "comparison.md").read_text())


def _promote(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.evaluate.registry import promote
    from fer_pipeline.tracking import setup_tracking

    setup_tracking(p.mlflow.tracking_uri, p.mlflow.experiment, p.mlflow.probe_timeout_s)
    print(promote(p.registry, args.reason, version=args.version,
                  to_previous=args.to == "previous").message)


def _predict(args: argparse.Namespace) -> int:
    import contextlib

    # Outside a project (no params.yaml) predict still works, with the declared defaults.
    p = P.load(args.params) if args.params != "params.yaml" or Path(args.params).is_file() \
        else P.Params()
    from fer_pipeline.predict import Progress, predict_files

    out = sys.stdout          # only results go here; anything a library prints goes to stderr
    progress = Progress(sys.stderr)
    csv_writer = None

    def emit(result: dict, done: int, total: int) -> None:
        nonlocal csv_writer
        progress(result, done, total)
        if not result.get("ok"):
            print(f"fer predict: {result['path']}: {result['error']}", file=sys.stderr)
        elif not result["faces"]:
            print(f"fer predict: {result['path']}: no face found", file=sys.stderr)
        if args.format == "jsonl":
            out.write(json.dumps(result) + "\n")
            out.flush()
        elif args.format == "csv":
            if csv_writer is None:
                csv_writer = _CsvFaces(out, p.data.classes)
            csv_writer.write(result)

    with contextlib.redirect_stdout(sys.stderr):   # Keras/MLflow progress bars, prints
        report = predict_files(args.paths, args.model, p.data.classes, p.registry, p.mlflow,
                               detect=not args.no_detect, annotate_out=args.annotate,
                               limits=p.predict, on_result=emit, tta=args.tta)
    if args.format == "json":
        out.write(json.dumps(report, indent=2) + "\n")
    out.flush()
    return 0 if any(r["ok"] for r in report["results"]) else 1


def _export(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.export import export_release

    out = export_release(p.models, p.train, p.evaluate, p.registry, args.out, args.model,
                         root=Path(args.params).parent)
    man = json.loads((out / "model.json").read_text())
    print(f"released {man['model']} (val {man['metrics'].get('val_accuracy', 0):.4f}, test "
          f"{man['metrics'].get('test_accuracy', 0):.4f}) to {out}/: "
          f"{', '.join(sorted(f.name for f in out.iterdir()))}; commit it with git")


def _serve(args: argparse.Namespace) -> int:
    import dataclasses

    p = P.load(args.params) if args.params != "params.yaml" or Path(args.params).is_file() \
        else P.Params()
    serve = dataclasses.replace(p.serve, **{k: v for k, v in (("host", args.host),
                                                                ("port", args.port)) if v})
    from fer_pipeline.predict import resolve_classifier
    from fer_pipeline.serve import run

    clf = resolve_classifier(args.model, p.data.classes, p.registry, p.mlflow, p.predict, args.tta)
    card = None
    if clf.release_dir:
        from fer_pipeline.release import release_card

        card = release_card(clf.release_dir)
    run(clf, serve, p.predict, card)
    return 0


class _CsvFaces:
    """One row per face (a file without faces, or that failed: one row, emotion empty)."""

    def __init__(self, stream, classes: list[str]) -> None:
        import csv

        self.classes = classes
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(["path", "ok", "face", "x", "y", "w", "h", "emotion", "confidence",
                              *[f"p_{c}" for c in classes], "message"])

    def write(self, r: dict) -> None:
        note = r.get("error") or r.get("message") or ""
        faces = r.get("faces") or []
        if not faces:
            self.writer.writerow([r["path"], r.get("ok", False), "", "", "", "", "", "", "",
                                  *[""] * len(self.classes), note])
        for k, f in enumerate(faces):
            b = f["box"]
            self.writer.writerow([r["path"], True, k, b["x"], b["y"], b["w"], b["h"], f["emotion"],
                                  f["confidence"], *[f["probabilities"].get(c, "")
                                                     for c in self.classes], note])


def _run(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from fer_pipeline.profiles import dvc_command, experiment_name, load_profile
    from fer_pipeline.tracking import resolve_tracking_uri

    overrides = {**(load_profile(args.profile) if args.profile else {}),
                 **P.parse_overrides(args.sets)}
    p = P.load(args.params, overrides)   # a typo fails here, not inside `dvc exp run`
    name = args.name or experiment_name(args.profile)
    cmd = dvc_command(overrides, args.targets, args.queue, name)
    print("$ " + shlex.join(cmd), flush=True)
    if args.dry:
        return 0
    # Fetch from the checkout, where relative remote URLs resolve, into the cache the temporary
    # copy shares: the raw images from `fer2013`, outputs others pushed to `storage` (what no
    # remote has is rebuilt by the run; DVC lists those as missing).
    print("$ dvc fetch", flush=True)
    if subprocess.call(["dvc", "fetch"]) != 0:
        raise FerError("`dvc fetch` failed (above): the run needs the raw images from the "
                       "`fer2013` remote. Check `dvc remote list`; a copy elsewhere: `dvc remote "
                       "modify --local fer2013 url /path/to/dvc-remote`.")
    # The experiment runs in a temporary copy without the checkout's (gitignored) MLflow store:
    # point it at the checkout's store, resolved here.
    env = {**os.environ, "MLFLOW_TRACKING_URI": resolve_tracking_uri(p.mlflow.tracking_uri)}
    rc = subprocess.call(cmd, env=env)
    if rc == 0 and not args.queue:
        print(f"\nexperiment {name}: the checkout is unchanged. Compare: `dvc exp show`; its "
              f"reports: `git show $(git for-each-ref --format='%(refname)' refs/exps | grep "
              f"/{name}$):reports/evaluate/comparison.md`; take it over: `dvc exp apply {name}`; "
              f"MLflow: runs tagged pipeline_run_id in {env['MLFLOW_TRACKING_URI']}")
        print(_registry_line(name))
    return rc


def _registry_line(experiment: str) -> str:
    """What the run's evaluate did to the registry's champion, from the experiment's
    reports/evaluate/champion.json (a profile run must say that it left the alias alone)."""
    import subprocess

    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
                          capture_output=True, text=True).stdout.split()
    ref = next((r for r in refs if r.endswith(f"/{experiment}")), None)
    shown = subprocess.run(["git", "show", f"{ref}:reports/evaluate/champion.json"],
                           capture_output=True, text=True) if ref else None
    if not shown or shown.returncode != 0:
        return "registry: this run did not evaluate (no reports/evaluate/champion.json)"
    info = json.loads(shown.stdout)
    outcome = info.get("registry") or {}
    decision, reason = info.get("decision"), info.get("reason")
    if not outcome:
        return f"registry: nothing registered (candidate {info.get('champion')})"
    if decision == "promoted":
        return (f"registry: {outcome.get('champion')} (v{outcome.get('version')}) is now "
                f"@champion: {reason}")
    before = outcome.get("champion_before") or {}
    where = (f"v{before.get('version')} ({before.get('model')})" if before.get("version")
             else "no version")
    return (f"registry: @champion unchanged, still {where}; candidate {outcome.get('champion')} "
            f"v{outcome.get('version')}: {decision} ({reason})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fer", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("train", help="train models.<NAME> on the split arrays (MLflow)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="model key under `models:` in params.yaml (repeatable)")
    p.add_argument("--all", action="store_true", help="train every model in params.yaml")
    p.add_argument("--processed-dir", type=Path, default=PROCESSED_DIR,
                   help="directory of train/val npz (default: %(default)s)")
    p.set_defaults(func=_train)

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

    p = sub.add_parser("promote", help="move the registry's champion alias by hand (rollback)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", choices=["previous"], help="roll back to @previous")
    target.add_argument("--version", help="registered version number to make @champion")
    p.add_argument("--reason", required=True, help="why (recorded on the version)")
    p.set_defaults(func=_promote)

    p = sub.add_parser("predict", help="classify the emotion of faces in photos (JSON)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files (photos or 48x48 crops) or folders (searched recursively)")
    p.add_argument("--format", choices=["json", "jsonl", "csv"], default="json",
                   help="stdout: one JSON document (default), JSON lines as files finish, or CSV "
                        "(one row per face)")
    p.add_argument("--model", default=None,
                   help="local .keras file, MLflow model folder or MLflow URI "
                        "(default: models:/<registry.model_name>@<registry.champion_alias>)")
    p.add_argument("--annotate", metavar="OUT", default=None,
                   help="write the photo with boxes and labels: a file for one input, else a "
                        "folder (<stem>_annotated.png)")
    p.add_argument("--tta", choices=["none", "flip", "flip_crops"], default=None,
                   help="test-time augmentation (default: the release's, else none)")
    p.add_argument("--no-detect", action="store_true",
                   help="no face detection: classify each whole image as one face")
    p.set_defaults(func=_predict)

    p = sub.add_parser("serve", help="HTTP service + web page: POST /predict, GET / (127.0.0.1)")
    p.add_argument("--model", default=None, help="as for `fer predict` (default: the champion)")
    p.add_argument("--host", default=None, help="bind address (default: params serve.host, "
                                                 "127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=None, help="port (default: params serve.port)")
    p.add_argument("--tta", choices=["none", "flip", "flip_crops"], default=None,
                   help="test-time augmentation (default: the release's, else none)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("export", help="write the evaluated champion to release/ (commit it)")
    p.add_argument("--model", default=None, help="an evaluated model (default: the champion)")
    p.add_argument("--out", default="release", help="bundle folder (default: %(default)s)")
    p.set_defaults(func=_export)

    p = sub.add_parser("run", help="run the pipeline as a DVC experiment, optionally with a profile")
    p.add_argument("--profile", help="profile name from profiles/ (e.g. quick)")
    p.add_argument("-S", "--set", dest="sets", action="append", default=[],
                   metavar="KEY=VALUE", help="extra param override (repeatable)")
    p.add_argument("--queue", action="store_true", help="queue instead of running now")
    p.add_argument("-n", "--name", help="experiment name (default: run-<profile>-<UTC time>)")
    p.add_argument("--dry", action="store_true", help="print the dvc command only")
    p.add_argument("targets", nargs="*", help="stages to run (default: the whole pipeline)")
    p.set_defaults(func=_run)

    p = sub.add_parser("worker", help="a Prefect worker that states its devices first (pool gpu: "
                                      "refuses to start without a GPU)")
    p.add_argument("--pool", default="gpu", help="work pool (default: %(default)s)")
    p.add_argument("--queue", help="only this work queue (e.g. train)")
    p.add_argument("--limit", type=int, help="flow runs at once on this worker")
    p.add_argument("--name", help="worker name (default: Prefect's)")
    p.add_argument("--allow-no-gpu", action="store_true",
                   help="start on a machine without a GPU (trainings on CPU); "
                        "or FER_WORKER_ALLOW_NO_GPU=1")
    p.set_defaults(func=_worker)
    return parser


def _worker(args: argparse.Namespace) -> int:
    from fer_pipeline.backend import requested
    from fer_pipeline.worker import allowed_by_env, check_devices, prefect_command

    train = P.load(args.params).train if Path(args.params).is_file() else P.TrainParams()
    backend = requested(train.backend)
    allow = args.allow_no_gpu or allowed_by_env()
    found = check_devices(args.pool, backend, allow)
    print(f"fer worker: pool {args.pool}, Keras backend {backend}, devices: "
          + "; ".join(map(str, found)), file=sys.stderr)
    if not any(d.kind == "gpu" for d in found) and allow:
        print("fer worker: no GPU, allowed: trainings run on this machine's CPU", file=sys.stderr)
    # The flow runs this worker starts train on what was checked here.
    os.environ["KERAS_BACKEND"] = backend
    cmd = prefect_command(args.pool, args.queue, args.limit, args.name)
    print("fer worker: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def _report_error(exc: FerError) -> None:
    """Tell a runner the error's type (it sees `dvc repro`'s output, not our exit status)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        Path(path).write_text(json.dumps({"type": type(exc).__name__,
                                          "transient": exc.transient, "message": str(exc)}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
