"""From records to cells: loading (files or W&B), the model, matching rows, trial statistics.

A record fills the cell row × dataset when its summary fields match the row exactly and so
does its preprocessing (``layout``). Re-runs: the newest record wins; a partial evaluation
(``limit`` set) only fills a cell no full-split record fills, and marks it ``partial``;
random-projection trials are averaged (mean ± sample std over the newest record of each
``trial``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sclip_lab.attention import ATTENTIONS
from sclip_lab.flops import VIT_B16, open_clip_vit, protocol_flops
from sclip_lab.head_spec import default_fields
from sclip_lab.records import iter_records, summary_row
from sclip_lab.tables.layout import (
    AVG,
    DEFAULT_CROP,
    DEFAULT_SHORT_SIDE,
    DEFAULT_STRIDE,
    MISSING,
    PAPER,
    PRESETS,
    REPRODUCED,
    RERUN,
    Row,
    TableSpec,
    preprocess_modes,
    projection_combine,
    table_spec,
)
from sclip_lab.tables.paper import TABLE4_FLOPS

log = logging.getLogger(__name__)

MIN_TRIALS = 5  # the paper averages 5 random draws (docs/protocol.md §3)
# A typical PASCAL VOC image (W × H = 500 × 375) for Table 4's FLOPs column.
TYPICAL_VOC_HW = (375, 500)


# ------------------------------------------------------------------------------ records


def load_local_records(root: Path) -> list[dict[str, Any]]:
    """Finished records under ``root`` (any depth) as summary rows, oldest first by mtime.

    Each row gains ``_time`` (mtime) and ``_source`` (path); unreadable files are skipped
    with a warning (``records.iter_records``).
    """
    rows = []
    for path, record in iter_records(root):
        row = summary_row(record)
        if row is None:
            log.warning("skipping %s: no dataset/mIoU in its summary or config", path)
            continue
        rows.append({**row, "_time": path.stat().st_mtime, "_source": str(path)})
    # Stable sort: files with equal mtimes keep their path order.
    return sorted(rows, key=lambda r: r["_time"])


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def load_wandb_records(project: str) -> list[dict[str, Any]]:
    """Finished runs of a W&B project (``entity/project``) as summary dicts, oldest first.

    A run's summary is used as is when it carries the summary fields, otherwise the fields
    are derived from its config and metrics (what ``Tracker`` logs).
    """
    import wandb  # network only on this path

    records = []
    for run in wandb.Api(timeout=60).runs(project):
        if run.state != "finished":
            continue
        summary = {k: v for k, v in run.summary.items() if not str(k).startswith("_")}
        config = {k: v for k, v in run.config.items() if not str(k).startswith("_")}
        payload = {"summary": summary if "dataset" in summary else None, "config": config,
                   "metrics": summary}
        row = summary_row(payload)
        if row is not None:
            records.append({**row, "_time": _timestamp(run.created_at),
                            "_source": f"wandb:{project}/{run.id}"})
    return sorted(records, key=lambda r: r["_time"])


def select_model(records: Sequence[Mapping[str, Any]], model: str | None = None,
                 pretrained: str | None = None) -> tuple[list[Mapping[str, Any]], str | None]:
    """Keep the records of one (model, pretrained); default: the most common model.

    Returns:
        The kept records (order preserved) and the chosen model name.
    """
    if not records:
        return [], model
    if model is None:
        model = Counter(r.get("model") for r in records).most_common(1)[0][0]
    if pretrained is None:
        tags = Counter(str(r.get("pretrained")) for r in records if r.get("model") == model)
        pretrained = tags.most_common(1)[0][0] if tags else None
    kept = [r for r in records
            if r.get("model") == model and str(r.get("pretrained")) == pretrained]
    others = Counter(f"{r.get('model')}/{r.get('pretrained')}" for r in records
                     if not (r.get("model") == model and str(r.get("pretrained")) == pretrained))
    if others:
        log.warning("tables use %s/%s (%d records); ignoring other models: %s", model,
                    pretrained, len(kept), ", ".join(f"{k} ({n})" for k, n in others.items()))
    if not kept:
        log.warning("no records of model %s/%s", model, pretrained)
    return kept, model


def backbone_groups(records: Sequence[Mapping[str, Any]]
                    ) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """The records split by backbone, ``[("<model>/<pretrained>", records), …]``, the most
    common backbone first (ties: first seen), each group in the records' order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(f"{r.get('model')}/{r.get('pretrained')}", []).append(r)
    return sorted(groups.items(), key=lambda item: -len(item[1]))


# -------------------------------------------------------------------------- cell matching


