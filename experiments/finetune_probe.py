"""Fine-tune a trained fernet with another recipe, then blend it with where it started
(WiSE-FT), and score every result on validation: a robustness lever that starts from the
champion instead of paying a full training for each try (every robustness lever trained from
scratch at the full recipe cost clean accuracy).

The fine-tune is the project's own `train_model` on params.yaml's recipe plus `-S` overrides
(e.g. fewer epochs, a lower learning rate, stronger augmentation, distillation); the one thing
this script adds is that the network's weights start from `--init` (layers matched by name; a
layer missing from it stops the run). With `distill.weight` > 0 the teachers' probabilities
are computed first with `teach_model`, into the workspace. `--wise A ...` then writes the
weight-space blends (1 - A) * init + A * fine-tuned (every float weight, batch-norm statistics
included; Wortsman et al. 2022) and `fernet_ablation.py --score` scores the fine-tuned model
and the blends on the validation split with the corruption suite, appending its table to
`--results` (default: experiments/journal.md). The test set is never read; in the checkout
only `--results` is written. Run from the project root with benchmarks/ on the path:

    PYTHONPATH=benchmarks python experiments/finetune_probe.py -S models.fernet.epochs=10 \
        -S models.fernet.learning_rate=0.0005 -S models.fernet.warmup_epochs=0 \
        -S models.fernet.augmentation.rotation=30 --wise 0.3 0.5 --suite 2000
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import common

from fer_pipeline import params as P
from fer_pipeline.arrays import PROCESSED_DIR, split_path
from fer_pipeline.errors import FerError


def layers_by_name(path: Path) -> dict:
    """The layers of a saved model by name: how both the start and the blend match weights."""
    import keras

    return {layer.name: layer for layer in keras.saving.load_model(path, compile=False).layers}


def start_from(init: Path):
    """A `build_model` that returns the usual network with `init`'s weights in it."""
    import fer_pipeline.train.models as models

    build = models.build_model

    def build_model(*args, **kwargs):
        built = build(*args, **kwargs)
        source = layers_by_name(init)
        with_weights = [layer for layer in built.model.layers if layer.weights]
        missing = [layer.name for layer in with_weights if layer.name not in source]
        if missing:
            raise FerError(f"{init}: no layer(s) {', '.join(missing)}: not the same architecture")
        for layer in with_weights:
            layer.set_weights(source[layer.name].get_weights())
        print(f"weights of {len(with_weights)} layers from {init}", flush=True)
        return built

    return build_model


def blend(init: Path, tuned: Path, alpha: float, out: Path) -> Path:
    """(1 - alpha) * init + alpha * tuned, saved as `out` (tuned's architecture and dtypes)."""
    import keras

    model = keras.saving.load_model(tuned, compile=False)
    source = layers_by_name(init)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([(1 - alpha) * a + alpha * t if t.dtype.kind == "f" else t
                               for a, t in zip(source[layer.name].get_weights(),
                                               layer.get_weights(), strict=True)])
    model.save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", type=Path, default=common.ROOT / "teachers" / "fernet-v2.keras",
                    help="the trained model the fine-tune starts from (default: %(default)s)")
    ap.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override of params.yaml (e.g. models.fernet.epochs=10)")
    ap.add_argument("--wise", nargs="*", type=float, default=[], metavar="ALPHA",
                    help="also score the blends (1 - ALPHA) * init + ALPHA * fine-tuned")
    ap.add_argument("--suite", type=int, default=2000, metavar="N",
                    help="corruption suite on N validation images (0: off)")
    ap.add_argument("--params", type=Path, default=common.ROOT / "params.yaml")
    ap.add_argument("--processed", type=Path, default=common.ROOT / PROCESSED_DIR)
    ap.add_argument("--workspace", type=Path, help="where models go (default: a new temp dir)")
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="file to append to")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")   # the stages' progress (epochs, ETA)

    p = P.load(args.params, P.parse_overrides(args.sets))   # bad overrides fail before work
    if not args.init.is_file():
        raise SystemExit(f"--init {args.init}: no such file")
    work = args.workspace or Path(tempfile.mkdtemp(prefix="fer-finetune-"))
    print(f"workspace: {work}", flush=True)
    mp = p.model("fernet")
    os.environ.setdefault("FER_PIPELINE_RUN_ID", f"finetune-{datetime.now():%Y%m%d-%H%M}")
    if mp.distill.on:
        from fer_pipeline.teach import teach_model

        teach_model("fernet", mp.distill, split_path(args.processed, "train"), work / "teacher")

    import fer_pipeline.train.models as models
    from fer_pipeline.train.stage import train_model

    models.build_model = start_from(args.init)
    res = train_model("fernet", mp, p.train, None, processed_dir=args.processed,
                      models_dir=work / "models", reports_dir=work / "reports",
                      state_dir=work / "state", teacher_dir=work / "teacher")
    tuned = res.model_path
    scored = [tuned, *(blend(args.init, tuned, a, work / f"wise{a:g}.keras") for a in args.wise)]
    print(f"fine-tuned: val {res.metrics['val_accuracy']:.4f} (best epoch "
          f"{res.metrics['best_epoch']} of {res.metrics['epochs_run']}, "
          f"{res.metrics['train_seconds']:.0f} s, {res.metrics['cpu_seconds_per_epoch']} CPU s "
          f"per epoch); scoring {len(scored)} model(s)", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("fernet_ablation.py")),
                    "--params", str(args.params), "--only", "--suite", str(args.suite),
                    "--processed", str(args.processed), "--results", str(args.results),
                    "--score", *map(str, scored)], check=True)


if __name__ == "__main__":
    main()
