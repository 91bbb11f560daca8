"""The preprocessing of a run as one validated object: resize to a short side, then a grid
of sliding windows (docs/protocol.md §5.2–5.4). Built from the ``preprocess`` config
section; DataLoader workers call it, so it is the only place the short side is applied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from sclip_lab import segment
from sclip_lab.errors import ConfigError, integer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """Resize to ``short_side``, then ``window``×``window`` crops every ``stride`` pixels;
    ``window=None`` is the whole image in one window (NACLIP's VOC protocol)."""

    short_side: int
    window: int | None = 224
    stride: int = 112

    def __post_init__(self):
        integer(self.short_side, "preprocess.short_side", 1)
        integer(self.stride, "preprocess.stride", 1)
        if self.window is None:
            return
        integer(self.window, "preprocess.window", 1)
        if self.stride > self.window:
            raise ConfigError(f"preprocess.stride={self.stride} > preprocess.window="
                              f"{self.window} would leave pixels no window covers; use a "
                              "stride ≤ the window")
        if self.window > self.short_side:
            log.warning("preprocess.window=%d is larger than the resized short side %d: "
                        "each image fits in one (smaller) window", self.window,
                        self.short_side)

    @classmethod
    def from_section(cls, section: Mapping[str, Any] | Preprocess) -> Preprocess:
        if isinstance(section, Preprocess):
            return section
        window = section["window"]
        return cls(integer(section["short_side"], "preprocess.short_side", 1),
                   None if window is None else integer(window, "preprocess.window", 1),
                   integer(section["stride"], "preprocess.stride", 1))

    def __call__(self, image: np.ndarray) -> Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, Hr, Wr)``: the only place the short side is
        applied (DataLoader workers call it too)."""
        return segment.preprocess(image, self.short_side)

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The windows ``(y1, y2, x1, x2)`` of a resized ``height × width`` image."""
        if self.window is None:
            return [(0, height, 0, width)]
        return segment.window_boxes(height, width, self.window, self.stride)
