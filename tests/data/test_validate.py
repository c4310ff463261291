import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fer_pipeline.cli import main
from fer_pipeline.data.manifest import DatasetMissingError
from fer_pipeline.data.validate import DataChecksFailed, validate_dataset
from fer_pipeline.params import load, load_raw


def _validate(tmp_path: Path, params_file: Path):
    p = load(params_file)
    return validate_dataset(Path(p.data.raw_dir), p.data, p.validate,
                            tmp_path / "manifest.csv", tmp_path / "reports", check=False)


def test_clean_tree_passes_and_writes_reports(tmp_path, params_file):
    out = _validate(tmp_path, params_file)
    assert out.success and not out.hard_failures
    assert out.summary["files"] == 7 * 14
    result = json.loads((tmp_path / "reports" / "result.json").read_text())
    assert result["summary"]["success"] is True
    assert (tmp_path / "reports" / "data_docs" / "index.html").is_file()
    assert (tmp_path / "manifest.csv").is_file()


def test_unknown_class_folder_is_hard_failure_naming_files(tmp_path, params_file, raw_tree):
    shutil.copytree(raw_tree / "train" / "happy", raw_tree / "train" / "Happy")
    out = _validate(tmp_path, params_file)
    assert not out.success
    text = "\n".join(out.hard_failures)
    assert "only known class folders" in text and "train/Happy/" in text


def test_empty_class_folder_is_hard_failure(tmp_path, params_file, raw_tree):
    for f in (raw_tree / "test" / "disgust").iterdir():
        f.unlink()
    out = _validate(tmp_path, params_file)
    assert not out.success
    assert any("test/disgust" in line for line in out.hard_failures)


def test_missing_dataset_says_how_to_get_it(tmp_path, params_file, raw_tree):
    shutil.rmtree(raw_tree)
    with pytest.raises(DatasetMissingError, match="dvc pull"):
        _validate(tmp_path, params_file)


def test_few_bad_files_are_soft_many_are_hard(tmp_path, params_file, raw_tree):
    (raw_tree / "train" / "sad" / "notes.txt").write_text("not an image")
    (raw_tree / "train" / "fear" / "Training_999.jpg").write_bytes(b"\xff\xd8\xff broken")
    out = _validate(tmp_path, params_file)
    assert out.success  # 2 of 100 files, tolerance 20% in the tiny params
    soft = "\n".join(out.soft_failures)
    assert "train/sad/notes.txt" in soft and "train/fear/Training_999.jpg" in soft
    for i in range(40):
        (raw_tree / "train" / "sad" / f"Training_{5000 + i}.jpg").write_bytes(b"junk")
    out = _validate(tmp_path, params_file)
    assert not out.success
    assert any("few unreadable files" in line for line in out.hard_failures)


def test_wrong_size_and_colour_are_soft(tmp_path, params_file, raw_tree):
    Image.fromarray(np.zeros((64, 64), np.uint8) + 100).save(raw_tree / "train/sad/Training_77.jpg")
    rgb = np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(raw_tree / "train/sad/Training_78.png")
    out = _validate(tmp_path, params_file)
    assert out.success
    soft = "\n".join(out.soft_failures)
    assert "Training_77.jpg" in soft and "Training_78.png" in soft


def test_cli_exits_1_with_summary_no_traceback(tmp_path, params_file, raw_tree, capsys,
                                               monkeypatch):
    shutil.copytree(raw_tree / "test" / "sad", raw_tree / "test" / "contempt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FER_ERROR_FILE", str(tmp_path / "error.json"))
    rc = main(["--params", str(params_file), "validate"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "data checks failed" in err and "test/contempt/" in err
    assert "Traceback" not in err
    # what a runner reads through `dvc repro`: the type, not worth a retry
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["type"] == "DataChecksFailed" and error["transient"] is False
    assert (tmp_path / "reports/validate/result.json").is_file()   # reports written before stopping


def test_hard_failure_raises_a_user_error_after_writing_reports(tmp_path, params_file, raw_tree):
    shutil.copytree(raw_tree / "test" / "sad", raw_tree / "test" / "contempt")
    p = load(params_file)
    with pytest.raises(DataChecksFailed, match="test/contempt/"):
        validate_dataset(Path(p.data.raw_dir), p.data, p.validate, tmp_path / "manifest.csv",
                         tmp_path / "reports")
    assert json.loads((tmp_path / "reports" / "result.json").read_text())["hard_failures"]


@pytest.mark.parametrize("edit, named", [
    (lambda raw: raw.update(registy=raw.pop("registry")), "unknown key registy (did you mean registry?)"),
    (lambda raw: raw["clean"].update(size_polcy=raw["clean"].pop("size_policy")),
     "unknown key clean.size_polcy (did you mean clean.size_policy?)"),
])
def test_misspelt_params_file_exits_non_zero_naming_the_key(tmp_path, params_file, capsys,
                                                           monkeypatch, edit, named):
    raw = load_raw(params_file)
    edit(raw)
    params_file.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["--params", str(params_file), "validate"]) == 1
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()   # failed before measuring anything


def test_a_crash_mid_suite_keeps_the_previous_data_docs(tmp_path, params_file, monkeypatch):
    from fer_pipeline.data import validate

    _validate(tmp_path, params_file)
    index = tmp_path / "reports" / "data_docs" / "index.html"
    good = index.read_bytes()
    real = validate._id_columns

    def crash_on_second_asset(asset: str) -> list[str]:
        if asset == "class_counts":   # the first asset's docs are already written by then
            raise RuntimeError("killed mid-suite")
        return real(asset)

    monkeypatch.setattr(validate, "_id_columns", crash_on_second_asset)
    with pytest.raises(RuntimeError, match="killed mid-suite"):
        _validate(tmp_path, params_file)
    assert index.read_bytes() == good
    assert sorted(f.name for f in (tmp_path / "reports").iterdir()) == [
        "data_docs", "result.json", "summary.json"]   # no half-written folder left beside it
