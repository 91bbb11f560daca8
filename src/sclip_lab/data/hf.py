"""The Hugging Face source (``dataset.source=hf``): the items of the files source."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sclip_lab.data.datasets import warn_limit
from sclip_lab.data.readers import apply_label_rule, check_label, decode_image, label_array
from sclip_lab.data.spec import BenchmarkSpec, DataError


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
