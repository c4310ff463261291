from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_pipeline.data.images import ImageDecodeError, pixel_hash, read_image, to_dataset_image
from fer_pipeline.params import ParamsError, from_dict, load, set_dotted


def test_gray_jpeg_decodes(tmp_path: Path):
    p = tmp_path / "a.png"
    pixels = np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)
    Image.fromarray(pixels, mode="L").save(p)
    gray, info = read_image(p)
    assert gray.shape == (48, 48) and info.channels == 1
    np.testing.assert_array_equal(gray, pixels)


def test_gray_stored_as_rgb_converts_exactly(tmp_path: Path):
    pixels = np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8)
    Image.fromarray(np.stack([pixels] * 3, -1), mode="RGB").save(tmp_path / "a.png")
    gray, info = read_image(tmp_path / "a.png")
    assert info.channels == 3 and info.gray_equal
    np.testing.assert_array_equal(gray, pixels)
    # same picture, same hash, whatever the storage
    Image.fromarray(pixels, mode="L").save(tmp_path / "b.png")
    assert pixel_hash(read_image(tmp_path / "b.png")[0]) == pixel_hash(gray)


def test_colour_image_is_flagged(tmp_path: Path):
    rgb = np.zeros((48, 48, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    gray, info = read_image(tmp_path / "c.png")
    assert not info.gray_equal
    assert gray[0, 0] == round(200 * 299 / 1000)


@pytest.mark.parametrize("content,reason", [
    (b"hello, not an image", "not an image"),
    (b"", "not an image"),
])
def test_non_images_raise_with_reason(tmp_path: Path, content: bytes, reason: str):
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason):
        read_image(p)


def test_truncated_jpeg_raises(tmp_path: Path):
    p = tmp_path / "t.jpg"
    Image.fromarray(np.full((48, 48), 90, np.uint8) + np.eye(48, dtype=np.uint8) * 50).save(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        read_image(p)


def test_wrong_size_policy():
    big = np.zeros((96, 64), np.uint8)
    with pytest.raises(ImageDecodeError, match="size 64x96, expected 48x48"):
        to_dataset_image(big, 48, resize=False)
    assert to_dataset_image(big, 48, resize=True).shape == (48, 48)


def test_params_reject_unknown_and_mistyped_keys(tmp_path: Path):
    with pytest.raises(ParamsError, match="unknown key clean.colour"):
        from_dict({"clean": {"colour": "x"}})
    with pytest.raises(ParamsError, match="data.image_size must be int"):
        from_dict({"data": {"image_size": "48"}})
    with pytest.raises(ParamsError, match="clean.size_policy"):
        from_dict({"clean": {"size_policy": "stretch"}})


def test_project_params_load_and_override():
    params = load(Path(__file__).resolve().parents[2] / "params.yaml")
    assert params.data.max_per_class is None and params.split.val_fraction == 0.2
    raw = {"data": {"max_per_class": None}}
    set_dotted(raw, "data.max_per_class", 50)
    assert raw["data"]["max_per_class"] == 50
