"""The one params loader: every section typed, unknown keys named with the closest valid one,
overrides checked the same way, dataclass defaults equal to params.yaml's values."""

from __future__ import annotations

import re

import pytest
import yaml

from fer_pipeline import params as P
from fer_pipeline.cli import main
from fer_pipeline.profiles import load_profile
from sandbox import ROOT

RAW = P.load_raw(ROOT / "params.yaml")


def test_params_yaml_loads_with_every_section_typed():
    p = P.load(ROOT / "params.yaml")
    assert set(RAW) == set(P.SECTIONS) == {f.alias or n for n, f in P.Params.model_fields.items()}
    assert p.model("fernet").augmentation.random_erasing == RAW["models"]["fernet"]["augmentation"][
        "random_erasing"]
    assert p.evaluate.tta == RAW["evaluate"]["tta"]
    assert {name: type(m).__name__ for name, m in p.models.items()} == {
        "custom_cnn": "CustomCNNParams", "custom_cnn_aug": "CustomCNNParams",
        "vgg16": "TransferParams", "resnet50": "TransferParams", "fernet": "FerNetParams"}


@pytest.mark.parametrize("section", ["data", "validate", "clean", "split", "train", "mlflow",
                                     "evaluate", "registry"])
def test_schema_defaults_equal_params_yaml(section):
    """A default in code that disagrees with params.yaml would change a run that omits the key."""
    default = P.to_dict(getattr(P.Params(), section))
    assert {k: default[k] for k in RAW[section]} == P.to_dict(getattr(P.load(ROOT / "params.yaml"),
                                                                      section))


def test_model_defaults_are_the_study_custom_cnn():
    study = P.load(ROOT / "params.yaml").model("custom_cnn")
    default = P.model_params(arch="custom_cnn")
    assert P.to_dict(default) == P.to_dict(study)


def test_committed_json_schema_is_the_schema_of_params_py():
    """docs/schemas/params.schema.json is what editors check params.yaml with: regenerate it
    (`make schemas`) when a param changes."""
    committed = (ROOT / P.SCHEMA_PATH).read_text()
    assert committed == P.schema_text(), "stale params schema: run `fer schemas` (make schemas)"
    assert (ROOT / "params.yaml").read_text().startswith(
        f"# yaml-language-server: $schema={P.SCHEMA_PATH}")


