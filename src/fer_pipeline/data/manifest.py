"""Manifest: one row per file under the raw dataset, with what decoding it found.

The manifest is the single measurement of the raw data; validate checks it, clean decides
on it. Files are walked in full (hidden files and non-images too) so nothing goes unseen.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from fer_pipeline.data.images import ImageDecodeError, pixel_hash, read_image
from fer_pipeline.errors import MissingInputError

log = logging.getLogger(__name__)

COLUMNS = [
    "relpath", "split", "label", "filename", "origin", "ext", "size_bytes", "readable",
    "error", "width", "height", "channels", "mode", "gray_equal", "pixel_mean", "pixel_std",
    "pixel_hash",
]
ORIGIN_RE = re.compile(r"^(Training|PublicTest|PrivateTest)_")


class DatasetMissingError(MissingInputError):
    """The raw dataset folder is absent or empty."""


def origin_of(filename: str) -> str:
    m = ORIGIN_RE.match(filename)
    return m.group(1) if m else ""


def list_files(root: Path) -> list[str]:
    """Every regular file under root, as sorted POSIX paths relative to root."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def list_dirs(root: Path) -> list[str]:
    """Every folder under root (relative), so empty class folders are visible too."""
    return sorted(
        Path(dp).relative_to(root).as_posix() for dp, _d, _f in os.walk(root) if Path(dp) != root
    )


def _measure(args: tuple[str, str]) -> dict:
    root, rel = args
    path = Path(root, rel)
    parts = rel.split("/")
    # A well-placed file is <split>/<class>/<file>; anything else is misplaced.
    split, label = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
    name = parts[-1]
    row = {
        "relpath": rel, "split": split, "label": label, "filename": name,
        "origin": origin_of(name), "ext": Path(name).suffix.lower().lstrip("."),
        "size_bytes": path.stat().st_size, "readable": False, "error": "",
        "width": np.nan, "height": np.nan, "channels": np.nan, "mode": "",
        "gray_equal": False, "pixel_mean": np.nan, "pixel_std": np.nan, "pixel_hash": "",
    }
    if row["size_bytes"] == 0:
        row["error"] = "empty file (0 bytes)"
        return row
    try:
        gray, info = read_image(path)
    except ImageDecodeError as exc:
        row["error"] = str(exc)
        return row
    row.update(
        readable=True, width=info.width, height=info.height, channels=info.channels,
        mode=info.mode, gray_equal=info.gray_equal, pixel_mean=float(gray.mean()),
        pixel_std=float(gray.std()), pixel_hash=pixel_hash(gray),
    )
    return row


def build_manifest(raw_dir: str | Path, workers: int | None = None) -> pd.DataFrame:
    root = Path(raw_dir)
    if not root.is_dir():
        raise DatasetMissingError(
            f"dataset folder {root} does not exist. Get it with `dvc pull data/raw/fer2013.dvc` "
            "(team remote) or from Kaggle msambare/fer2013 (see README, 'Getting the data')."
        )
    files = list_files(root)
    if not files:
        raise DatasetMissingError(f"dataset folder {root} holds no files; run `dvc pull`.")
    workers = workers or min(4, os.cpu_count() or 1)
    t0 = time.perf_counter()
    tasks = [(str(root), rel) for rel in files]
    if workers > 1 and len(files) > 2000:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_measure, tasks, chunksize=512))
    else:
        rows = [_measure(t) for t in tasks]
    df = pd.DataFrame(rows, columns=COLUMNS)
    log.info("manifest: %d files measured in %.1f s (%d workers)", len(df),
             time.perf_counter() - t0, workers)
    return df


def read_manifest(path: str | Path) -> pd.DataFrame:
    if not Path(path).is_file():
        raise MissingInputError(f"manifest {path} not found; run `fer validate` (or `dvc repro "
                                f"validate`) first")
    return pd.read_csv(path, keep_default_na=False, na_values={"width": [""], "height": [""],
                       "channels": [""], "pixel_mean": [""], "pixel_std": [""]},
                       dtype={"error": str, "pixel_hash": str, "split": str, "label": str,
                              "origin": str, "ext": str, "mode": str})