def field_value(summary: Mapping[str, Any], name: str) -> Any:
    """A summary field, with the defaults for fields a record may omit (older records):
    those of its head with nothing configured (``head_spec.default_fields``: the variant's
    declared knobs and block, a projection set's own combine)."""
    value = summary.get(name)
    if value is not None:
        return value
    if name == "postprocess":
        return "none"
    if name == "protocol":  # records from before protocols ran SCLIP's
        return "sclip"
    if summary.get("attention") not in ATTENTIONS:
        return None
    projection = summary.get("projection")  # its set's own combine (conf/projection/)
    section = {"name": projection, "combine": projection_combine(projection)} \
        if projection else None
    return default_fields(summary["attention"], section).get(name)


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-9)
    return a == b


def preprocess_of(row: Row, dataset: str, short_sides: Mapping[str, int] = DEFAULT_SHORT_SIDE
                  ) -> tuple[int, int, int]:
    """The ``(short_side, crop, stride)`` a record must have to fill ``row`` × ``dataset``.

    Rows without their own preprocessing (Tables 1–3) take the dataset's default short
    side from ``short_sides`` (one of ``PRESETS``) with 224 windows and stride 112.
    """
    if isinstance(row.preprocess, Mapping):
        return row.preprocess[dataset]
    if row.preprocess is not None:
        return row.preprocess
    return short_sides[dataset], DEFAULT_CROP, DEFAULT_STRIDE


def matches(summary: Mapping[str, Any], row: Row, dataset: str,
            short_sides: Mapping[str, int] = DEFAULT_SHORT_SIDE) -> bool:
    """Whether a record fills the cell ``row`` × ``dataset`` (all fields must agree)."""
    if summary.get("dataset") != dataset:
        return False
    if not all(_same(field_value(summary, k), v) for k, v in row.match_for(dataset).items()):
        return False
    got = tuple(summary.get(k) for k in ("short_side", "crop", "stride"))
    want = preprocess_of(row, dataset, short_sides)
    return all(_same(g, w) for g, w in zip(got, want, strict=True))


def pick_records(records: Sequence[Mapping[str, Any]], row: Row, dataset: str,
                 short_sides: Mapping[str, int] = DEFAULT_SHORT_SIDE
                 ) -> list[Mapping[str, Any]]:
    """The records behind one cell: the newest match, or the newest per trial.

    ``records`` are oldest first. A partial evaluation (``limit`` set) is only used when no
    full-split record exists for the cell, so a quick smoke run never hides a real result.
    """
    found = [r for r in records if matches(r, row, dataset, short_sides)]
    full = [r for r in found if r.get("limit") is None]
    found = full or found
    if not row.trials:
        return found[-1:]
    newest: dict[int, Mapping[str, Any]] = {}
    for r in found:  # later (newer) records overwrite earlier ones
        newest[int(r.get("trial") or 0)] = r
    return [newest[t] for t in sorted(newest)]


# ---------------------------------------------------------------------------- the table


@dataclass
class Table:
    """A built table: numeric frames (rows × dataset names) plus trial-level data.

    Attributes:
        spec: the layout.
        ours: the reproduced mIoU per cell, the mean over its records (NaN = missing).
        std: sample std over trials (NaN unless the row has ≥ 2 trials).
        trials: number of records behind each cell (0 = missing); the average's is the
            fewest of its benchmarks'.
        partial: True where a record behind the cell evaluated part of the split (``limit``
            set); the average's where any of its benchmarks' is.
        paper: the paper's values.
        observations: long form ``row, dataset, source, mIoU`` (source ``reproduced``: every
            trial; ``paper``; ``re-run`` where the table has re-runs by others), for
            analyses of the trials.
        extra: leading columns (Table 4's preprocessing and FLOPs), indexed like ``ours``.
        rerun: the independent re-runs by others (``spec.rerun``), shaped like ``paper``;
            empty (no columns) when the table has none.
        limits: the ``limit`` values of the partial records (for the footnote).
        warnings: what was logged about this table.
    """

    spec: TableSpec
    ours: pd.DataFrame
    std: pd.DataFrame
    trials: pd.DataFrame
    partial: pd.DataFrame
    paper: pd.DataFrame
    observations: pd.DataFrame
    extra: pd.DataFrame = field(default_factory=pd.DataFrame)
    rerun: pd.DataFrame = field(default_factory=pd.DataFrame)
    limits: tuple[int, ...] = ()
    warnings: list[str] = field(default_factory=list)


def flops_column(vit: Mapping[str, Any] | None = None,
                 image_hw: tuple[int, int] = TYPICAL_VOC_HW) -> dict[str, float]:
    """Encoder FLOPs of each Table 4 mode relative to the first (mode #1), for one image."""
    vit = dict(vit or VIT_B16)
    flops = {key: protocol_flops(image_hw, *mode, **vit)
             for key, mode in preprocess_modes().items()}
    first = next(iter(flops.values()))
    return {key: value / first for key, value in flops.items()}