def test_json_schema_checks_params_yaml_and_its_profiles():
    """The published schema accepts params.yaml and every profile applied to it, and refuses
    what the loader refuses: a key of another arch, an unknown arch, a mistyped value."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / P.SCHEMA_PATH).read_text())
    jsonschema.validate(RAW, schema)
    for profile in sorted((ROOT / "profiles").glob("*.yaml")):
        jsonschema.validate(P.apply_overrides(RAW, load_profile(profile.stem, ROOT / "profiles")),
                            schema)
    for edit in (lambda r: r["models"]["vgg16"].update(blocks_per_stage=2),
                 lambda r: r["models"]["fernet"].update(arch="fernet2"),
                 lambda r: r["split"].update(seed="x"),
                 lambda r: r["train"].update(precision="bf16")):
        raw = P.load_raw(ROOT / "params.yaml")
        edit(raw)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(raw, schema)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(registy=r.pop("registry")), "unknown key registy (did you mean registry?)"),
    (lambda r: r["models"]["fernet"].update(epoch=3),
     "unknown key models.fernet.epoch (did you mean models.fernet.epochs?)"),
    (lambda r: r["models"]["fernet"]["augmentation"].update(zom=0.1),
     "models.fernet.augmentation.zom (did you mean models.fernet.augmentation.zoom?)"),
    (lambda r: r["train"].update(precision="bf16"), "train.precision must be one of"),
    (lambda r: r["split"].update(seed="x"), "split.seed must be int, got 'x'"),
    (lambda r: r["models"]["vgg16"].update(members=2),
     "unknown key models.vgg16.members (arch vgg16 has no members; it is a key of arch fernet)"),
    (lambda r: r["models"]["fernet"].update(arch="fernett"),
     "models.fernet.arch must be one of ['custom_cnn', 'fernet', 'vgg16', 'resnet50'], got "
     "'fernett' (did you mean fernet?)"),
    (lambda r: r["models"]["fernet"].pop("arch"), "models.fernet needs an arch"),
])
def test_unknown_or_mistyped_keys_fail_by_dotted_name(tmp_path, edit, message):
    raw = P.load_raw(ROOT / "params.yaml")
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(P.ParamsError, match=re.escape(message)):
        P.load(path)


def test_overrides_are_checked_like_the_file():
    p = P.load(ROOT / "params.yaml", ["models.fernet.epochs=3", "models.vgg16.weights=null"])
    assert p.model("fernet").epochs == 3 and p.model("vgg16").weights is None
    assert P.load(ROOT / "params.yaml", {"models.vgg16.input_size": 64}).model("vgg16").input_size == 64
    with pytest.raises(P.ParamsError, match=r"models.fernet.input_size \(arch fernet has no "
                                            r"input_size; it is a key of arch vgg16 and resnet50"):
        P.load(ROOT / "params.yaml", {"models.fernet.input_size": 64})
    with pytest.raises(P.ParamsError, match=r"models.fernt \(did you mean models.fernet\?\)"):
        P.load(ROOT / "params.yaml", ["models.fernt.epochs=1"])   # would create a model
    with pytest.raises(P.ParamsError, match="models.fernet.epochs must be int"):
        P.load(ROOT / "params.yaml", ["models.fernet.epochs=many"])
    with pytest.raises(P.ParamsError, match="KEY=VALUE"):
        P.parse_overrides(["models.fernet.epochs"])


@pytest.mark.parametrize("argv", [["train", "--model", "fernet"], ["evaluate"], ["split"],
                                  ["predict", "x.jpg"]])
def test_every_command_rejects_a_misspelt_params_file(tmp_path, capsys, argv):
    raw = P.load_raw(ROOT / "params.yaml")
    raw["models"]["fernet"]["learning_rat"] = raw["models"]["fernet"].pop("learning_rate")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(path), *argv]) == 1
    err = capsys.readouterr().err
    assert "models.fernet.learning_rat (did you mean models.fernet.learning_rate?)" in err
    assert "Traceback" not in err


def test_fer_run_rejects_a_misspelt_override_before_dvc_runs(capsys):
    assert main(["--params", str(ROOT / "params.yaml"), "run", "--dry",
                 "-S", "models.fernt.epochs=1"]) == 1
    captured = capsys.readouterr()
    assert "did you mean models.fernet?" in captured.err and "$ dvc" not in captured.out


def test_recipe_summary_names_what_a_profile_traded_away():
    """The comparison table's `recipe` column: a profile's trade-offs in words."""
    study = P.load(ROOT / "params.yaml")
    quick = P.load(ROOT / "params.yaml", load_profile("quick", ROOT / "profiles"))
    assert "dense 887 dropout 0.5" in study.model("custom_cnn").summary()
    assert "rotation 40" in study.model("custom_cnn_aug").summary()
    assert study.model("custom_cnn").summary().endswith("no augmentation")
    small = quick.model("custom_cnn").summary()
    assert small.startswith("width 0.25") and "dense 222 dropout 0," in small
    assert "BN momentum 0.9" in small and "BN momentum" not in study.model("fernet").summary()
    assert "features normed" in quick.model("vgg16").summary()
    assert "dropout 0.3" in study.model("fernet").summary()
    assert "dropout 0," in quick.model("fernet").summary()
    assert "class weights" in study.model("resnet50").summary()


def test_blocks_per_stage_is_one_count_or_one_per_stage():
    """fernet's depth per resolution stage: a list must match conv_filters, counts >= 1."""
    assert P.load(ROOT / "params.yaml").model("fernet").stage_blocks() == [2, 2, 2, 2]
    one = P.load(ROOT / "params.yaml", ["models.fernet.blocks_per_stage=[1, 2, 2, 2]"])
    assert one.model("fernet").stage_blocks() == [1, 2, 2, 2]
    assert "convs per stage 1-2-2-2" in one.model("fernet").summary()
    assert "convs per stage" not in P.load(ROOT / "params.yaml").model("fernet").summary()
    with pytest.raises(P.ParamsError, match="models.fernet.blocks_per_stage lists 3 stages but "
                                            "conv_filters has 4"):
        P.load(ROOT / "params.yaml", ["models.fernet.blocks_per_stage=[1, 2, 2]"])
    with pytest.raises(P.ParamsError, match=r"models.fernet.blocks_per_stage\[0\] must be >= 1, got 0"):
        P.load(ROOT / "params.yaml", ["models.fernet.blocks_per_stage=[0, 2, 2, 2]"])
    with pytest.raises(P.ParamsError, match=r"models.fernet.blocks_per_stage\[1\] must be int"):
        P.load(ROOT / "params.yaml", ["models.fernet.blocks_per_stage=[1, two, 2, 2]"])


def test_a_cap_below_one_is_refused_by_name():
    with pytest.raises(P.ParamsError, match="data.max_test_per_class must be >= 1, got 0"):
        P.from_dict({"data": {"max_test_per_class": 0}})
