"""Decoding one image file into the dataset's form: HxW uint8 grayscale.

The conversion policy is written down here once and used by validate (to measure), clean
(to decide) and split (to produce arrays):
- Mode "L" (8-bit gray) is taken as is.
- Modes with colour ("RGB", "RGBA", "P", "CMYK", ...) are converted with PIL's ITU-R 601-2
  luma transform (L = R*299/1000 + G*587/1000 + B*114/1000); alpha is dropped. When all
  colour channels are equal (a gray image saved as RGB) the result is exactly the gray values.
- 16-bit and float grayscale ("I;16", "I", "F") are rejected: rescaling them is a guess.
- Size: images that are not SIZE x SIZE are rejected by default, or resized with bilinear
  filtering when the caller asks (clean.size_policy: resize).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

CHANNELS = {"1": 1, "L": 1, "P": 3, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3}
UNSUPPORTED_MODES = {"I", "I;16", "I;16B", "I;16L", "F"}


class ImageDecodeError(Exception):
    """The file is not a usable image; the message is the reason shown in reports."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    channels: int
    mode: str
    format: str
    gray_equal: bool  # colour channels all equal (a gray picture stored as colour)


def read_image(path: str | Path) -> tuple[np.ndarray, ImageInfo]:
    """Fully decode `path`; returns the grayscale pixels (native size) and what the file held."""
    try:
        with Image.open(path) as img:
            img.load()  # forces a full decode: truncated files fail here
            mode = img.mode
            info_fmt = img.format or ""
            if mode in UNSUPPORTED_MODES:
                raise ImageDecodeError(f"unsupported pixel mode {mode} (need 8-bit gray or colour)")
            channels = CHANNELS.get(mode, 3)
            gray_equal = True
            if channels >= 3:
                rgb = np.asarray(img.convert("RGB"))
                gray_equal = bool(
                    np.array_equal(rgb[..., 0], rgb[..., 1])
                    and np.array_equal(rgb[..., 1], rgb[..., 2])
                )
            gray = np.asarray(img.convert("L"), dtype=np.uint8)
            info = ImageInfo(img.width, img.height, channels, mode, info_fmt, gray_equal)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (no decoder recognises the content)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    return gray, info


def to_dataset_image(gray: np.ndarray, size: int, resize: bool) -> np.ndarray:
    """Bring decoded grayscale pixels to SIZE x SIZE, or raise when the policy forbids it."""
    if gray.shape == (size, size):
        return gray
    if not resize:
        raise ImageDecodeError(f"size {gray.shape[1]}x{gray.shape[0]}, expected {size}x{size}")
    img = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def pixel_hash(gray: np.ndarray) -> str:
    """Hash of decoded pixels (and shape): equal iff the pictures are pixel-identical."""
    h = hashlib.blake2b(digest_size=12)
    h.update(np.asarray(gray.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(gray).tobytes())
    return h.hexdigest()
