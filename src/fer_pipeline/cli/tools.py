"""The commands that are not pipeline stages: `fer promote`, `predict`, `serve`, `export`,
`run`, `worker`, `schemas`. No dvc.yaml stage loads this module, so editing one of them reruns
nothing."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fer_pipeline import params as P
from fer_pipeline.errors import FerError


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
    from fer_pipeline.artifacts.answers import ImageAnswer
    from fer_pipeline.predict import Progress, predict_files

    out = sys.stdout          # only results go here; anything a library prints goes to stderr
    progress = Progress(sys.stderr)
    csv_writer = None

    def emit(result: ImageAnswer, done: int, total: int) -> None:
        nonlocal csv_writer
        progress(result, done, total)
        if not result.ok:
            print(f"fer predict: {result.path}: {result.error}", file=sys.stderr)
        elif not result.faces:
            print(f"fer predict: {result.path}: no face found", file=sys.stderr)
        if args.format == "jsonl":
            out.write(json.dumps(result.to_data(), default=str) + "\n")
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
        out.write(report.to_json() + "\n")
    out.flush()
    return 0 if any(r.ok for r in report.results) else 1


def _export(args: argparse.Namespace) -> None:
    p = P.load(args.params)
    from fer_pipeline.export import export_release, refresh_card
    from fer_pipeline.release import read_release

    root = Path(args.params).parent
    if args.card_only:
        if args.model:
            raise FerError("--card-only re-renders the release in --out: no --model")
        out = refresh_card(args.out, p.models, p.train, p.evaluate, p.predict, root=root)
        print(f"re-rendered {out}/MODEL_CARD.md and {out}/model.json (model files untouched); "
              f"commit them with git")
        return
    out = export_release(p.models, p.train, p.evaluate, p.registry, args.out, args.model,
                         root=root, predict=p.predict)
    man = read_release(out)
    print(f"released {man.model} (val {man.metrics.val_accuracy or 0:.4f}, test "
          f"{man.metrics.test_accuracy:.4f}) to {out}/: "
          f"{', '.join(sorted(f.name for f in out.iterdir()))}; commit it with git")


def _serve(args: argparse.Namespace) -> int:
    p = P.load(args.params) if args.params != "params.yaml" or Path(args.params).is_file() \
        else P.Params()
    serve = p.serve.model_copy(update={k: v for k, v in (("host", args.host),
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

    def write(self, r) -> None:
        note = r.error or r.message or ""
        faces = r.faces or []
        if not faces:
            self.writer.writerow([r.path, r.ok, "", "", "", "", "", "", "",
                                  *[""] * len(self.classes), note])
        for k, f in enumerate(faces):
            b = f.box
            self.writer.writerow([r.path, True, k, b.x, b.y, b.w, b.h, f.emotion, f.confidence,
                                  *[f.probabilities.get(c, "") for c in self.classes], note])


def _run(args: argparse.Namespace) -> int:
    """The pipeline in a copy of the checkout (runner.engine, the flow's engine), recorded as a
    DVC experiment; the checkout's params.yaml, dvc.lock and outputs are not written."""
    from fer_pipeline.profiles import experiment_name, load_profile
    from fer_pipeline.runner import engine

    overrides = {**(load_profile(args.profile) if args.profile else {}),
                 **P.parse_overrides(args.sets)}
    P.load(args.params, overrides)   # a typo fails here, before anything is copied
    name = args.name or experiment_name(args.profile)
    checkout = Path.cwd()
    if args.dry:
        for step in engine.dry_plan(checkout, args.targets or None):
            print(("in parallel: " if step.parallel else "") + " ".join(step.stages))
        return 0
    # The run id is the experiment's name: the same `fer run -n NAME` after a crash takes over
    # the kept run copy, and its trainings resume from their last epoch.
    run = engine.open_run(checkout, name, overrides, targets=args.targets or None, pull=True,
                          log=print)
    try:
        results = engine.run_all(run, log=print)
    except FerError as exc:
        raise FerError(f"{exc}\nThe run copy stays at {run.copy}: `fer run -n {name}` with the "
                       f"same arguments resumes there; `git worktree remove --force {run.copy}` "
                       f"drops it") from None
    done = engine.finish(run, experiment=name, ran=[r["stage"] for r in results
                                                    if r["status"] == "ran"], log=print)
    if not done["experiment"]:
        raise FerError(f"the run finished but was not recorded: {done['not_saved']}. Its "
                       f"results stay in the run copy {run.copy}")
    engine.close(run)
    uri = run.env()["MLFLOW_TRACKING_URI"]
    print(f"\nexperiment {name}: the checkout is unchanged. Compare: `dvc exp show`; its "
          f"reports: `git show $(git for-each-ref --format='%(refname)' refs/exps | grep "
          f"/{name}$):reports/evaluate/comparison.md`; take it over: `dvc exp apply {name}`; "
          f"MLflow: runs tagged pipeline_run_id = {name} in {uri}")
    print(_registry_line(name))
    return 0


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
    from fer_pipeline.artifacts.evaluation import ChampionRecord, Decision

    info = ChampionRecord.from_json(shown.stdout, f"{ref}:reports/evaluate/champion.json")
    outcome = info.registry
    if outcome is None:
        return f"registry: nothing registered (candidate {info.champion})"
    if info.decision is Decision.PROMOTED:
        return (f"registry: {outcome.champion} (v{outcome.version}) is now @champion: "
                f"{info.reason}")
    before = outcome.champion_before
    where = f"v{before.version} ({before.model})" if before else "no version"
    return (f"registry: @champion unchanged, still {where}; candidate {outcome.champion} "
            f"v{outcome.version}: {info.decision} ({info.reason})")


def _schemas(args: argparse.Namespace) -> int:
    """Write the JSON Schemas of params.yaml and the artifacts, or (--check) fail when the
    committed ones are not what the models give."""
    from fer_pipeline.artifacts import schemas

    if args.check:
        stale = schemas.stale(args.out)
        if stale:
            raise FerError(f"{args.out}: not the schemas of params.py and the artifact models: "
                           f"{', '.join(stale)}; run `fer schemas`")
        print(f"{args.out}: {len(schemas.SCHEMAS) + 1} schemas, current")
        return 0
    for path in schemas.write_all(args.out):
        print(path)
    return 0


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
    # Its flow runs send heartbeats; the server's zombie automation (flows/deploy.py) marks a
    # run whose machine died Crashed within minutes, and the parent retries it elsewhere.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    cmd = prefect_command(args.pool, args.queue, args.limit, args.name)
    print("fer worker: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def register(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--card-only", action="store_true",
                   help="re-render MODEL_CARD.md (and the facts it states in model.json) of the "
                        "release in --out, without exporting the model again")
    p.set_defaults(func=_export)


    p = sub.add_parser("run", help="run the pipeline in a copy of the checkout, recorded as a "
                                   "DVC experiment, optionally with a profile")
    p.add_argument("--profile", help="profile name from profiles/ (e.g. quick)")
    p.add_argument("-S", "--set", dest="sets", action="append", default=[],
                   metavar="KEY=VALUE", help="extra param override (repeatable)")
    p.add_argument("-n", "--name", help="experiment name (default: run-<profile>-<UTC time>)")
    p.add_argument("--dry", action="store_true", help="print the stages it would run, in order")
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

    p = sub.add_parser("schemas", help="write the JSON Schemas of the artifacts and answers "
                                       "(docs/schemas/)")
    p.add_argument("--out", default="docs/schemas", help="folder (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when the files there are not current")
    p.set_defaults(func=_schemas)
