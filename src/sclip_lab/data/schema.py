"""The typed schema of ``conf/dataset/*.yaml`` and the spec it builds.

``DatasetConfig`` is registered with Hydra's ConfigStore as ``dataset/base_dataset``; every
dataset file extends it through its defaults list (``defaults: [base_dataset, _self_]``),
so a misspelled key or a value of the wrong type fails at composition with Hydra's own
message. ``dataset_config`` applies the same schema to plain mappings (tests, prepare), and
``spec_from_config`` adds the range checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sclip_lab.data.spec import LABEL_RULES, BenchmarkSpec, DataError


@dataclass
class HFConfig:
    """``dataset.hf``: a Hugging Face dataset read instead of the files (``source: hf``)."""

    path: str | None = None            # hub id, dataset folder or save_to_disk folder
    name: str | None = None            # hub config name
    split: str | None = "validation"
    image_column: str | None = "image"
    label_column: str | None = "annotation"
    streaming: bool = False


@dataclass
class ChecksumConfig:
    algorithm: str = MISSING           # a hashlib name: md5, sha1, sha256
    value: str = MISSING               # hex digest as published


@dataclass
class ArchiveConfig:
    """One official file of ``dataset.prepare.archives`` (see ``sclip_lab.prepare``)."""

    filename: str = MISSING            # name on the server and in from=DIR
    url: str | None = None             # None: behind a login (prepare.login), from=DIR only
    checksum: ChecksumConfig | None = None  # None: not published
    size_mb: int = MISSING             # approximate, for announcements only
    dest: str = MISSING                # extraction folder (or the file) under data_root
    members: list[str] = field(default_factory=list)        # [] = a plain file
    train_members: list[str] = field(default_factory=list)  # also extracted with train=true


@dataclass
class PrepareConfig:
    """``dataset.prepare``: how ``python -m sclip_lab.prepare`` builds the benchmark."""

    order: int | None = None           # position in benchmark lists (paper's Table 1 column)
    needs: list[str] = field(default_factory=list)        # archive keys of the val split
    train_needs: list[str] = field(default_factory=list)  # fetched too with train=true
    converter: str | None = None       # a key of prepare.convert.CONVERTERS; None = as released
    login: str | None = None           # page of the archives that have no url
    # Archives defined here, by key; any dataset file may list them under needs.
    archives: dict[str, ArchiveConfig] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """A dataset section (``cfg.dataset``); ``???`` marks what every file must set."""

    name: str = MISSING
    classes: list[str] = MISSING       # one line per class; ", " joins synonyms
    root: str = MISSING
    img_dir: str = MISSING
    img_suffix: str = MISSING
    ann_dir: str = MISSING
    ann_suffix: str = MISSING
    split: str | None = MISSING        # null: every image file under img_dir
    label_rule: str = MISSING
    short_side: int = MISSING
    logit_scale: float = MISSING
    prob_thd: float = MISSING
    area_thd: float | None = MISSING   # null: off
    expected_images: int = MISSING
    synonyms: bool = True              # false: each class by its first name alone
    background_word: str | None = None  # with synonyms=false: the name of class 0
    # {class index: line} replacing lines of classes (a protocol's own class files)
    class_overrides: dict[int, str] = field(default_factory=dict)
    source: str = "files"
    train: dict[str, Any] = field(default_factory=dict)  # overrides for the training split
    hf: HFConfig = field(default_factory=HFConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


# Keys that must be given but may be null (a missing one is reported with "null = none").
_NULLABLE = ("split", "area_thd")


def register_schema() -> None:
    """Store DatasetConfig as ``dataset/base_dataset``, the head of every dataset file's
    defaults list; must run before any Hydra composition (done on import)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="dataset", name="base_dataset", node=DatasetConfig)


register_schema()


def as_plain(section: Mapping) -> dict[str, Any]:
    """A resolved plain dict of a DictConfig or any mapping."""
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    return dict(section)


