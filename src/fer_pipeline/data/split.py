"""split: the cleaned training folder -> stratified train/validation; the test folder -> test.

Decodes the kept images once into uint8 arrays (data/processed/*.npz) that training loads in
a fraction of a second. The test set keeps each image's PublicTest/PrivateTest origin and
clean's problem flags.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from fer_pipeline.arrays import TEST_FLAGS, SplitArrays, save_split, split_path
from fer_pipeline.data.images import ImageDecodeError, read_image, to_dataset_image
from fer_pipeline.errors import FerError, MissingInputError
from fer_pipeline.io import write_text
from fer_pipeline.params import CleanParams, DataParams, SplitParams

log = logging.getLogger(__name__)


def cap_per_class(df: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """At most `cap` rows per label (seeded sample); None keeps all."""
    if cap is None:
        return df
    parts = [g.sample(n=min(cap, len(g)), random_state=seed) for _, g in df.groupby("label")]
    return pd.concat(parts).sort_values("relpath") if parts else df


def assign_splits(kept: pd.DataFrame, data: DataParams, params: SplitParams) -> dict[str, pd.DataFrame]:
    """Pure: which kept file goes to train, val or test."""
    train_folder = cap_per_class(kept[kept["split"] == "train"], data.max_per_class, params.seed)
    caps = [c for c in (data.max_per_class, data.max_test_per_class) if c is not None]
    test = cap_per_class(kept[kept["split"] == "test"], min(caps) if caps else None, params.seed)
    counts = train_folder["label"].value_counts()
    too_small = counts[counts < 2]
    if len(train_folder) == 0 or len(too_small):
        raise FerError(
            "cannot stratify the train/validation split: classes with fewer than 2 kept "
            f"training images: {dict(too_small) or 'all (no training images kept)'}")
    train, val = train_test_split(
        train_folder.sort_values("relpath"), test_size=params.val_fraction,
        stratify=train_folder.sort_values("relpath")["label"], random_state=params.seed)
    return {"train": train.sort_values("relpath"), "val": val.sort_values("relpath"),
            "test": test.sort_values("relpath")}


class RawDataChanged(FerError):
    """A file clean kept no longer decodes as clean saw it: the inputs changed since clean."""


def _decode(args: tuple[str, int, bool]) -> np.ndarray:
    path, size, resize = args
    try:
        gray, _ = read_image(path)
        return to_dataset_image(gray, size, resize)
    except ImageDecodeError as exc:
        raise RawDataChanged(
            f"{path}: {exc}. clean kept this file, so the raw data (or clean.size_policy) changed "
            "since clean ran: rerun `fer validate` and `fer clean` (`dvc repro split` does)"
        ) from None


def load_images(root: Path, relpaths: list[str], size: int, resize: bool) -> np.ndarray:
    tasks = [(str(root / r), size, resize) for r in relpaths]
    if len(tasks) > 2000 and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
            images = list(pool.map(_decode, tasks, chunksize=512))
    else:
        images = [_decode(t) for t in tasks]
    if not images:
        return np.zeros((0, size, size, 1), dtype=np.uint8)
    return np.stack(images)[..., None]


def run_split(report_path: Path, out_dir: Path, counts_path: Path, data: DataParams,
              clean: CleanParams, params: SplitParams) -> dict:
    t0 = time.perf_counter()
    if not report_path.is_file():
        raise MissingInputError(f"cleaning report {report_path} not found; run `fer clean` "
                                f"(or `dvc repro clean`) first")
    report = pd.read_csv(report_path, keep_default_na=False, dtype={"split": str, "label": str})
    kept = report[report["decision"] == "kept"]
    parts = assign_splits(kept, data, params)
    index = {c: i for i, c in enumerate(data.classes)}
    counts: dict = {}
    root = Path(data.raw_dir)
    for name, df in parts.items():
        # The test folder is resized rather than reduced (see clean); train follows the policy.
        resize = name == "test" or clean.size_policy == "resize"
        x = load_images(root, df["relpath"].tolist(), data.image_size, resize)
        flags = {f: df[f].astype(str).eq("True").to_numpy() for f in TEST_FLAGS} \
            if name == "test" else {}
        arrays = SplitArrays(
            x=x, y=df["label"].map(index).to_numpy(np.int64), ids=df["relpath"].to_numpy(str),
            origin=df["origin"].to_numpy(str), classes=list(data.classes), flags=flags)
        save_split(split_path(out_dir, name), arrays)
        per_class = df["label"].value_counts()
        counts[name] = {"total": int(len(df)),
                        **{c: int(per_class.get(c, 0)) for c in data.classes}}
        if name == "test":
            counts[name]["PublicTest"] = int((df["origin"] == "PublicTest").sum())
            counts[name]["PrivateTest"] = int((df["origin"] == "PrivateTest").sum())
        log.info("split %s: %d images %s", name, len(df), tuple(x.shape))
    write_text(counts_path, json.dumps(counts, indent=2) + "\n")
    log.info("split done in %.1f s -> %s", time.perf_counter() - t0, out_dir)
    return counts

