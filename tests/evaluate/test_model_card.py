"""The model card states only what the release manifest says: how the model started (pretrained
or not), how it scales pixels, and which faces detection handles (rolled faces, at which angles).

`contradictions` reads the card as a person would (its sentences, not the template), so a card
that drifts from the manifest fails here, whoever wrote it.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from fer_pipeline.artifacts.release import Detection, Preprocessing, ReleaseManifest
from fer_pipeline.export import model_card
from fer_pipeline.io import md5_file
from sandbox import ROOT

# How the card names each preprocessing (and nothing else does).
PREPROCESSING_WORDS = {"rescale": "x/255", "standardize": "standardized to mean 0",
                       "base": "the base network's own"}
MISSED_TILTED = re.compile(r"(miss(es|ed)\b[^.]*\b(tilted|rolled)\b)|"
                           r"(\b(tilted|rolled)\b[^.]*\b(missed|not searched))", re.IGNORECASE)


def contradictions(card: str, man: dict) -> list[str]:
    """What `card` states that the manifest `man` (model.json, as JSON) contradicts, or does
    not state though the manifest says it."""
    out = []
    scratch, pretrained = "from scratch" in card, "from pretrained weights" in card
    if man.get("pretrained") is True and (scratch or not pretrained):
        out.append("pretrained: the manifest says pretrained weights, the card does not")
    if man.get("pretrained") is False and (pretrained or not scratch):
        out.append("pretrained: the manifest says from scratch, the card does not")
    if man.get("pretrained") is None and (pretrained or scratch):
        out.append("pretrained: the manifest does not record it, the card claims it")
    named = {k for k, words in PREPROCESSING_WORDS.items() if words in card}
    want = {man["preprocessing"]} if man.get("preprocessing") else set()
    if named != want:
        out.append(f"preprocessing: the card names {sorted(named)}, the manifest {sorted(want)}")
    angles = sorted((man.get("detection") or {}).get("roll_angles") or [])
    said = re.search(r"turned by ([-\d., and]+?) degrees", card)
    stated = sorted(float(a) for a in re.findall(r"-?\d+(?:\.\d+)?", said.group(1))) if said else []
    if stated != angles:
        out.append(f"roll angles: the card says {stated}, the manifest {angles}")
    if angles and MISSED_TILTED.search(card):
        out.append("detection: the card says tilted faces are missed; the manifest: searched")
    if man.get("detection") and not angles and not MISSED_TILTED.search(card):
        out.append("detection: no roll search, but the card does not say tilted faces are missed")
    return out


def _committed() -> ReleaseManifest:
    return ReleaseManifest.read(ROOT / "release/model.json")


def test_the_committed_card_agrees_with_the_committed_manifest():
    card = (ROOT / "release/MODEL_CARD.md").read_text()
    man = json.loads((ROOT / "release/model.json").read_text())
    assert man.get("preprocessing") and man.get("detection"), "re-render: fer export --card-only"
    assert contradictions(card, man) == []
    # ... and is what the template renders from it (nobody edited it by hand).
    assert card == model_card(ReleaseManifest.parse(man))


VARIANTS = {
    "vgg16 from ImageNet, caffe means": dict(arch="vgg16", pretrained=True,
                                             pretrained_weights="imagenet",
                                             preprocessing=Preprocessing.BASE),
    "from scratch, x/255": dict(pretrained=False, preprocessing=Preprocessing.RESCALE),
    "not recorded": dict(pretrained=None, preprocessing=Preprocessing.STANDARDIZE),
    "no roll search": dict(detection=Detection(detector="Haar", min_face_side="24 px",
                                               roll_angles=[])),
    "other angles": dict(detection=Detection(detector="Haar", min_face_side="24 px",
                                             roll_angles=[20.0, -20.0])),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_card_states_its_manifest_and_no_other(variant):
    man = _committed().model_copy(update=VARIANTS[variant])
    card = model_card(man)
    assert contradictions(card, json.loads(man.to_json())) == []
    # The same card checked against each other variant's manifest disagrees on its facts.
    for other, update in VARIANTS.items():
        theirs = json.loads(_committed().model_copy(update=update).to_json())
        if other != variant and any(theirs[k] != json.loads(man.to_json())[k] for k in update):
            assert contradictions(card, theirs), (variant, other)


def test_the_drifted_card_is_caught():
    """What the card said before it was rendered from the manifest: every model trained from
    scratch, tilted faces missed, no preprocessing named."""
    man = json.loads(_committed().model_copy(update=VARIANTS["vgg16 from ImageNet, caffe means"])
                     .to_json())
    drifted = ("Trained 10 epochs in 100 s (best epoch 9), from scratch (no pretrained weights).\n"
               "- Frontal faces only: the Haar cascade misses profiles, tilted or partly hidden "
               "faces, and very small faces (under about 1/12 of the image side).\n")
    found = " ".join(contradictions(drifted, man))
    assert "pretrained" in found and "preprocessing" in found and "roll angles" in found
    assert "tilted faces are missed" in found


def test_the_card_shows_the_release_metrics():
    man = _committed()
    table = next(line for line in model_card(man).splitlines() if line.startswith("| 6"))
    assert f"{100 * man.metrics.test_accuracy:.1f}%" in table
    assert f"{man.metrics.test_macro_f1:.3f}" in table


def test_card_only_rerenders_an_older_release_without_touching_the_model(released, run_evaluate,
                                                                        tmp_path):
    """A release written before the manifest held the card's facts: `fer export --card-only`
    adds them (from its recipe, training metrics, params and the data reports) and re-renders
    the card; the model files stay as exported."""
    from fer_pipeline.cli import main

    _, params, out = released
    run_evaluate(params, register=False, log_mlflow=False)   # the evaluation it was exported from
    copy = tmp_path / "release"
    shutil.copytree(out, copy)
    man = json.loads((copy / "model.json").read_text())
    for key in ("pretrained", "pretrained_weights", "preprocessing", "detection", "confusion",
                "data"):
        man.pop(key, None)
    (copy / "model.json").write_text(json.dumps(man, indent=2) + "\n")
    (copy / "MODEL_CARD.md").write_text("stale\n")
    keras_md5 = md5_file(copy / "model.keras")
    assert main(["--params", str(params), "export", "--card-only", "--out", str(copy)]) == 0
    after = json.loads((copy / "model.json").read_text())
    assert after["pretrained"] is False and after["preprocessing"] == "rescale"
    assert after["detection"]["roll_angles"] == [15.0, -15.0, 30.0, -30.0]
    assert sum(map(sum, after["confusion"])) == after["metrics"]["test_n"]
    card = (copy / "MODEL_CARD.md").read_text()
    assert contradictions(card, after) == [] and "## Confusion matrix" in card
    assert md5_file(copy / "model.keras") == keras_md5
    # The released card (fer export) says the same.
    assert (out / "MODEL_CARD.md").read_text() == card
