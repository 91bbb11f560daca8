"""Reading images and label maps as the published code does, the label rules and checks."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from sclip_lab.data.spec import IGNORE_INDEX, LABEL_RULES, DataError
from sclip_lab.errors import brief


def apply_label_rule(raw: np.ndarray, rule: str) -> np.ndarray:
    """Map raw label values to class indices (docs/protocol.md §6).

    Args:
        raw: ``(H, W)`` integer label map as decoded (palette indices / grey values).
        rule: ``identity`` (values kept; 255 is the ignore index) or
            ``reduce_zero_label`` (0 -> 255, v -> v - 1, 255 stays 255).

    Returns:
        ``(H, W)`` int64 label map; the input is not modified.
    """
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule {rule!r} is not one of {', '.join(LABEL_RULES)}")
    raw = np.asarray(raw)
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"a label map must be a 2-D integer array (got {raw.dtype} "
                         f"{raw.shape})")
    label = raw.astype(np.int64)
    if rule == "reduce_zero_label":
        # The class-0 pixels ("background"/"other") become ignored, the rest shift down.
        label = np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)
    return label


def decode_image(buffer: bytes, what: str) -> np.ndarray:
    """Decode encoded image bytes with OpenCV into ``(H, W, 3)`` uint8 RGB."""
    array = np.frombuffer(buffer, dtype=np.uint8)
    bgr = cv2.imdecode(array, cv2.IMREAD_COLOR) if array.size else None
    if bgr is None:
        raise DataError(f"cannot decode image {what} (corrupt or not an image); "
                        "re-extract or re-prepare the benchmark")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as the published code does: OpenCV colour decode, BGR -> RGB.

    Returns:
        ``(H, W, 3)`` uint8 RGB array.

    Raises:
        DataError: the file is missing, unreadable or not a decodable image.
    """
    path = Path(path)
    try:
        # imdecode of the bytes == imread, and it also copes with non-ASCII paths.
        buffer = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read image {path} ({e.strerror or e}); check the path") from None
    return decode_image(buffer, str(path))


def label_array(image: Image.Image, what: str) -> np.ndarray:
    """``(H, W)`` integer array of a PIL label image (palette indices or grey values)."""
    if image.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
        raise DataError(f"label {what} is a {image.mode} image; labels must be single-channel "
                        "class ids (palette or 8-bit grey): re-prepare the benchmark")
    array = np.asarray(image)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"label {what} decodes to {array.dtype} {array.shape}, not a 2-D "
                        "integer map: re-prepare the benchmark")
    return array


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a raw label map with PIL: palette indices (mode P) or grey values.

    Returns:
        ``(H, W)`` integer array at the file's own resolution, before the label rule.

    Raises:
        DataError: the file is missing, corrupt or not a single-channel map.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return label_array(image, str(path))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read label {path} ({brief(e)}); re-extract or "
                        "re-prepare the benchmark") from None


def values_outside(label: np.ndarray, num_classes: int) -> list[int]:
    """Sorted values of ``label`` (after the rule) that are neither a class nor ignored."""
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    return sorted(int(v) for v in np.unique(label[bad])) if bad.any() else []


def check_label(label: np.ndarray, image_hw: tuple[int, int], num_classes: int,
                what: str) -> None:
    """Raise DataError if ``label`` (after the rule) mismatches the image or the classes."""
    if label.shape != tuple(image_hw):
        raise DataError(f"label {what} is {label.shape[1]}×{label.shape[0]} but its image is "
                        f"{image_hw[1]}×{image_hw[0]} (W×H); re-prepare the benchmark")
    values = values_outside(label, num_classes)[:5]
    if values:
        raise DataError(f"label {what} holds values {values} outside 0..{num_classes - 1} "
                        f"and {IGNORE_INDEX} after the label rule; wrong label files or rule")
