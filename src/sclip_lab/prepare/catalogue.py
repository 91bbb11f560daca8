"""What prepare knows, read from ``conf/dataset/*.yaml``: benchmarks, archives, sections.

Each dataset file's ``prepare:`` section (schema: ``data.PrepareConfig``) gives its
position in the benchmark lists (``order``, the paper's Table 1), the archive keys it
``needs`` (``train_needs`` with train=true), its label ``converter`` and the ``archives``
it defines. An archive is defined once, in one file, and any benchmark may need it by key
(voc20 uses voc21's, context59 context60's, coco_object coco_stuff's).
"""

from __future__ import annotations

import copy
import functools
from collections import UserDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from sclip_lab.config import CONF_DIR
from sclip_lab.data import BenchmarkSpec, DataError, dataset_config, spec_from_config
from sclip_lab.errors import brief


@dataclass(frozen=True)
class Archive:
    """One official file and where its members go.

    Attributes:
        filename: name on the server and in ``from=DIR``.
        url: download address; None = needs a login (``from=DIR`` only).
        checksum: ``(algorithm, hex digest)`` as published; None = not published (zip
            archives are then still checked by their member CRCs while extracting).
        size_mb: approximate size in MB, for announcements only (not checked).
        dest: folder (relative to data_root) the members are extracted into, or the file
            path (relative to data_root) for a plain file.
        members: extract only members under these prefixes; () = a plain file.
        train_members: also extracted with train=true.
    """

    filename: str
    url: str | None
    checksum: tuple[str, str] | None
    size_mb: int
    dest: str
    members: tuple[str, ...] = ()
    train_members: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Archive:
        """An archive of ``dataset.prepare.archives`` (a checked ``ArchiveConfig``)."""
        checksum = cfg["checksum"]
        return cls(cfg["filename"], cfg["url"],
                   None if checksum is None else (checksum["algorithm"], checksum["value"]),
                   cfg["size_mb"], cfg["dest"], tuple(cfg["members"]),
                   tuple(cfg["train_members"]))


@functools.cache
def _sections() -> dict[str, dict[str, Any]]:
    """Every ``conf/dataset/<name>.yaml``, checked against the schema, by name."""
    sections = {}
    for path in sorted((CONF_DIR / "dataset").glob("*.yaml")):
        try:
            raw = OmegaConf.load(path)
        except Exception as e:  # noqa: BLE001 - any YAML error is the file's fault
            raise DataError(f"cannot read {path} ({brief(e)})", detail=str(e)) from None
        sections[path.stem] = dataset_config(raw)
    return sections


def benchmarks() -> tuple[str, ...]:
    """The benchmarks with a dataset file, by ``prepare.order`` (then by name)."""
    order = {name: s["prepare"]["order"] for name, s in _sections().items()}
    return tuple(sorted(order, key=lambda n: (order[n] is None, order[n] or 0, n)))


def load_section(name: str) -> dict[str, Any]:
    """``conf/dataset/<name>.yaml`` as a checked plain dict (every schema key present)."""
    if name not in _sections():
        raise DataError(f"unknown benchmark {name!r}; choose one of: {', '.join(benchmarks())}")
    return copy.deepcopy(_sections()[name])


def _load_archives() -> dict[str, Archive]:
    archives: dict[str, Archive] = {}
    owner: dict[str, str] = {}
    for name, section in _sections().items():
        for key, cfg in section["prepare"]["archives"].items():
            if key in owner:
                raise DataError(f"archive {key!r} is defined in both {owner[key]}.yaml and "
                                f"{name}.yaml under conf/dataset; define it once")
            owner[key], archives[key] = name, Archive.from_config(cfg)
    return archives


class Catalogue(UserDict):
    """Every archive of the dataset files by key, read on first use. A mutable mapping:
    callers (and tests) may add or replace entries."""

    def __init__(self) -> None:  # UserDict's would fill ``data`` now
        pass

    @functools.cached_property
    def data(self) -> dict[str, Archive]:  # type: ignore[override]
        return _load_archives()


ARCHIVES = Catalogue()


def needs(section: Mapping[str, Any], with_train: bool = False) -> tuple[str, ...]:
    """Keys of the archives a (checked) dataset section needs."""
    prep = section["prepare"]
    return tuple(prep["needs"]) + (tuple(prep["train_needs"]) if with_train else ())


def split_specs(section: Mapping[str, Any], spec: BenchmarkSpec | None = None,
                with_train: bool = False) -> dict[str, BenchmarkSpec]:
    """``{"val": spec, "train": spec}`` (train only when asked) of a dataset section."""
    specs = {"val": spec or spec_from_config(section)}
    if with_train:
        train = dict(section)
        train.update(section.get("train") or {})
        train.pop("train", None)
        specs["train"] = spec_from_config(train)
    return specs


def size_text(mb: int) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb} MB"


def download_size(section: Mapping[str, Any], archives: Mapping[str, Archive],
                  with_train: bool = False) -> str:
    """What the archives of a dataset section weigh, as text ("1.9 GB")."""
    return size_text(sum(archives[k].size_mb for k in needs(section, with_train)))
