import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_pipeline.arrays import load_split
from fer_pipeline.data.clean import decide, run_clean
from fer_pipeline.data.manifest import build_manifest
from fer_pipeline.data.split import run_split
from fer_pipeline.params import load


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)


@pytest.fixture
def messy_tree(raw_tree: Path) -> Path:
    """The synthetic tree with one file for every cleaning rule."""
    t = raw_tree
    first = sorted((t / "train/happy").iterdir())[0]
    (t / "train/happy/readme.txt").write_text("notes")                       # unreadable
    Image.fromarray(np.full((48, 48), 77, np.uint8)).save(t / "train/sad/Training_9001.bmp")
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(t / "train/sad/Training_9002.png")
    Image.fromarray(np.zeros((60, 60), np.uint8) + np.eye(60, dtype=np.uint8) * 99).save(
        t / "train/sad/Training_9003.png")                                    # wrong size
    _copy(first, t / "train/happy/Training_9004.jpg")                         # duplicate
    conflict = sorted((t / "train/angry").iterdir())[0]
    _copy(conflict, t / "train/fear/Training_9005.jpg")                       # label conflict
    leak = sorted((t / "test/surprise").iterdir())[0]
    _copy(leak, t / "train/surprise/Training_9006.jpg")                       # test leak
    (t / "stray.jpg").write_bytes(first.read_bytes())                         # misplaced
    (t / "test/neutral/PublicTest_9007.jpg").write_bytes(b"\xff\xd8 garbage")  # test unreadable
    return t


def test_every_rule_and_every_file_accounted(tmp_path, params_file, messy_tree):
    p = load(params_file)
    manifest = build_manifest(messy_tree)
    report = decide(manifest, p.data, p.clean)
    assert len(report) == len(manifest)
    by = report.set_index("relpath")
    assert by.loc["train/happy/readme.txt", "reason"] == "unreadable"
    assert by.loc["train/sad/Training_9001.bmp", "reason"] == "extension_not_allowed"
    assert by.loc["train/sad/Training_9002.png", "reason"] == "near_blank"
    assert by.loc["train/sad/Training_9003.png", "reason"] == "wrong_size"
    assert by.loc["train/happy/Training_9004.jpg", "reason"] == "duplicate"
    assert by.loc["train/fear/Training_9005.jpg", "reason"] == "label_conflict"
    assert by.loc["train/surprise/Training_9006.jpg", "reason"] == "test_leak"
    assert by.loc["stray.jpg", "reason"] == "misplaced"
    assert by.loc["test/neutral/PublicTest_9007.jpg", "reason"] == "unreadable"
    # the conflicting picture's other copy goes too; the duplicate's first copy stays
    conflict_src = sorted((messy_tree / "train/angry").iterdir())[0].name
    assert by.loc[f"train/angry/{conflict_src}", "reason"] == "label_conflict"
    first = sorted((messy_tree / "train/happy").iterdir())[0].name
    assert by.loc[f"train/happy/{first}", "decision"] == "kept"
    # test folder stays whole except unreadable, and carries flags
    test = report[report["split"] == "test"]
    assert set(test.loc[test["decision"] == "dropped", "reason"]) == {"unreadable"}
    leak = sorted((messy_tree / "test/surprise").iterdir())[0].name
    assert by.loc[f"test/surprise/{leak}", "flag_leak"]
    assert every_reason_has_detail(report)


def every_reason_has_detail(report: pd.DataFrame) -> bool:
    dropped = report[report["decision"] == "dropped"]
    return bool((dropped["detail"].str.len() > 0).all())


def test_size_policy_resize_keeps_wrong_size(tmp_path, params_file, messy_tree):
    p = load(params_file)
    report = decide(build_manifest(messy_tree), p.data, p.clean.model_copy(update={"size_policy": "resize"}))
    assert report.set_index("relpath").loc["train/sad/Training_9003.png", "decision"] == "kept"


