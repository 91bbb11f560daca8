"""The benchmarks room: specs from ``conf/dataset/*.yaml``, label rules and loaders.

- ``schema``: ``DatasetConfig``, the typed schema every ``conf/dataset/*.yaml`` extends
  (Hydra's ConfigStore ``dataset/base_dataset``, registered on import), and
  ``spec_from_config``.
- ``spec``: ``BenchmarkSpec`` (docs/protocol.md §6): vocabulary (§12), layout relative to
  ``data_root``, protocol constants; ``list_ids``; ``DataError``.
- ``readers``: images with OpenCV (BGR converted to RGB), ground truth with PIL (palette
  indices / grey values) at the original resolution, as the published code does (§5.1);
  the label rules and label checks.
- ``datasets``: ``SegmentationDataset`` (the standard layout); ``hf``:
  ``HFSegmentationDataset``, the same items from a Hugging Face dataset
  (``dataset.source=hf``); ``build_dataset`` (here) picks one.

Every layout problem is a ``DataError`` whose one-line message names the fix."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from sclip_lab.data.datasets import SegmentationDataset, warn_limit
from sclip_lab.data.hf import HFSegmentationDataset, load_hf_rows
from sclip_lab.data.readers import (
    apply_label_rule,
    check_label,
    decode_image,
    label_array,
    read_image,
    read_label,
    values_outside,
)
from sclip_lab.data.schema import (
    ArchiveConfig,
    ChecksumConfig,
    DatasetConfig,
    HFConfig,
    PrepareConfig,
    as_plain,
    dataset_config,
    register_schema,
    spec_from_config,
)
from sclip_lab.data.spec import (
    DATA_ENV,
    DEFAULT_DATA_ROOT,
    IGNORE_INDEX,
    LABEL_RULES,
    SOURCES,
    BenchmarkSpec,
    DataError,
    list_ids,
    prepare_hint,
    resolve_data_root,
)

__all__ = [
    "DATA_ENV", "DEFAULT_DATA_ROOT", "IGNORE_INDEX", "LABEL_RULES", "SOURCES", "ArchiveConfig",
    "BenchmarkSpec", "ChecksumConfig", "DataError", "DatasetConfig", "HFConfig",
    "HFSegmentationDataset", "PrepareConfig", "SegmentationDataset", "apply_label_rule",
    "as_plain",
    "build_dataset", "check_label", "dataset_config", "decode_image", "label_array",
    "list_ids", "load_hf_rows", "prepare_hint", "read_image", "read_label",
    "register_schema", "resolve_data_root", "spec_from_config", "values_outside",
    "warn_limit",
]


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
    cfg = as_plain(section)
    source = cfg.get("source") or "files"
    if source == "files":
        return SegmentationDataset(spec, resolve_data_root(data_root), limit, transform)
    if source == "hf":
        return HFSegmentationDataset(spec, cfg.get("hf") or {}, limit, transform)
    raise DataError(f"dataset.source={source!r} is not one of {', '.join(SOURCES)}")
