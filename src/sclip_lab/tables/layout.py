"""Which rows and columns each table has, read from the configs that run its sweep.

Tables 1–3: one row per entry of ``rows:`` in ``conf/sweep/tableN.yaml``, in that order::

    rows:
      - {variant: attention=local window=5, key: local_5, label: Local window=5,
         latex: "Local attention, window $5$"}

``variant`` is a sweep variant (its ``trial=`` left out: a random row averages the trials),
``key`` the paper's row id (``paper``; a named table's ``table.paper`` and ``table.rerun``,
``tables.published``), ``label``/``latex`` the row labels (latex defaults to label). A label
the paper marks "(ours)" is shown as the method's name ("SCLIP (ours)" → "SCLIP"): here our
numbers are the "reproduced" ones, beside the "paper"'s (and, in a named table with a
``table.rerun`` section, a "re-run": another paper's or repository's independent re-run).
Table 4: one row per ``preprocess`` mode its sweep runs, with that mode's short side, window
and stride (``conf/preprocess/modeK.yaml``) and the run's default method.

The summary fields a record must match are not written down here: they are the summary
row (``records.summary_of``) of the run config composed with the row's overrides, as
``sclip_lab.run`` composes it. The columns are the paper's, in its order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from omegaconf import OmegaConf, open_dict

from sclip_lab.config import CONF_DIR, paper_short_side, variant_overrides
from sclip_lab.errors import ConfigError, message_of
from sclip_lab.head_spec import knob_field_names
from sclip_lab.records import summary_of
from sclip_lab.tables.paper import (
    ABLATION_DATASETS,
    TABLE1,
    TABLE1_AVG,
    TABLE1_DATASETS,
    TABLE2,
    TABLE3,
    TABLE4,
)
from sclip_lab.tables.published import published_sections

log = logging.getLogger(__name__)

TABLE_NUMBERS = (1, 2, 3, 4)
MISSING = "–"  # an empty cell
AVG = "avg"  # Table 1's "Avg." column
# The sources of a value, in every rendering and legend; never "ours", which the paper
# uses for its own method (a row), not for this reproduction. RERUN: another paper's or
# repository's independent re-run (a named table's ``table.rerun``), only where one is given.
REPRODUCED, PAPER, RERUN = "reproduced", "paper", "re-run"
PARTIAL_MARK = "†"  # a cell with a record of part of the split (``limit`` set)
_OURS_SUFFIX = " (ours)"


def method_label(label: str) -> str:
    """A row label as shown: the paper's "X (ours)" is the method X."""
    return label.removesuffix(_OURS_SUFFIX)


def match_fields() -> tuple[str, ...]:
    """The summary fields that tell variants apart (every declared knob's, from the
    registry); ``trial`` is averaged, not matched."""
    return tuple(dict.fromkeys(("attention", "projection", "n", "combine",
                                *knob_field_names(), "proxy", "postprocess",
                                "protocol")))


TABLE1_COLUMNS = dict(zip(TABLE1_DATASETS, ("VOC21", "Context60", "Object", "VOC20",
                                                  "City.", "Ctx59", "ADE20k", "Stuff.")))
ABLATION_COLUMNS = dict(zip(ABLATION_DATASETS, ("VOC21", "Context59", "COCO-Stuff")))

# Tables 1–3 use the dataset's own preprocessing (conf/preprocess/dataset.yaml): its short
# side (conf/dataset/*.yaml, the published code's) with these windows and stride.
_SCLIP_PROTOCOL = OmegaConf.load(CONF_DIR / "protocol" / "sclip.yaml").protocol
DEFAULT_CROP, DEFAULT_STRIDE = int(_SCLIP_PROTOCOL.window), int(_SCLIP_PROTOCOL.stride)
DEFAULT_SHORT_SIDE = {p.stem: int(OmegaConf.load(p).short_side)
                      for p in sorted((CONF_DIR / "dataset").glob("*.yaml"))}