def test_clean_then_split_writes_arrays_and_metrics(tmp_path, params_file, messy_tree):
    p = load(params_file)
    manifest = tmp_path / "manifest.csv"
    build_manifest(messy_tree).to_csv(manifest, index=False)
    summary = run_clean(manifest, tmp_path / "report.csv", tmp_path / "clean.json",
                        p.data, p.clean)
    assert summary["train"]["dropped_by_reason"]["duplicate"] == 1
    assert summary["total_input"] == summary["total_kept"] + summary["train"]["dropped"] + \
        summary["test"]["dropped"] + summary["misplaced"]["dropped"]
    counts = run_split(tmp_path / "report.csv", tmp_path / "proc", tmp_path / "counts.json",
                       p.data, p.clean, p.split)
    train, val, test = (load_split(tmp_path / "proc" / f"{s}.npz") for s in ("train", "val", "test"))
    assert train.x.shape[1:] == (48, 48, 1) and train.x.dtype == np.uint8
    assert len(train) + len(val) == summary["train"]["kept"]
    assert len(test) == summary["test"]["kept"] == 7 * 4
    assert set(test.origin) == {"PublicTest", "PrivateTest"}
    assert test.flags["flag_leak"].sum() == 1
    assert not set(train.ids) & set(val.ids)
    assert set(np.unique(val.y)) == set(range(7))  # stratified: every class in validation
    assert counts["val"]["total"] == len(val)
    assert json.loads((tmp_path / "counts.json").read_text()) == counts


def test_split_is_seeded_and_capped(tmp_path, params_file, raw_tree):
    p = load(params_file)
    manifest = tmp_path / "m.csv"
    build_manifest(raw_tree).to_csv(manifest, index=False)
    run_clean(manifest, tmp_path / "r.csv", tmp_path / "c.json", p.data, p.clean)
    data = p.data.model_copy(update={"max_per_class": 5})
    run_split(tmp_path / "r.csv", tmp_path / "a", tmp_path / "a.json", data, p.clean, p.split)
    run_split(tmp_path / "r.csv", tmp_path / "b", tmp_path / "b.json", data, p.clean, p.split)
    a, b = load_split(tmp_path / "a/val.npz"), load_split(tmp_path / "b/val.npz")
    np.testing.assert_array_equal(a.ids, b.ids)
    assert len(load_split(tmp_path / "a/train.npz")) + len(a) == 7 * 5
    assert len(load_split(tmp_path / "a/test.npz")) == 7 * 4  # 4 < cap 5
    # A test-only cap shrinks the test split and leaves train and val as they were.
    run_split(tmp_path / "r.csv", tmp_path / "c", tmp_path / "c.json",
              data.model_copy(update={"max_test_per_class": 2}), p.clean, p.split)
    assert len(load_split(tmp_path / "c/test.npz")) == 7 * 2
    np.testing.assert_array_equal(load_split(tmp_path / "c/val.npz").ids, a.ids)


def test_a_crash_while_writing_keeps_the_previous_good_output(tmp_path, params_file, raw_tree,
                                                             monkeypatch):
    p = load(params_file)
    manifest = tmp_path / "m.csv"
    build_manifest(raw_tree).to_csv(manifest, index=False)
    report = tmp_path / "r.csv"
    run_clean(manifest, report, tmp_path / "c.json", p.data, p.clean)
    good = report.read_bytes()

    def crash(self, path, *args, **kwargs):
        Path(path).write_text("relpath,split\nhalf a row")   # a partial file, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(OSError, match="disk full"):
        run_clean(manifest, report, tmp_path / "c.json", p.data, p.clean)
    assert report.read_bytes() == good
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name]   # no half-written file left


def test_a_kept_file_that_changed_since_clean_is_a_user_error_naming_it(tmp_path, params_file,
                                                                       raw_tree):
    from fer_pipeline.data.split import RawDataChanged

    p = load(params_file)
    manifest = tmp_path / "m.csv"
    build_manifest(raw_tree).to_csv(manifest, index=False)
    run_clean(manifest, tmp_path / "r.csv", tmp_path / "c.json", p.data, p.clean)
    victim = sorted((raw_tree / "train/angry").iterdir())[0]
    victim.write_bytes(b"no longer an image")   # changed behind clean's back
    with pytest.raises(RawDataChanged, match=f"{victim.name}: not an image.*fer clean"):
        run_split(tmp_path / "r.csv", tmp_path / "a", tmp_path / "a.json", p.data, p.clean,
                  p.split)
    assert not (tmp_path / "a.json").exists()


def test_missing_inputs_are_user_errors_that_name_the_stage(tmp_path, params_file):
    from fer_pipeline.errors import MissingInputError

    p = load(params_file)
    with pytest.raises(MissingInputError, match="fer validate"):
        run_clean(tmp_path / "none.csv", tmp_path / "r.csv", tmp_path / "c.json", p.data, p.clean)
    with pytest.raises(MissingInputError, match="fer clean"):
        run_split(tmp_path / "none.csv", tmp_path / "a", tmp_path / "a.json", p.data, p.clean,
                  p.split)
