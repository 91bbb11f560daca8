"""Verification of a prepared split (with the data room's readers and checks), the ready marker."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sclip_lab.data import (
    IGNORE_INDEX,
    BenchmarkSpec,
    DataError,
    apply_label_rule,
    list_ids,
    read_label,
    values_outside,
)

MARKER = ".sclip_ready.{name}.json"  # under the benchmark root, written after verification


@dataclass
class Report:
    """What ``verify`` found for one split."""

    name: str
    split: str
    images: int = 0
    expected: int = 0
    values: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        status = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        values = sorted(self.values - {IGNORE_INDEX})
        shown = f"{values[0]}..{values[-1]}" if values else "-"
        return (f"{self.name} {self.split}: {self.images}/{self.expected} images, label values "
                f"{shown}{' (+255)' if IGNORE_INDEX in self.values else ''}: {status}")


def verify(spec: BenchmarkSpec, data_root: Path, split: str = "val",
           max_problems: int = 20) -> Report:
    """Check a prepared split: count, every label present, sizes equal, values in range.

    Values are checked after the label rule: 0..C-1 or 255.
    """
    report = Report(spec.name, split, expected=spec.expected_images)
    try:
        ids = list_ids(spec, data_root)
    except DataError as e:
        report.problems.append(str(e))
        return report
    report.images = len(ids)
    if len(ids) != spec.expected_images:
        report.problems.append(f"{len(ids)} images, expected {spec.expected_images}")
    for image_id in tqdm(ids, desc=f"verify {spec.name} {split}", unit="img", leave=False):
        if len(report.problems) >= max_problems:
            report.problems.append("... (stopped listing problems)")
            break
        image_path = spec.image_path(data_root, image_id)
        label_path = spec.label_path(data_root, image_id)
        if not image_path.is_file():
            report.problems.append(f"missing image {image_path}")
            continue
        if not label_path.is_file():
            report.problems.append(f"missing label {label_path}")
            continue
        try:
            with Image.open(image_path) as im:
                size = im.size  # the header only: no decoding of every image
            raw = read_label(label_path)
        except (OSError, DataError) as e:
            report.problems.append(f"unreadable {image_path.name}/{label_path.name}: {e}")
            continue
        if (raw.shape[1], raw.shape[0]) != size:
            report.problems.append(f"{label_path} is {raw.shape[1]}×{raw.shape[0]}, its image "
                                   f"{size[0]}×{size[1]}")
            continue
        label = apply_label_rule(raw, spec.label_rule)
        bad = values_outside(label, spec.num_classes)
        if bad:
            report.problems.append(f"{label_path} holds {bad[:5]} outside "
                                   f"0..{spec.num_classes - 1} and {IGNORE_INDEX}")
        report.values |= set(np.unique(label).tolist())
    return report


def marker_path(spec: BenchmarkSpec, data_root: Path) -> Path:
    return data_root / spec.root / MARKER.format(name=spec.name)


def is_ready(spec: BenchmarkSpec, data_root: Path, splits: Sequence[str] = ("val",)) -> bool:
    """Whether ``spec`` was verified under ``data_root`` (for every split in ``splits``)."""
    try:
        done = json.loads(marker_path(spec, data_root).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(s in done for s in splits)


def write_marker(spec: BenchmarkSpec, data_root: Path, reports: Sequence[Report]) -> Path:
    path = marker_path(spec, data_root)
    payload = {"benchmark": spec.name, "prepared": datetime.now(timezone.utc).isoformat(),
               "splits": {r.split: {"images": r.images, "values": sorted(r.values)}
                          for r in reports}}
    path.write_text(json.dumps(payload, indent=1))
    return path