# docs/protocol.md §9 "paper" preset: the paper's Table 1 setting, 336 everywhere but Cityscapes.
PAPER_SHORT_SIDE = {name: paper_short_side(name) for name in DEFAULT_SHORT_SIDE}
PRESETS = {"sclip": DEFAULT_SHORT_SIDE, "paper": PAPER_SHORT_SIDE}


@dataclass(frozen=True)
class Row:
    """One row of a table and the records that may fill it.

    Attributes:
        key: the row id shared with ``paper``.
        label: the row label in CSV, console and figures.
        latex: the row label in LaTeX.
        match: summary fields that must equal these values (see ``collect.field_value``).
        preprocess: ``(short_side, crop, stride)``, or one per dataset (a method's protocol;
            crop None = whole image); None = the dataset's default.
        trials: the row averages random-projection trials (mean ± std over ``trial``).
        match_by_dataset: per dataset, ``match`` where a knob's default depends on the
            benchmark (``${by_dataset:...}`` in a variant's file, e.g. ResCLIP's λ).
    """

    key: str
    label: str
    latex: str
    match: Mapping[str, Any]
    preprocess: tuple[int, int, int] | Mapping[str, tuple] | None = None  # or per dataset
    trials: bool = False
    match_by_dataset: Mapping[str, Mapping[str, Any]] | None = None
    variant: str = ""  # the sweep entry that fills it

    def match_for(self, dataset: str) -> Mapping[str, Any]:
        """The fields a record of ``dataset`` must match (knobs may differ per dataset)."""
        return (self.match_by_dataset or {}).get(dataset, self.match)


@dataclass(frozen=True)
class TableSpec:
    """A table: its rows, dataset columns and the paper's values."""

    number: int | str  # 1–4, or the name of a sweep with a table: section
    title: str
    index_name: str
    rows: tuple[Row, ...]
    columns: Mapping[str, str]  # dataset name -> column label
    paper: Mapping[str, Mapping[str, float]]
    paper_avg: Mapping[str, float] | None = None  # an "Avg." column (Table 1, grids)
    # Independent re-runs by others (``table.rerun``, ``rerun_avg``; ``rerun_source``: row
    # key -> where the numbers come from); empty = the table has no re-run source.
    rerun: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    rerun_avg: Mapping[str, float] | None = None
    rerun_source: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_rerun(self) -> bool:
        """Whether the table shows a third source, re-runs by others, beside the paper."""
        return bool(self.rerun or self.rerun_avg)

    @property
    def has_avg(self) -> bool:
        """Whether the table has an "Avg." column (published averages to set it beside)."""
        return self.paper_avg is not None or self.rerun_avg is not None

    @property
    def heading(self) -> str:
        """``Table 3: title`` for the paper's tables, the title alone for the others."""
        return f"Table {self.number}: {self.title}" if isinstance(self.number, int) \
            else self.title

    @property
    def stem(self) -> str:
        """Output file name: ``table3`` or the sweep's name (``clearclip_grid``)."""
        return f"table{self.number}" if isinstance(self.number, int) else str(self.number)


# number -> (title, index name, columns, the paper's values, the paper's "Avg.")
_TABLES = {
    1: ("mIoU (%) on eight benchmarks, without and with PAMR (*)", "Method", TABLE1_COLUMNS,
        TABLE1, TABLE1_AVG),
    2: ("CSA projection matrices (random: mean ± std over trials)", "Mode", ABLATION_COLUMNS,
        TABLE2, None),
    3: ("Alternative approaches for feature localisation", "Approach", ABLATION_COLUMNS,
        TABLE3, None),
    4: ("Image preprocessing (short side, window, stride)", "Mode", ABLATION_COLUMNS,
        TABLE4, None),
}


def named_tables() -> tuple[str, ...]:
    """Sweeps under ``conf/sweep/`` with a ``table:`` section (e.g. ``clearclip_grid``)."""
    return tuple(sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml")
                        if "table" in OmegaConf.load(p)))


def table_ids() -> tuple[int | str, ...]:
    """Every table ``make_tables`` can build: 1–4, then the named ones."""
    return (*TABLE_NUMBERS, *named_tables())