def vit_for(model: str | None) -> dict[str, Any]:
    """The FLOPs architecture of the tables' model; ViT-B/16 when it cannot be resolved."""
    if model is None:
        return dict(VIT_B16)
    try:
        return open_clip_vit(model)
    except (ValueError, ImportError, KeyError) as e:
        log.warning("FLOPs: cannot read the architecture of %s (%s); counting ViT-B/16", model, e)
        return dict(VIT_B16)


def build_table(number: int | str, records: Sequence[Mapping[str, Any]],
                vit: Mapping[str, Any] | None = None, preset: str = "sclip") -> Table:
    """Fill Table ``number`` from summary dicts (oldest first; see :func:`pick_records`).

    Args:
        number: 1–4, or a named table (``layout.named_tables``).
        records: summary dicts in the ``result.json`` summary schema, of one model.
        vit: architecture for Table 4's FLOPs (keyword arguments of ``vit_encoder_flops``);
            default ViT-B/16.
        preset: which default short sides Tables 1–3 require, "sclip" (the published code,
            docs/protocol.md §6) or "paper" (§9).
    """
    spec = table_spec(number)
    keys, names = [r.key for r in spec.rows], list(spec.columns)
    ours = pd.DataFrame(np.nan, index=keys, columns=names)
    std, paper, rerun = ours.copy(), ours.copy(), ours.copy()
    trials = pd.DataFrame(0, index=keys, columns=names)
    partial = pd.DataFrame(False, index=keys, columns=names)
    obs, few, partials, limits = [], [], [], set()
    missing: dict[str, list[str]] = {}
    for row in spec.rows:
        for name, label in spec.columns.items():
            picked = pick_records(records, row, name, PRESETS[preset])
            values = [float(r["mIoU"]) for r in picked]
            paper.loc[row.key, name] = spec.paper.get(row.key, {}).get(name, np.nan)
            obs.append((row.label, label, PAPER, paper.loc[row.key, name]))
            if spec.has_rerun:
                rerun.loc[row.key, name] = spec.rerun.get(row.key, {}).get(name, np.nan)
                obs.append((row.label, label, RERUN, rerun.loc[row.key, name]))
            obs += [(row.label, label, REPRODUCED, v) for v in values]
            trials.loc[row.key, name] = len(values)
            if not values:
                missing.setdefault(row.label, []).append(label)
                continue
            ours.loc[row.key, name] = float(np.mean(values))
            if len(values) > 1:
                std.loc[row.key, name] = float(np.std(values, ddof=1))
            if row.trials and len(values) < MIN_TRIALS:
                few.append(f"{row.label} / {label} ({len(values)})")
            cut = {r["limit"] for r in picked if r.get("limit") is not None}
            if cut:
                partial.loc[row.key, name] = True
                partials.append(f"{row.label} / {label}")
                limits |= cut
    if spec.has_avg:
        # The average needs every benchmark; a mean of some would not compare with the paper.
        ours[AVG] = ours[names].mean(axis=1).where(ours[names].notna().all(axis=1))
        std[AVG], trials[AVG] = np.nan, trials[names].min(axis=1)
        partial[AVG] = partial[names].any(axis=1) & ours[AVG].notna()
        paper[AVG] = pd.Series(spec.paper_avg or {}, dtype=float)
        rerun[AVG] = pd.Series(spec.rerun_avg or {}, dtype=float)
    observations = pd.DataFrame(obs, columns=["row", "dataset", "source", "mIoU"]).dropna()
    table = Table(spec, ours, std, trials, partial, paper, observations,
                  rerun=rerun if spec.has_rerun else pd.DataFrame(),
                  limits=tuple(sorted(limits)))
    if number == 4:
        table.extra = _table4_extra(spec, vit)
    if missing:
        _warn(table, _missing_message(missing, len(keys), names))
    if few:
        _warn(table, f"fewer than {MIN_TRIALS} random trials: " + "; ".join(few))
    if partials:
        _warn(table, "cells from partial evaluations (limit set): " + "; ".join(partials))
    return table


def _warn(table: Table, message: str) -> None:
    table.warnings.append(message)
    log.warning("%s: %s", table.spec.stem, message)


def _missing_message(missing: Mapping[str, list[str]], n_rows: int, names: list[str]) -> str:
    """One line for all empty cells, grouped by row ("all" for a row with no record)."""
    count = sum(map(len, missing.values()))
    groups = "; ".join(f"{row} ({'all' if len(cols) == len(names) else ', '.join(cols)})"
                       for row, cols in missing.items())
    return f"{count} of {n_rows * len(names)} cells have no record (shown as {MISSING}): {groups}"


def _table4_extra(spec: TableSpec, vit: Mapping[str, Any] | None) -> pd.DataFrame:
    ratios = flops_column(vit)
    return pd.DataFrame(
        [{"Img size": m[0], "Window": m[1], "Stride": m[2], "FLOPs": ratios[r.key],
          "FLOPs (paper)": TABLE4_FLOPS.get(r.key, MISSING)}
         for r in spec.rows for m in [r.preprocess]],
        index=[r.key for r in spec.rows])
