"""The benchmarks room: specs from ``conf/dataset/*.yaml``, label rules and loaders.

One ``BenchmarkSpec`` per benchmark (docs/protocol.md §6) holds its vocabulary (§12), its on-disk
layout relative to ``data_root`` and its protocol constants. ``SegmentationDataset``
reads the standard layout as the published code does (§5.1): images with OpenCV (BGR,
converted to RGB), ground truth with PIL (palette indices / grey values) at the original
resolution, then the benchmark's label rule. ``HFSegmentationDataset`` gives the same
items from a Hugging Face dataset (``dataset.source=hf``); ``build_dataset`` picks one.

Every layout problem is a ``DataError`` whose one-line message names the fix.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sclip_lab.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
SYNONYM_SEP = ", "
LABEL_RULES = ("identity", "reduce_zero_label")
SOURCES = ("files", "hf")
DATA_ENV = "SCLIP_DATA"
DEFAULT_DATA_ROOT = "./data"

# Keys a dataset section must have, with the Python types they must hold.
_REQUIRED: dict[str, tuple[type, ...]] = {
    "name": (str,), "classes": (list, tuple), "root": (str,), "img_dir": (str,),
    "img_suffix": (str,), "ann_dir": (str,), "ann_suffix": (str,), "label_rule": (str,),
    "short_side": (int,), "logit_scale": (int, float), "prob_thd": (int, float),
    "expected_images": (int,),
}


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

    def queries(self) -> tuple[list[str], list[int]]:
        """All names (Q of them, synonyms split, not de-duplicated) and their classes.

        Returns:
            ``(names, query_class)``: ``names[q]`` is a text query and
            ``query_class[q]`` the index of the class whose line it comes from.
        """
        names: list[str] = []
        query_class: list[int] = []
        for c, line in enumerate(self.classes):
            for name in line.split(SYNONYM_SEP):
                names.append(name.strip())
                query_class.append(c)
        return names, query_class

    @property
    def layout(self) -> str:
        """The expected layout in one line, for error messages."""
        split = f", split {self.split}" if self.split else ""
        return (f"{self.root}/{{{self.img_dir}/<id>{self.img_suffix}, "
                f"{self.ann_dir}/<id>{self.ann_suffix}{split}}}")


def _plain(section: Mapping) -> dict[str, Any]:
    """A resolved plain dict of a DictConfig or any mapping."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(section)