def table_id(text: str | int) -> int | str:
    """``"3"`` -> 3, a name -> itself; unknown ids are a ConfigError listing the choices."""
    value = int(text) if str(text).isdigit() else str(text)
    if value not in table_ids():
        raise ConfigError(f"no table {text!r}; tables are "
                          f"{', '.join(map(str, table_ids()))}")
    return value


@cache
def table_spec(number: int | str) -> TableSpec:
    """The layout of the paper's Table ``number`` (1–4), or of a named sweep's table."""
    if isinstance(number, str):
        return named_spec(number)
    if number not in _TABLES:
        raise ValueError(f"no table {number}; tables are {list(TABLE_NUMBERS)}")
    title, index_name, columns, values, avg = _TABLES[number]
    rows = mode_rows() if number == 4 else sweep_rows(number)
    return TableSpec(number, title, index_name, rows, columns, values, avg)


def named_spec(name: str) -> TableSpec:
    """A sweep's own table (``table:`` in ``conf/sweep/<name>.yaml``): its title, columns,
    published values, and rows composed with ``table.base`` (the protocol it runs), each
    with that protocol's preprocessing per dataset."""
    meta = sweep(name).get("table")
    if meta is None:
        raise ConfigError(f"conf/sweep/{name}.yaml has no table: section")
    meta = OmegaConf.to_container(meta)
    base = tuple(meta.get("base") or ())
    columns = dict(meta["columns"])
    preprocess = {}
    for dataset, config in zip(columns, composed_configs([f"dataset={d}" for d in columns],
                                                         name, base)):
        p = config["preprocess"]
        preprocess[dataset] = (p["short_side"], p["window"], p["stride"])
    rows = tuple(Row(r.key, r.label, r.latex, r.match, preprocess, r.trials,
                     per_dataset_matches(r.variant, base, columns), r.variant)
                 for r in sweep_rows(name, base))
    return TableSpec(name, meta["title"], meta.get("index_name", "Row"), rows, columns,
                     **published_sections(meta, name, [r.key for r in rows], columns))


def per_dataset_matches(entry: str, base: Sequence[str], datasets: Sequence[str]
                        ) -> dict[str, dict[str, Any]]:
    """The row's match fields with ``dataset.name`` set to each of ``datasets`` (what a
    variant's per-benchmark knob defaults resolve to), from its composed config."""
    composed_configs([entry], entry, base)
    raw = _RAW[tuple(base), entry]
    out = {}
    for dataset in datasets:
        cfg = raw.copy()
        with open_dict(cfg):
            cfg.dataset.name = dataset
        out[dataset] = match_of(OmegaConf.to_container(cfg, resolve=True))[0]
    return out


def sweep(number: int | str) -> Any:
    """``conf/sweep/tableN.yaml`` (or ``<name>.yaml``) as written (interpolations unresolved)."""
    stem = f"table{number}" if isinstance(number, int) else number
    return OmegaConf.load(CONF_DIR / "sweep" / f"{stem}.yaml")


def sweep_rows(number: int | str, base: Sequence[str] = ()) -> tuple[Row, ...]:
    """Table ``number``'s rows from the ``rows:`` of its sweep config (composed on ``base``)."""
    where = f"table{number}" if isinstance(number, int) else number
    entries = [dict(entry) for entry in sweep(number).get("rows") or []]
    for entry in entries:
        if not {"variant", "key", "label"} <= entry.keys():
            raise ConfigError(f"conf/sweep/{where}.yaml: the rows: entry {entry} needs "
                              "variant, key and label (latex is optional)")
    configs = composed_configs([str(e["variant"]) for e in entries], where, base)
    rows = []
    for entry, config in zip(entries, configs):
        match, trials = match_of(config)
        label = method_label(str(entry["label"]))
        rows.append(Row(str(entry["key"]), label,
                        method_label(str(entry.get("latex", label))), match, trials=trials,
                        variant=str(entry["variant"])))
    for entry in uncovered_variants(number):
        log.warning("conf/sweep/%s.yaml: variant '%s' has no entry in rows: and is not "
                    "tabulated", where, entry)
    return tuple(rows)


