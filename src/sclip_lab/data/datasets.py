"""The files source: a benchmark in its standard layout under ``data_root``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sclip_lab.data.readers import apply_label_rule, check_label, read_image, read_label
from sclip_lab.data.spec import BenchmarkSpec, DataError, list_ids, prepare_hint

log = logging.getLogger(__name__)


def warn_limit(limit: int | None, available: int, name: str) -> None:
    if limit is not None and int(limit) > available:
        log.warning("limit=%s is larger than the %s split (%d images): evaluating all %d",
                    limit, name, available, available)


class SegmentationDataset(torch.utils.data.Dataset):
    """A benchmark in its standard layout under ``data_root``.

    Items are dicts: ``id`` (str), ``image`` ``(H, W, 3)`` uint8 RGB, ``label``
    ``(H, W)`` int64 after the label rule (255 = ignore) at the original resolution, and
    ``input`` = ``transform(image)`` when a transform is given.

    Args:
        spec: the benchmark.
        data_root: folder holding ``spec.root``.
        limit: keep only the first N ids (sorted order); None = all.
        transform: applied to the RGB image to make ``input``.

    Raises:
        DataError: the layout is incomplete (checked up front, one line naming the fix).
    """

    def __init__(self, spec: BenchmarkSpec, data_root: str | os.PathLike,
                 limit: int | None = None,
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        if limit is not None and int(limit) < 1:
            raise DataError(f"limit={limit} must be ≥ 1 (or null for the whole split)")
        self.spec = spec
        self.data_root = Path(data_root).expanduser()
        self.root = self.data_root / spec.root
        self.transform = transform
        ids = list_ids(spec, self.data_root)
        warn_limit(limit, len(ids), spec.name)
        self.ids = ids if limit is None else ids[: int(limit)]
        hint = prepare_hint(spec, self.data_root)
        for i in range(len(self.ids)):
            if not self.image_path(i).is_file():
                raise DataError(f"{spec.name}: image {self.image_path(i)} (listed in "
                                f"{spec.split}) is missing: run {hint}")
            if not self.label_path(i).is_file():
                raise DataError(f"{spec.name}: image {self.image_path(i)} has no label file "
                                f"{self.label_path(i)}: run {hint}")

    def image_path(self, i: int) -> Path:
        return self.spec.image_path(self.data_root, self.ids[i])

    def label_path(self, i: int) -> Path:
        return self.spec.label_path(self.data_root, self.ids[i])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i]  # IndexError past the end ends plain iteration
        image = read_image(self.image_path(i))
        label_file = self.label_path(i)
        label = apply_label_rule(read_label(label_file), self.spec.label_rule)
        check_label(label, image.shape[:2], self.spec.num_classes, str(label_file))
        item = {"id": image_id, "image": image, "label": label}
        if self.transform is not None:
            item["input"] = self.transform(image)
        return item
