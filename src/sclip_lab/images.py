"""What the Python API accepts as an image, turned into the one form the pipeline reads:
an ``(H, W, 3)`` uint8 RGB array (``Segmenter.segment`` / ``Segmenter.logits``).

A path is decoded as the benchmarks are (``data.read_image``: OpenCV, BGR -> RGB), so a
file gives the same pixels, and the same class map, from ``predict`` and from Python.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from sclip_lab.data import read_image
from sclip_lab.errors import ConfigError

# A path, an (H, W, 3) uint8 array, a PIL image or a (3, H, W) tensor (uint8 or float 0…1).
ImageLike = str | os.PathLike | np.ndarray | torch.Tensor | Any
KINDS = ("a path, an (H, W, 3) uint8 numpy array, a PIL image or a (3, H, W) tensor "
         "(uint8 0..255 or float 0..1)")


def is_many(images: Any) -> bool:
    """A list (or tuple) of images, as opposed to one image."""
    return isinstance(images, (list, tuple))


def as_rgb(image: ImageLike) -> np.ndarray:
    """One image of any accepted kind -> ``(H, W, 3)`` uint8 RGB.

    Args:
        image: a path (``str`` / ``os.PathLike``), an ``(H, W, 3)`` uint8 array, a PIL
            image (any mode; converted to RGB) or a ``(3, H, W)`` tensor, uint8 in 0…255
            or floating point in 0…1 (as ``torchvision``'s ``to_tensor`` gives).

    Raises:
        ConfigError: any other type, shape, dtype or range; the line says what is accepted.
        DataError: a path that is missing or not a decodable image.

    Example:
        >>> as_rgb(torch.ones(3, 2, 4)).shape, as_rgb(torch.ones(3, 2, 4))[0, 0]
        ((2, 4, 3), array([255, 255, 255], dtype=uint8))
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        return _from_tensor(image)
    if isinstance(image, np.ndarray):
        return _checked_array(image)
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL, without importing it
        return np.asarray(image.convert("RGB"))
    raise ConfigError(f"cannot read an image from a {type(image).__name__}; give {KINDS}")


def _checked_array(array: np.ndarray) -> np.ndarray:
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ConfigError(f"a numpy image must be (H, W, 3) uint8 RGB (got {array.dtype} "
                          f"{tuple(array.shape)}); convert it, or give {KINDS}")
    if min(array.shape[:2]) < 1:
        raise ConfigError(f"the image is empty ({tuple(array.shape)})")
    return np.ascontiguousarray(array)


def _from_tensor(tensor: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` uint8 or float 0…1 -> ``(H, W, 3)`` uint8 (floats rounded, as
    ``to_tensor``'s inverse)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ConfigError(f"a tensor image must be (3, H, W) (got {tuple(tensor.shape)}); "
                          f"give {KINDS}")
    x = tensor.detach().cpu()
    if x.dtype == torch.uint8:
        return _checked_array(x.permute(1, 2, 0).numpy())
    if not x.is_floating_point():
        raise ConfigError(f"a tensor image must be uint8 (0..255) or float (0..1), not "
                          f"{x.dtype}")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise ConfigError("a float tensor image must lie in 0..1 (divide 0..255 values by "
                          "255; undo any normalisation: the segmenter normalises itself)")
    return _checked_array((x.float() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())