def preprocess_modes() -> dict[str, tuple[int, int, int]]:
    """Table 4's modes in its sweep's order: name -> ``(short_side, window, stride)``."""
    names = str(sweep(4).hydra.sweeper.params.preprocess).split(",")
    modes = {}
    for name in (n.strip() for n in names):
        mode = OmegaConf.load(CONF_DIR / "preprocess" / f"{name}.yaml")
        modes[name] = (int(mode.short_side), int(mode.window), int(mode.stride))
    return modes


def mode_rows() -> tuple[Row, ...]:
    """Table 4: one row ``#i`` per preprocessing mode, each with the run's default method."""
    match, _ = match_of(composed_configs([""], "table4")[0])
    return tuple(Row(name, f"#{i}", f"\\#{i}", match, preprocess=mode)
                 for i, (name, mode) in enumerate(preprocess_modes().items(), start=1))


def match_of(config: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(match fields, trials)`` of a resolved run config: its summary row's
    ``match_fields()`` that are set, and whether it is a random-projection trial."""
    summary = summary_of(config, {})
    match = {k: summary[k] for k in match_fields() if summary[k] is not None}
    projection = config.get("projection")
    if projection and not (config["attention"].get("combine") or projection.get("combine")):
        # combine: null is the projection set's own; a one-map set (identity, q, k,
        # learned) sums and averages alike, so its row takes a record with either.
        match.pop("combine", None)
    return match, summary["trial"] is not None


@cache
def projection_combine(name: str) -> str | None:
    """How projection set ``name`` combines its maps (``conf/projection/<name>.yaml``);
    None for a one-map set or an unknown name."""
    path = CONF_DIR / "projection" / f"{name}.yaml"
    return OmegaConf.load(path).get("combine") if path.is_file() else None


def uncovered_variants(number: int) -> list[str]:
    """The ``variants`` of a sweep that no entry of its ``rows:`` tabulates."""
    config = sweep(number)

    def settings(entry: str) -> frozenset[str]:
        return frozenset(t for t in variant_overrides(entry) if not t.startswith("trial="))

    covered = {settings(str(e["variant"])) for e in config.get("rows") or []}
    return [str(v) for v in config.get("variants") or [] if settings(str(v)) not in covered]


_CONFIGS: dict[tuple[tuple[str, ...], str], dict[str, Any]] = {}
_RAW: dict[tuple[tuple[str, ...], str], Any] = {}  # the same, interpolations unresolved


def composed_configs(entries: Sequence[str], where: str, base: Sequence[str] = ()
                     ) -> list[dict[str, Any]]:
    """The resolved run config of each variant entry (``conf/run.yaml`` plus ``base`` and
    the entry's overrides, composed by Hydra as ``sclip_lab.run`` does); cached.

    Raises:
        ConfigError: an entry does not compose (``where`` names its sweep in the message).
    """
    base = tuple(base)
    todo = [e for e in dict.fromkeys(entries) if (base, e) not in _CONFIGS]
    if todo:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        import sclip_lab.data  # noqa: F401 - registers the schema conf/dataset/*.yaml extend

        # A caller's own Hydra (e.g. inside a Hydra app) is set aside and put back after.
        outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                for entry in todo:
                    try:
                        extra = variant_overrides(entry) if entry.strip() else []
                        cfg = compose("run", overrides=[*base, *extra])
                    except Exception as e:  # Hydra's errors name the unknown group or key
                        raise ConfigError(f"{where} row '{entry}': "
                                          f"{message_of(e).splitlines()[0]}") from None
                    _CONFIGS[base, entry] = OmegaConf.to_container(cfg, resolve=True)
                    _RAW[base, entry] = cfg
        finally:
            if outer is not None:  # the context replaced the singleton: ask for it again
                GlobalHydra.instance().clear()
                GlobalHydra.instance().initialize(outer)
    return [_CONFIGS[base, e] for e in entries]
