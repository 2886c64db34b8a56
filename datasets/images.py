"""Image files of a dataset: finding them on disk and decoding them to 8-bit RGB.

Rules (the same in training, ``tools/check_dataset.py`` and ``tools/predict.py``):

* **Pixels as stored.** The EXIF orientation (tag 274) is *not* applied, as in COCO, whose boxes and
  "width"/"height" describe the stored pixels; :attr:`DecodedImage.orientation` reports it.
* **High bit depth.** PIL's ``convert("RGB")`` clips 16-bit and float pixels to 0..255 (a white or black image);
  they are scaled instead: mode ``I;16`` (16-bit) is divided by 257; mode ``I`` (32-bit integers) is taken as is
  when its values are in 0..255, divided by 257 when in 0..65535 (a 16-bit file), else stretched from its
  min..max to 0..255; mode ``F`` (float) is multiplied by 255 when its values are in [0, 1], taken as is when in
  [0, 255], else stretched from its min..max; NaN and infinite values become 0.
* **Size limit.** PIL refuses images over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels (against decompression
  bombs); the environment variable ``PIL_MAX_IMAGE_PIXELS=<N>`` sets that limit (:func:`apply_pixel_limit_from_env`,
  run when :mod:`datasets.coco` is imported).
* **File names** are found under either Unicode normalisation (NFC or NFD) of their JSON name
  (:func:`disk_name`).
"""
from __future__ import annotations

import io
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)

PIXEL_LIMIT_ENV = "PIL_MAX_IMAGE_PIXELS"
# What PIL raises for a file it cannot decode: missing, truncated, not an image, too large.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)
EXIF_ORIENTATION_TAG = 274
# EXIF orientation -> what a viewer does to the stored pixels before showing them (1: nothing).
EXIF_ORIENTATIONS = {2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom",
                     5: "mirrored and rotated 90 degrees", 6: "rotated 90 degrees clockwise",
                     7: "mirrored and rotated 270 degrees", 8: "rotated 90 degrees counter-clockwise"}


def apply_pixel_limit_from_env() -> None:
    """Set ``PIL.Image.MAX_IMAGE_PIXELS`` from ``$PIL_MAX_IMAGE_PIXELS`` (a positive integer) if it is set; any
    other value is ignored with a warning."""
    value = os.environ.get(PIXEL_LIMIT_ENV)
    if value is None:
        return
    if not value.strip().isdigit() or int(value) < 1:
        logger.warning("%s=%r is not a positive integer: ignored, PIL's limit stays %s pixels", PIXEL_LIMIT_ENV,
                       value, PIL.Image.MAX_IMAGE_PIXELS)
        return
    PIL.Image.MAX_IMAGE_PIXELS = int(value)


def _pixel_limit_error(err: PIL.Image.DecompressionBombError) -> PIL.Image.DecompressionBombError:
    """PIL's error for a too large image, with its limit and the way to raise it."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    pixels = found.group(1) if found else "<its number of pixels>"
    return PIL.Image.DecompressionBombError(
        f"{err} PIL refuses images over twice PIL.Image.MAX_IMAGE_PIXELS ({PIL.Image.MAX_IMAGE_PIXELS} here); if "
        f"the file is trusted, raise the limit with the environment variable {PIXEL_LIMIT_ENV}={pixels}")


@dataclass
class DecodedImage:
    """A decoded file: ``image`` RGB 8-bit, the stored pixels (``image.size`` is ``(width, height)``);
    ``scaling`` says how 16-bit or float pixels were brought to 8 bits (None for 8-bit files); ``orientation`` is
    the file's EXIF orientation (tag 274), 1 when it has none (see :data:`EXIF_ORIENTATIONS`), never applied."""

    image: PIL.Image.Image
    scaling: Optional[str]
    orientation: int


