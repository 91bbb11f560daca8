"""A benchmark's spec and its layout on disk: ``BenchmarkSpec``, ``list_ids``, ``DataError``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sclip_lab.errors import UserError

IGNORE_INDEX = 255
LABEL_RULES = ("identity", "reduce_zero_label")
SOURCES = ("files", "hf")
DATA_ENV = "SCLIP_DATA"
DEFAULT_DATA_ROOT = "./data"


class DataError(UserError):
    """A benchmark that cannot be read; the message is one line naming the fix."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark: vocabulary, layout under ``data_root`` and protocol constants.

    Attributes:
        name: benchmark name (``voc21``, ``cityscapes``, ...).
        classes: one line per class in class-index order; synonyms joined by ", ".
        root: benchmark folder relative to ``data_root`` (e.g. ``VOCdevkit/VOC2012``).
        img_dir, ann_dir: image / label folders relative to ``root``.
        img_suffix, ann_suffix: what follows the id in image / label file names.
        split: split file relative to ``root`` (one id per line), or None for every
            image file under ``img_dir`` (recursive).
        label_rule: ``identity`` or ``reduce_zero_label`` (see ``apply_label_rule``).
        short_side: resize target of the short side (docs/protocol.md §5.2).
        logit_scale: multiplier of the cosine logits before the softmax.
        prob_thd: pixels below this max probability become class 0; 0.0 = off.
        area_thd: minimum area fraction of a predicted class; None = off.
        expected_images: size of the full split (checked by the preparation step).
    """

    name: str
    classes: tuple[str, ...]
    root: str
    img_dir: str
    img_suffix: str
    ann_dir: str
    ann_suffix: str
    split: str | None
    label_rule: str
    short_side: int
    logit_scale: float
    prob_thd: float
    area_thd: float | None
    expected_images: int

    @property
    def num_classes(self) -> int:
        """C, the number of classes (lines of the vocabulary)."""
        return len(self.classes)

    @property
    def layout(self) -> str:
        """The expected layout in one line, for error messages."""
        split = f", split {self.split}" if self.split else ""
        return (f"{self.root}/{{{self.img_dir}/<id>{self.img_suffix}, "
                f"{self.ann_dir}/<id>{self.ann_suffix}{split}}}")

    def image_path(self, data_root: Path, image_id: str) -> Path:
        return data_root / self.root / self.img_dir / f"{image_id}{self.img_suffix}"

    def label_path(self, data_root: Path, image_id: str) -> Path:
        return data_root / self.root / self.ann_dir / f"{image_id}{self.ann_suffix}"


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The data root: the given path, else ``$SCLIP_DATA``, else ``./data``."""
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT
    return Path(data_root).expanduser()


def prepare_hint(spec: BenchmarkSpec, data_root: Path) -> str:
    """The command that prepares ``spec`` under ``data_root``."""
    return f"python -m sclip_lab.prepare {spec.name} data_root={data_root}"


def list_ids(spec: BenchmarkSpec, data_root: str | os.PathLike) -> list[str]:
    """Sorted ids of the benchmark after checking its layout (no label check).

    Raises:
        DataError: data root, benchmark root, image folder or split file missing, or no
            image at all.
    """
    data_root = Path(data_root).expanduser()
    hint = prepare_hint(spec, data_root)
    if data_root.exists() and not data_root.is_dir():
        raise DataError(f"data_root {data_root} is a file; point data_root=... (or "
                        f"${DATA_ENV}) at the folder that holds {spec.root}")
    if not data_root.is_dir():
        raise DataError(f"data_root {data_root} does not exist: run {hint}, or point "
                        f"data_root=... (or ${DATA_ENV}) at the folder that holds {spec.root}")
    root = data_root / spec.root
    if not root.is_dir():
        raise DataError(f"{spec.name}: {root} not found: run {hint} (expected layout "
                        f"{spec.layout}), or fix data_root=... / ${DATA_ENV}")
    img_dir = root / spec.img_dir
    if not img_dir.is_dir():
        raise DataError(f"{spec.name}: image folder {img_dir} is missing: run {hint} "
                        f"(expected layout {spec.layout})")
    if spec.split is not None:
        split = root / spec.split
        if not split.is_file():
            raise DataError(f"{spec.name}: split file {split} is missing: run {hint}")
        ids = sorted({line.strip() for line in split.read_text().splitlines() if line.strip()})
    else:
        n = len(spec.img_suffix)
        ids = sorted(p.relative_to(img_dir).as_posix()[:-n]
                     for p in img_dir.rglob(f"*{spec.img_suffix}") if p.is_file())
    if not ids:
        what = f"split {spec.split} lists no id" if spec.split else (
            f"no *{spec.img_suffix} file under {img_dir}")
        raise DataError(f"{spec.name}: {what}: run {hint}")
    return ids