def dataset_config(section: Mapping) -> dict[str, Any]:
    """A dataset section checked against ``DatasetConfig``, as a plain dict with every key.

    Args:
        section: ``cfg.dataset`` (DictConfig), a plain mapping, or a ``conf/dataset`` file
            read as is (its ``defaults`` list is ignored).

    Raises:
        DataError: a key is missing or unknown, or holds a value of the wrong type.
    """
    if not isinstance(section, Mapping):
        raise DataError(f"dataset section must be a mapping (got {type(section).__name__}); "
                        "choose a benchmark with dataset=<name>")
    cfg = as_plain(section)
    cfg.pop("defaults", None)
    name = cfg.get("name")
    where = f"dataset {'<unnamed>' if name in (None, MISSING) else name}"
    if isinstance(section, DictConfig) and OmegaConf.get_type(section) is DatasetConfig:
        merged = OmegaConf.create(cfg)  # composed through the schema: spare a second check
    else:
        # null in a required key reads as missing: the message then says what to set.
        cfg = {k: v for k, v in cfg.items() if v is not None or k in _NULLABLE}
        try:
            merged = OmegaConf.merge(OmegaConf.structured(DatasetConfig), cfg)
        except OmegaConfBaseException as e:
            raise DataError(f"{where}: dataset.{e.full_key}: {str(e.msg).splitlines()[0]}"
                            ) from None
    order = [f.name for f in fields(DatasetConfig)]
    missing = sorted(OmegaConf.missing_keys(merged),
                     key=lambda k: (order.index(k) if k in order else len(order), k))
    if missing:
        key = missing[0]
        hint = "(null = none)" if key in _NULLABLE else "(see conf/dataset/voc21.yaml)"
        raise DataError(f"{where}: key '{key}' is missing; set dataset.{key} {hint}")
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


def first_names(classes: tuple[str, ...], background_word: str | None) -> tuple[str, ...]:
    """One name per class (``dataset.synonyms=false``, ClearCLIP's vocabulary): each line's
    first name; class 0 becomes ``background_word`` when one is given."""
    names = tuple(line.split(",")[0].strip() for line in classes)
    return ((background_word,) + names[1:]) if background_word else names


def spec_from_config(section: Mapping) -> BenchmarkSpec:
    """Validate a dataset section (``cfg.dataset``) and build its spec.

    Args:
        section: the composed ``conf/dataset/<name>.yaml`` (DictConfig or mapping); types
            and keys are checked by ``dataset_config``, ranges here.

    Raises:
        DataError: a key is missing or holds a value of the wrong type or range.
    """
    cfg = dataset_config(section)
    name = cfg["name"]
    where = f"dataset {name}"
    classes = tuple(cfg["classes"])
    if not classes or not all(c.strip() for c in classes):
        raise DataError(f"{where}: dataset.classes must be a non-empty list of non-empty "
                        "strings (one line per class, synonyms joined by ', ')")
    if cfg["label_rule"] not in LABEL_RULES:
        raise DataError(f"{where}: dataset.label_rule={cfg['label_rule']!r} is not one of "
                        f"{', '.join(LABEL_RULES)}")
    split = cfg["split"]
    if split == "":
        raise DataError(f"{where}: dataset.split={split!r} must be a path or null")
    if cfg["short_side"] < 1 or cfg["logit_scale"] <= 0:
        raise DataError(f"{where}: short_side ({cfg['short_side']}) and logit_scale "
                        f"({cfg['logit_scale']}) must be positive")
    if not 0.0 <= cfg["prob_thd"] < 1.0:
        raise DataError(f"{where}: dataset.prob_thd={cfg['prob_thd']} must be in [0, 1) "
                        "(0.0 = off)")
    area = cfg["area_thd"]
    if area is not None and not 0.0 <= area < 1.0:
        raise DataError(f"{where}: dataset.area_thd={area!r} must be in [0, 1) or null (off)")
    if cfg["expected_images"] < 0:
        raise DataError(f"{where}: dataset.expected_images={cfg['expected_images']} must "
                        "be ≥ 0")
    overrides = cfg["class_overrides"]
    bad = sorted(i for i, line in overrides.items()
                 if not 0 <= i < len(classes) or not line.strip())
    if bad:
        raise DataError(f"{where}: dataset.class_overrides[{bad[0]}] must name one of the "
                        f"{len(classes)} classes (0..{len(classes) - 1}) with a non-empty line")
    classes = tuple(overrides.get(i, line) for i, line in enumerate(classes))
    if not cfg["synonyms"]:
        classes = first_names(classes, cfg["background_word"])
    return BenchmarkSpec(
        name=name, classes=classes, root=cfg["root"], img_dir=cfg["img_dir"],
        img_suffix=cfg["img_suffix"], ann_dir=cfg["ann_dir"], ann_suffix=cfg["ann_suffix"],
        split=split, label_rule=cfg["label_rule"], short_side=cfg["short_side"],
        logit_scale=cfg["logit_scale"], prob_thd=cfg["prob_thd"], area_thd=area,
        expected_images=cfg["expected_images"])