def _stretch(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    return (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)


def to_8_bits(image: PIL.Image.Image) -> tuple[PIL.Image.Image, Optional[str]]:
    """``(image, how it was scaled)`` for a 16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) image,
    following the rules of this module: a mode ``L`` image and the rule applied; any other image unchanged with
    None (``convert("RGB")`` handles it)."""
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image, None
    pixels = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(pixels)
    low, high = (float(pixels[finite].min()), float(pixels[finite].max())) if finite.any() else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled, rule = pixels / 257.0, "divided by 257"
    elif low >= 0 and high <= 1 and mode == "F":
        scaled, rule = pixels * 255.0, "values in [0, 1] multiplied by 255"
    elif low >= 0 and high <= 255:
        if mode == "I":
            return image, None
        scaled, rule = pixels, "values in [0, 255] taken as they are"
    elif low >= 0 and high <= 65535 and mode == "I":
        scaled, rule = pixels / 257.0, "values in 0..65535 divided by 257"
    else:
        scaled, rule = _stretch(pixels, low, high), f"values {low:g}..{high:g} stretched to 0..255"
    scaled = np.where(finite, scaled, 0.0)
    eight_bits = PIL.Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))
    return eight_bits, f"mode {mode} ({'float' if mode == 'F' else 'more than 8 bits'}): {rule}"


def _orientation(image: PIL.Image.Image) -> int:
    """The EXIF orientation of an open file; 1 when it has none or its EXIF block cannot be parsed (the pixels
    are still good)."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except UNREADABLE_IMAGE_ERRORS:
        return 1
    return orientation if isinstance(orientation, int) else 1


def decode_image(source: Path | bytes) -> DecodedImage:
    """The fully decoded file (a path or its bytes) as a :class:`DecodedImage`; raises one of
    :data:`UNREADABLE_IMAGE_ERRORS` if it cannot be decoded."""
    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            orientation = _orientation(image)
            eight_bits, scaling = to_8_bits(image)
            rgb = eight_bits.convert("RGB")
    except PIL.Image.DecompressionBombError as err:
        raise _pixel_limit_error(err) from None
    return DecodedImage(rgb, scaling, orientation)


def open_rgb_image(source: Path | bytes) -> PIL.Image.Image:
    """The RGB 8-bit image of a file or of its bytes (see :func:`decode_image`)."""
    return decode_image(source).image


def exif_rotation(file_name: str, orientation: int) -> Optional[str]:
    """``"<file_name>: EXIF orientation 6 (rotated 90 degrees clockwise)"`` when ``orientation`` is not 1, else
    None."""
    if orientation == 1:
        return None
    return f"{file_name}: EXIF orientation {orientation} ({EXIF_ORIENTATIONS.get(orientation, 'unknown value')})"


def size_mismatch(image_info: dict, image: PIL.Image.Image) -> Optional[str]:
    """``"<file_name>: 64x48 on disk, 48x64 in the JSON"`` when the decoded size differs from the JSON's
    "width"/"height" (a resized or rotated file: its boxes no longer fit), else None."""
    json_size = (image_info["width"], image_info["height"])
    if image.size == json_size:
        return None
    return (f'{image_info["file_name"]}: {image.width}x{image.height} on disk, '
            f"{json_size[0]:g}x{json_size[1]:g} in the JSON")


class DiskNames:
    """The files of an image folder, found by their JSON names under either Unicode normalisation.

    One directory listing (fast for 118k images); a name not in it (e.g. "sub/x.jpg") costs a stat per form.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.listed = set(os.listdir(folder))
        self._by_nfc: Optional[dict[str, str]] = None

    def find(self, name: str) -> Optional[str]:
        """The name on disk of the JSON name ``name`` (itself, or its NFC or NFD form), or None if missing."""
        if name in self.listed:
            return name
        if self._by_nfc is None:
            self._by_nfc = {unicodedata.normalize("NFC", n): n for n in self.listed}
        found = self._by_nfc.get(unicodedata.normalize("NFC", name))
        if found is not None:
            return found
        for variant in dict.fromkeys((name, unicodedata.normalize("NFC", name), unicodedata.normalize("NFD", name))):
            if (self.folder / variant).is_file():
                return variant
        return None