def spec_from_config(section: Mapping) -> BenchmarkSpec:
    """Validate a dataset section (``cfg.dataset``) and build its spec.

    Args:
        section: the composed ``conf/dataset/<name>.yaml`` (DictConfig or mapping).
            Extra keys (``source``, ``hf``, ``train``) are allowed and ignored here.

    Raises:
        DataError: a key is missing or holds a value of the wrong type or range.
    """
    if not isinstance(section, Mapping):
        raise DataError(f"dataset section must be a mapping (got {type(section).__name__}); "
                        "choose a benchmark with dataset=<name>")
    cfg = _plain(section)
    name = cfg.get("name", "<unnamed>")
    where = f"dataset {name}"
    for key, types in _REQUIRED.items():
        if cfg.get(key) is None:
            raise DataError(f"{where}: key '{key}' is missing; set dataset.{key} "
                            "(see conf/dataset/voc21.yaml)")
        value = cfg[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join(t.__name__ for t in types)
            raise DataError(f"{where}: dataset.{key}={value!r} must be {expected}")
    for key in ("split", "area_thd"):
        if key not in cfg:
            raise DataError(f"{where}: key '{key}' is missing; set dataset.{key} (null = none)")
    classes = tuple(cfg["classes"])
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise DataError(f"{where}: dataset.classes must be a non-empty list of non-empty "
                        "strings (one line per class, synonyms joined by ', ')")
    if cfg["label_rule"] not in LABEL_RULES:
        raise DataError(f"{where}: dataset.label_rule={cfg['label_rule']!r} is not one of "
                        f"{', '.join(LABEL_RULES)}")
    split = cfg["split"]
    if split is not None and (not isinstance(split, str) or not split):
        raise DataError(f"{where}: dataset.split={split!r} must be a path or null")
    if cfg["short_side"] < 1 or cfg["logit_scale"] <= 0:
        raise DataError(f"{where}: short_side ({cfg['short_side']}) and logit_scale "
                        f"({cfg['logit_scale']}) must be positive")
    if not 0.0 <= cfg["prob_thd"] < 1.0:
        raise DataError(f"{where}: dataset.prob_thd={cfg['prob_thd']} must be in [0, 1) "
                        "(0.0 = off)")
    area = cfg["area_thd"]
    if area is not None and (isinstance(area, bool) or not isinstance(area, (int, float))
                             or not 0.0 <= area < 1.0):
        raise DataError(f"{where}: dataset.area_thd={area!r} must be in [0, 1) or null (off)")
    if cfg["expected_images"] < 0:
        raise DataError(f"{where}: dataset.expected_images={cfg['expected_images']} must "
                        "be ≥ 0")
    return BenchmarkSpec(
        name=name, classes=classes, root=cfg["root"], img_dir=cfg["img_dir"],
        img_suffix=cfg["img_suffix"], ann_dir=cfg["ann_dir"], ann_suffix=cfg["ann_suffix"],
        split=split, label_rule=cfg["label_rule"], short_side=int(cfg["short_side"]),
        logit_scale=float(cfg["logit_scale"]), prob_thd=float(cfg["prob_thd"]),
        area_thd=None if area is None else float(area),
        expected_images=int(cfg["expected_images"]))


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


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The data root: the given path, else ``$SCLIP_DATA``, else ``./data``."""
    if data_root is None or str(data_root) == "":
        data_root = os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT
    return Path(data_root).expanduser()


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
        raise DataError(f"cannot read label {path} ({type(e).__name__}: {e}); re-extract or "
                        "re-prepare the benchmark") from None


def check_label(label: np.ndarray, image_hw: tuple[int, int], num_classes: int,
                what: str) -> None:
    """Raise DataError if ``label`` (after the rule) mismatches the image or the classes."""
    if label.shape != tuple(image_hw):
        raise DataError(f"label {what} is {label.shape[1]}×{label.shape[0]} but its image is "
                        f"{image_hw[1]}×{image_hw[0]} (W×H); re-prepare the benchmark")
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= num_classes))
    if bad.any():
        values = sorted({int(v) for v in np.unique(label[bad])})[:5]
        raise DataError(f"label {what} holds values {values} outside 0..{num_classes - 1} "
                        f"and {IGNORE_INDEX} after the label rule; wrong label files or rule")


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
        return self.root / self.spec.img_dir / f"{self.ids[i]}{self.spec.img_suffix}"

    def label_path(self, i: int) -> Path:
        return self.root / self.spec.ann_dir / f"{self.ids[i]}{self.spec.ann_suffix}"

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


def _hf_image(value: Any, what: str, *, label: bool) -> np.ndarray:
    """A Hugging Face cell (PIL image, {'bytes', 'path'} dict, array) as an array."""
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            data = Path(path).read_bytes()
        if data is None:
            raise DataError(f"{what} is empty; check dataset.hf.*_column")
        if not label:
            return decode_image(data, what)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return label_array(image, what)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot decode label {what} ({e})") from None
    if isinstance(value, Image.Image):
        if label:
            return label_array(value, what)
        # Already decoded upstream (a non-Image feature holding PIL objects).
        return np.asarray(value.convert("RGB"))
    array = np.asarray(value)
    if label:
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{what} is {array.dtype} {array.shape}, not a 2-D integer map")
        return array
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] < 3:
        raise DataError(f"{what} is {array.shape}, not an (H, W, 3) image")
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


class HFSegmentationDataset(torch.utils.data.Dataset):
    """A benchmark read from a Hugging Face dataset, with the items of SegmentationDataset.

    Args:
        spec: the benchmark (label rule and classes).
        hf: ``dataset.hf``: ``path`` (hub id, local dataset folder or a ``save_to_disk``
            folder), ``name``, ``split``, ``image_column``, ``label_column``, ``streaming``.
        limit: keep only the first N rows.
        transform: applied to the RGB image to make ``input``.

    Images stored as encoded bytes are decoded with OpenCV like the files source; label
    maps with PIL. In streaming mode the rows are read in order and ``limit`` is needed
    to know the length up front (otherwise the stream is read once to count it).
    """

    def __init__(self, spec: BenchmarkSpec, hf: Mapping, limit: int | None = None,
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        if limit is not None and int(limit) < 1:
            raise DataError(f"limit={limit} must be ≥ 1 (or null for the whole split)")
        hf = dict(hf or {})
        if not hf.get("path"):
            raise DataError(f"{spec.name}: dataset.source=hf needs dataset.hf.path=<hub id or "
                            "local dataset folder>")
        self.spec, self.transform = spec, transform
        self.image_column = str(hf.get("image_column") or "image")
        self.label_column = str(hf.get("label_column") or "annotation")
        self.streaming = bool(hf.get("streaming", False))
        rows = load_hf_rows(hf, self.streaming)
        columns = getattr(rows, "column_names", None) or []
        missing = [c for c in (self.image_column, self.label_column) if columns and
                   c not in columns]
        if missing:
            raise DataError(f"{spec.name}: hf dataset {hf['path']} has no column "
                            f"{', '.join(missing)} (columns: {', '.join(columns)}); set "
                            "dataset.hf.image_column / dataset.hf.label_column")
        if self.streaming:
            stream = rows.take(int(limit)) if limit is not None else rows
            self.rows = list(stream)  # materialised once: random access for DataLoaders
        else:
            warn_limit(limit, len(rows), spec.name)
            self.rows = rows if limit is None else rows.select(range(min(int(limit),
                                                                          len(rows))))
        if len(self.rows) == 0:
            raise DataError(f"{spec.name}: hf dataset {hf['path']} split {hf.get('split')} "
                            "is empty")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = self.rows[i]
        what = f"row {i} of the hf dataset"
        image = _hf_image(row[self.image_column], f"{what} ({self.image_column})", label=False)
        raw = _hf_image(row[self.label_column], f"{what} ({self.label_column})", label=True)
        label = apply_label_rule(raw, self.spec.label_rule)
        check_label(label, image.shape[:2], self.spec.num_classes, what)
        image_id = str(row["id"]) if "id" in row else f"{i:06d}"
        item = {"id": image_id, "image": image, "label": label}
        if self.transform is not None:
            item["input"] = self.transform(image)
        return item


def load_hf_rows(hf: Mapping, streaming: bool):
    """The split ``hf['split']`` of ``hf['path']`` with image columns left undecoded."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError("dataset.source=hf needs the datasets package: pip install "
                        "datasets") from None
    path, split = str(hf["path"]), hf.get("split") or "validation"
    try:
        local = Path(path).expanduser()
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            rows = datasets.load_from_disk(str(local))
            if isinstance(rows, datasets.DatasetDict):
                if split not in rows:
                    raise DataError(f"hf dataset {path} has no split {split} (splits: "
                                    f"{', '.join(rows)}); set dataset.hf.split")
                rows = rows[split]
            if streaming:
                rows = rows.to_iterable_dataset()
        else:
            rows = datasets.load_dataset(path, hf.get("name"), split=split,
                                         streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - hub, file and split errors all mean "not found"
        raise DataError(f"cannot load hf dataset {path} split {split} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check dataset.hf.path, "
                        "dataset.hf.split, and HF_DATASETS_OFFLINE / the hub cache") from None
    # Keep images as bytes so that they are decoded like files (OpenCV), not by PIL.
    features = getattr(rows, "features", None) or {}
    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows


def build_dataset(section: Mapping | BenchmarkSpec, data_root: str | os.PathLike | None,
                  limit: int | None = None,
                  transform: Callable[[np.ndarray], Any] | None = None) -> torch.utils.data.Dataset:
    """The dataset of a dataset section (``source: files | hf``) or of a spec (files).

    Args:
        section: ``cfg.dataset`` (or a plain mapping), or a BenchmarkSpec.
        data_root: folder holding the benchmark (files source); None = ``$SCLIP_DATA``
            or ``./data``.
        limit: keep only the first N items.
        transform: applied to each RGB image to make ``input``.
    """
    if isinstance(section, BenchmarkSpec):
        return SegmentationDataset(section, resolve_data_root(data_root), limit, transform)
    spec = spec_from_config(section)
    cfg = _plain(section)
    source = cfg.get("source") or "files"
    if source == "files":
        return SegmentationDataset(spec, resolve_data_root(data_root), limit, transform)
    if source == "hf":
        return HFSegmentationDataset(spec, cfg.get("hf") or {}, limit, transform)
    raise DataError(f"dataset.source={source!r} is not one of {', '.join(SOURCES)}")
