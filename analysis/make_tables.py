"""Rebuild the paper's Tables 1–4 from result records: CSV, LaTeX and figures.

Usage::

    python analysis/make_tables.py [--root multirun/] [--out tables/] [--tables 1 2 3 4]
                                   [--wandb-project ENTITY/PROJECT] [--model NAME]
                                   [--pretrained TAG] [--preset sclip|paper]

Records are the ``result.json`` files that ``sclip_lab.run`` writes (any depth under
``--root``) or the finished runs of a W&B project. A record fills a cell when its summary
fields match the row exactly (attention, projection, post-processing, preprocessing); the
path and ``sweep.table`` do not matter, so hand-made runs count too. Re-runs: the newest
record wins; random-projection trials (Table 2) are averaged (mean ± sample std).

Per table N the output directory receives ``tableN.csv`` (two decimals), ``tableN.tex``
(pandas ``Styler.to_latex``, booktabs, one decimal, best of ours per column in bold) and
``tableN.png`` / ``tableN.pdf`` (ours vs paper per dataset). Each cell has three columns:
ours, the paper's value and Δ = ours − paper. Missing cells are "–" and logged, never fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from sclip_lab.config import CONF_DIR, paper_short_side
from sclip_lab.errors import (
    EXIT_USER_ERROR,
    UserError,
    check_writable_dir,
    message_of,
    report,
)
from sclip_lab.flops import VIT_B16, open_clip_vit, protocol_flops
from sclip_lab.tracking import RESULT_FILE, summary_of

try:
    from analysis import paper_values
except ImportError:  # run as a script or loaded by path: import the sibling file itself
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "paper_values", Path(__file__).with_name("paper_values.py"))
    paper_values = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(paper_values)

log = logging.getLogger("sclip_lab.tables")

MISSING = "–"
TABLE_NUMBERS = (1, 2, 3, 4)
MIN_TRIALS = 5  # the paper averages 5 random draws (docs/protocol.md §3)
# A typical PASCAL VOC image (W × H = 500 × 375) for Table 4's FLOPs column.
TYPICAL_VOC_HW = (375, 500)

# The published code's short side per benchmark, from its config (windows 224, stride 112).
DEFAULT_SHORT_SIDE = {p.stem: int(OmegaConf.load(p).short_side)
                      for p in sorted((CONF_DIR / "dataset").glob("*.yaml"))}
DEFAULT_CROP, DEFAULT_STRIDE = 224, 112
# docs/protocol.md §9 "paper" preset: the paper's Table 1 setting, 336 everywhere but Cityscapes.
PAPER_SHORT_SIDE = {name: paper_short_side(name) for name in DEFAULT_SHORT_SIDE}
PRESETS = {"sclip": DEFAULT_SHORT_SIDE, "paper": PAPER_SHORT_SIDE}

TABLE1_COLUMNS = {"voc21": "VOC21", "context60": "Context60", "coco_object": "Object",
                  "voc20": "VOC20", "cityscapes": "City.", "context59": "Ctx59",
                  "ade20k": "ADE20k", "coco_stuff": "Stuff."}
ABLATION_COLUMNS = {"voc21": "VOC21", "context59": "Context59", "coco_stuff": "COCO-Stuff"}
AVG = "avg"
STATS = ("ours", "paper", "Δ")
STATS_LATEX = {"ours": "ours", "paper": "paper", "Δ": r"$\Delta$"}


# ------------------------------------------------------------------------ table layouts


@dataclass(frozen=True)
class Row:
    """One row of a table and the records that may fill it.

    Attributes:
        key: the row id shared with ``paper_values``.
        label: the row label in CSV, console and figures.
        latex: the row label in LaTeX.
        match: summary fields that must equal these values (see :func:`field_value`).
        preprocess: ``(short_side, crop, stride)``; None = the dataset's default.
        trials: the row averages random-projection trials (mean ± std over ``trial``).
    """

    key: str
    label: str
    latex: str
    match: Mapping[str, Any]
    preprocess: tuple[int, int, int] | None = None
    trials: bool = False


@dataclass(frozen=True)
class TableSpec:
    """A table: its rows, dataset columns and the paper's values."""

    number: int
    title: str
    index_name: str
    rows: tuple[Row, ...]
    columns: Mapping[str, str]  # dataset name -> column label
    paper: Mapping[str, Mapping[str, float]]
    paper_avg: Mapping[str, float] | None = None  # Table 1's "Avg." column


BASE = {"postprocess": "none"}
CSA = {**BASE, "attention": "csa", "temperature": 8.0}
SCLIP = {**CSA, "projection": "qk", "combine": "sum"}
TABLE4_MODES = {"mode1": (224, 224, 112), "mode2": (336, 224, 112), "mode3": (336, 336, 112),
                "mode4": (448, 224, 112), "mode5": (448, 448, 224)}


def _table1_rows() -> tuple[Row, ...]:
    rows = []
    for post, star in (("none", ""), ("pamr", "*")):
        suffix = "" if post == "none" else "_pamr"
        for key, label, match in (("clip", "CLIP", {"attention": "vanilla"}),
                                  ("maskclip", "MaskCLIP", {"attention": "maskclip"}),
                                  ("sclip", "SCLIP", SCLIP)):
            rows.append(Row(key + suffix, label + star, label + (f"${star}$" if star else ""),
                            {**match, "postprocess": post}))
    return tuple(rows)


def _table2_rows() -> tuple[Row, ...]:
    single = [("identity", "Identity projection", "Identity projection"),
              ("q", "W_q projection", "$W_q$ projection"),
              ("k", "W_k projection", "$W_k$ projection"),
              ("learned", "Learned projection", "Learned projection")]
    rows = [Row(key, label, latex, {**CSA, "projection": key}) for key, label, latex in single]
    rows += [Row(f"random_{n}", f"Random n={n}", f"Random $n={n}$",
                 {**CSA, "projection": "random", "n": n, "combine": "mean"}, trials=True)
             for n in (1, 4, 16)]
    rows.append(Row("qk", "Default (qk)", "Default ($W_q$, $W_k$)", SCLIP))
    return tuple(rows)


def _table3_rows() -> tuple[Row, ...]:
    rows = []
    for tau, note in ((8, " (CLIP default)"), (2, ""), (0.5, ""), (0, " (hard max)")):
        latex = r"$\tau \to 0$ (hard max)" if tau == 0 else f"$\\tau = {tau}${note}"
        rows.append(Row(f"sharpen_{tau}", f"Sharpening τ={tau}{note}", "Sharpening " + latex,
                        {**BASE, "attention": "sharpen", "temperature": tau}))
    rows += [Row(f"local_{k}", f"Local window={k}", f"Local attention, window ${k}$",
                 {**BASE, "attention": "local", "window": k}) for k in (3, 5, 7)]
    rows += [Row(f"early_{layer}", f"Early layer #{layer}", f"Early map, layer \\#{layer}",
                 {**BASE, "attention": "early", "layer": layer}) for layer in (1, 3, 5, 7)]
    rows.append(Row("sclip", "SCLIP (ours)", "SCLIP (ours)", SCLIP))
    return tuple(rows)


def _table4_rows() -> tuple[Row, ...]:
    return tuple(Row(key, f"#{i}", f"\\#{i}", SCLIP, preprocess=mode)
                 for i, (key, mode) in enumerate(TABLE4_MODES.items(), start=1))


def table_spec(number: int) -> TableSpec:
    """The layout of the paper's Table ``number`` (1–4)."""
    if number == 1:
        return TableSpec(1, "mIoU (%) on eight benchmarks, without and with PAMR (*)",
                         "Method", _table1_rows(), TABLE1_COLUMNS, paper_values.TABLE1,
                         paper_values.TABLE1_AVG)
    if number == 2:
        return TableSpec(2, "CSA projection matrices (random: mean ± std over trials)",
                         "Mode", _table2_rows(), ABLATION_COLUMNS, paper_values.TABLE2)
    if number == 3:
        return TableSpec(3, "Alternative approaches for feature localisation", "Approach",
                         _table3_rows(), ABLATION_COLUMNS, paper_values.TABLE3)
    if number == 4:
        return TableSpec(4, "Image preprocessing (short side, window, stride)", "Mode",
                         _table4_rows(), ABLATION_COLUMNS, paper_values.TABLE4)
    raise ValueError(f"no table {number}; tables are {list(TABLE_NUMBERS)}")


# ------------------------------------------------------------------------------ records


def record_summary(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The summary dict of a finished result record, or None if it has no mIoU."""
    summary = payload.get("summary")
    if not isinstance(summary, Mapping) or "dataset" not in summary:
        config = payload.get("config")
        if not isinstance(config, Mapping):
            return None
        try:
            summary = summary_of(config, payload.get("metrics") or summary or {})
        except (KeyError, TypeError):  # not a run config
            return None
    if summary.get("mIoU") is None or summary.get("dataset") is None:
        return None
    return dict(summary)


def load_local_records(root: Path) -> list[dict[str, Any]]:
    """Finished records under ``root`` (any depth), oldest first by file mtime.

    Each summary dict gains ``_time`` (mtime) and ``_source`` (path). Unreadable files are
    skipped with a warning; records whose status is not "finished" are ignored.
    """
    records, unfinished = [], 0
    for path in sorted(root.rglob(RESULT_FILE)):
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("skipping unreadable %s: %s", path, e)
            continue
        if not isinstance(payload, Mapping) or payload.get("status") != "finished":
            unfinished += 1
            continue
        summary = record_summary(payload)
        if summary is None:
            log.warning("skipping %s: no dataset/mIoU in its summary or config", path)
            continue
        records.append({**summary, "_time": path.stat().st_mtime, "_source": str(path)})
    if unfinished:
        log.info("ignored %d records whose status is not 'finished'", unfinished)
    # Stable sort: files with equal mtimes keep their path order.
    return sorted(records, key=lambda r: r["_time"])


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
        row = record_summary(payload)
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


# -------------------------------------------------------------------------- cell matching


def field_value(summary: Mapping[str, Any], name: str) -> Any:
    """A summary field, with the protocol defaults for fields a hand-made record may omit."""
    value = summary.get(name)
    if value is not None:
        return value
    if name == "postprocess":
        return "none"
    if summary.get("attention") == "csa":
        projection = summary.get("projection") or "qk"
        defaults = {"projection": projection, "temperature": 8.0,
                    "combine": {"qk": "sum", "random": "mean"}.get(projection)}
        return defaults.get(name)
    return None


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
    if row.preprocess is not None:
        return row.preprocess
    return short_sides[dataset], DEFAULT_CROP, DEFAULT_STRIDE


def matches(summary: Mapping[str, Any], row: Row, dataset: str,
            short_sides: Mapping[str, int] = DEFAULT_SHORT_SIDE) -> bool:
    """Whether a record fills the cell ``row`` × ``dataset`` (all fields must agree)."""
    if summary.get("dataset") != dataset:
        return False
    if not all(_same(field_value(summary, k), v) for k, v in row.match.items()):
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
        ours: mean mIoU per cell (NaN = missing).
        std: sample std over trials (NaN unless the row has ≥ 2 trials).
        trials: number of records behind each cell (0 = missing).
        paper: the paper's values.
        observations: long form ``row, dataset, source, mIoU`` (every trial and the paper's
            value), for the figures.
        extra: leading columns (Table 4's preprocessing and FLOPs), indexed like ``ours``.
        warnings: what was logged about this table.
    """

    spec: TableSpec
    ours: pd.DataFrame
    std: pd.DataFrame
    trials: pd.DataFrame
    paper: pd.DataFrame
    observations: pd.DataFrame
    extra: pd.DataFrame = field(default_factory=pd.DataFrame)
    warnings: list[str] = field(default_factory=list)


def flops_column(vit: Mapping[str, Any] | None = None,
                 image_hw: tuple[int, int] = TYPICAL_VOC_HW) -> dict[str, float]:
    """Encoder FLOPs of each Table 4 mode relative to mode #1 for one image size."""
    vit = dict(vit or VIT_B16)
    flops = {key: protocol_flops(image_hw, *mode, **vit) for key, mode in TABLE4_MODES.items()}
    return {key: value / flops["mode1"] for key, value in flops.items()}


def _warn(table: Table, message: str) -> None:
    table.warnings.append(message)
    log.warning("table %d: %s", table.spec.number, message)


def build_table(number: int, records: Sequence[Mapping[str, Any]],
                vit: Mapping[str, Any] | None = None, preset: str = "sclip") -> Table:
    """Fill Table ``number`` from summary dicts (oldest first; see :func:`pick_records`).

    Args:
        number: 1–4.
        records: summary dicts in the ``result.json`` summary schema, of one model.
        vit: architecture for Table 4's FLOPs (keyword arguments of ``vit_encoder_flops``);
            default ViT-B/16.
        preset: which default short sides Tables 1–3 require, "sclip" (the published code,
            docs/protocol.md §6) or "paper" (§9).
    """
    spec = table_spec(number)
    keys, names = [r.key for r in spec.rows], list(spec.columns)
    ours = pd.DataFrame(np.nan, index=keys, columns=names)
    std, paper = ours.copy(), ours.copy()
    trials = pd.DataFrame(0, index=keys, columns=names)
    obs, few, partial = [], [], []
    missing: dict[str, list[str]] = {}
    for row in spec.rows:
        for name, label in spec.columns.items():
            picked = pick_records(records, row, name, PRESETS[preset])
            values = [float(r["mIoU"]) for r in picked]
            paper.loc[row.key, name] = spec.paper.get(row.key, {}).get(name, np.nan)
            obs.append((row.label, label, "paper", paper.loc[row.key, name]))
            obs += [(row.label, label, "ours", v) for v in values]
            trials.loc[row.key, name] = len(values)
            if not values:
                missing.setdefault(row.label, []).append(label)
                continue
            ours.loc[row.key, name] = float(np.mean(values))
            if len(values) > 1:
                std.loc[row.key, name] = float(np.std(values, ddof=1))
            if row.trials and len(values) < MIN_TRIALS:
                few.append(f"{row.label} / {label} ({len(values)})")
            if any(r.get("limit") is not None for r in picked):
                partial.append(f"{row.label} / {label}")
    if spec.paper_avg is not None:
        # The average needs every benchmark; a partial mean would not compare with the paper.
        ours[AVG] = ours[names].mean(axis=1).where(ours[names].notna().all(axis=1))
        std[AVG], trials[AVG] = np.nan, ours[AVG].notna().astype(int)
        paper[AVG] = pd.Series(spec.paper_avg)
    observations = pd.DataFrame(obs, columns=["row", "dataset", "source", "mIoU"]).dropna()
    table = Table(spec, ours, std, trials, paper, observations)
    if number == 4:
        table.extra = _table4_extra(spec, vit)
    if missing:
        _warn(table, _missing_message(missing, len(keys), names))
    if few:
        _warn(table, f"fewer than {MIN_TRIALS} random trials: " + "; ".join(few))
    if partial:
        _warn(table, "cells from partial evaluations (limit set): " + "; ".join(partial))
    return table


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
          "FLOPs (paper)": paper_values.TABLE4_FLOPS[r.key]}
         for r in spec.rows for m in [r.preprocess]],
        index=[r.key for r in spec.rows])


# ------------------------------------------------------------------------------ display


def _column_labels(table: Table) -> dict[str, str]:
    labels = dict(table.spec.columns)
    if AVG in table.ours.columns:
        labels[AVG] = "Avg."
    return labels


def _ours_text(mean: float, std: float, count: int, trials: bool, decimals: int,
               latex: bool) -> str:
    if math.isnan(mean):
        return "--" if latex else MISSING
    text = f"{mean:.{decimals}f}"
    if not trials:
        return text
    pm = r" $\pm$ " if latex else " ± "
    spread = f"{pm}{std:.{decimals}f}" if not math.isnan(std) else ""
    return f"{text}{spread} ({count})"  # (k) = number of trials averaged


def _value_text(value: float, decimals: int, latex: bool, signed: bool = False) -> str:
    if math.isnan(value):
        return "--" if latex else MISSING
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    return text.replace("-", "$-$") if latex and signed else text


def _flops_text(value: Any, latex: bool) -> str:
    text = f"{value:.1f}×" if isinstance(value, float) else str(value)
    return text.replace("~", r"$\sim$").replace("×", r"$\times$") if latex else text


def display_frame(table: Table, decimals: int, latex: bool = False) -> pd.DataFrame:
    """Strings in the paper's layout: columns ``(column label, ours | paper | Δ)``.

    Random-trial cells read ``mean ± std (k)`` with k the number of trials; missing cells
    are "–" ("--" in LaTeX). Table 4 leads with its preprocessing and FLOPs columns.
    """
    rows = table.spec.rows
    columns: dict[tuple[str, str], list[str]] = {}
    for name, text in table.extra.items():
        columns[("", name)] = [_flops_text(v, latex) if name.startswith("FLOPs") else str(v)
                               for v in text]
    for name, label in _column_labels(table).items():
        stat = STATS_LATEX if latex else {s: s for s in STATS}
        ours = table.ours[name]
        delta = ours - table.paper[name]
        columns[(label, stat["ours"])] = [
            _ours_text(ours[r.key], table.std.loc[r.key, name], table.trials.loc[r.key, name],
                       r.trials, decimals, latex) for r in rows]
        columns[(label, stat["paper"])] = [_value_text(table.paper.loc[r.key, name], decimals,
                                                       latex) for r in rows]
        columns[(label, stat["Δ"])] = [_value_text(delta[r.key], decimals, latex, signed=True)
                                      for r in rows]
    index_name = table.spec.index_name
    frame = pd.DataFrame(columns, index=pd.Index([r.latex if latex else r.label for r in rows]))
    # LaTeX: the index name sits in the second header row rather than a row of its own.
    frame.columns = pd.MultiIndex.from_tuples(frame.columns,
                                              names=[None, index_name] if latex else None)
    frame.index.name = None if latex else index_name
    return frame


def csv_frame(table: Table) -> pd.DataFrame:
    """The CSV layout: one header row, ``"<column> <stat>"`` names, two decimals."""
    frame = display_frame(table, decimals=2)
    frame.columns = [" ".join(part for part in col if part) for col in frame.columns]
    return frame


def best_mask(table: Table, frame: pd.DataFrame) -> np.ndarray:
    """True on the "ours" cells holding the best (highest) of ours in their column."""
    mask = np.zeros(frame.shape, dtype=bool)
    labels = _column_labels(table)
    for j, (label, stat) in enumerate(frame.columns):
        name = next((n for n, lab in labels.items() if lab == label), None)
        if name is None or stat != STATS_LATEX["ours"]:
            continue
        values = table.ours[name].to_numpy()
        if np.isfinite(values).any():
            mask[:, j] = np.isclose(values, np.nanmax(values), rtol=0.0, atol=1e-9)
    return mask


def latex_text(text: str) -> str:
    """Plain text (a title) made safe for LaTeX: escapes and math for ±, τ, ×."""
    for plain, tex in (("%", r"\%"), ("#", r"\#"), ("&", r"\&"), ("_", r"\_"),
                       ("±", r"$\pm$"), ("τ", r"$\tau$"), ("×", r"$\times$")):
        text = text.replace(plain, tex)
    return text


def to_latex(table: Table) -> str:
    """booktabs LaTeX via ``Styler.to_latex``: one decimal, best of ours per column bold."""
    frame = display_frame(table, decimals=1, latex=True)
    mask = best_mask(table, frame)
    styler = frame.style.apply(lambda _: np.where(mask, "textbf:--rwrap;", ""), axis=None)
    n_text = len(table.extra.columns) + 1
    return styler.to_latex(
        hrules=True, multicol_align="c", position_float="centering",
        column_format="l" * n_text + "r" * (frame.shape[1] - n_text + 1),
        caption=f"Table {table.spec.number}: {latex_text(table.spec.title)}. Ours vs the paper; "
                r"$\Delta$ = ours $-$ paper.",
        label=f"tab:table{table.spec.number}")


def console_frame(table: Table) -> pd.DataFrame:
    """A compact view: ``ours (Δ)`` per column."""
    full = display_frame(table, decimals=2)
    view = {}
    for label in _column_labels(table).values():
        ours, delta = full[(label, "ours")], full[(label, "Δ")]
        view[label] = [o if d == MISSING else f"{o} ({d})"
                       for o, d in zip(ours, delta, strict=True)]
    lead = {c: full[("", c)] for c in table.extra.columns if c in ("Img size", "FLOPs")}
    return pd.DataFrame({**lead, **view}, index=full.index)


# ------------------------------------------------------------------------------ figures


def plot_table(table: Table, stem: Path) -> list[Path]:
    """Grouped bars, ours vs paper per dataset (sd error bars over trials); PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    import seaborn as sns

    labels = [r.label for r in table.spec.rows]
    if table.spec.number == 4:  # show each mode's relative cost next to its name
        flops = table.extra["FLOPs"]
        labels = [f"{r.label} ({flops[r.key]:.1f}×)" for r in table.spec.rows]
        rename = {r.label: lab for r, lab in zip(table.spec.rows, labels, strict=True)}
        data = table.observations.assign(row=table.observations["row"].map(rename))
    else:
        data = table.observations
    columns = list(table.spec.columns.values())
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    # Scoped styles: importing this module must not restyle the caller's figures.
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        # errorbar="sd" over the trial-level rows: error bars on random trials only.
        grid = sns.catplot(
            data=data, kind="bar", x="mIoU", y="row", hue="source", col="dataset",
            order=labels, hue_order=["ours", "paper"], col_order=columns,
            col_wrap=min(4, len(columns)), errorbar="sd", capsize=0.2,
            err_kws={"linewidth": 1}, height=0.3 * len(labels) + 1.5, aspect=1.1,
            sharex=False, palette="deep")
        grid.set_titles("{col_name}")
        grid.set_axis_labels("mIoU (%)", "")
        grid.figure.suptitle(f"Table {table.spec.number}: {table.spec.title}", y=1.02)
        for path in paths:
            grid.figure.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(grid.figure)
    return paths


# ---------------------------------------------------------------------------------- CLI


def write_table(table: Table, out: Path) -> list[Path]:
    """``tableN.csv``, ``tableN.tex``, ``tableN.png``, ``tableN.pdf`` under ``out``."""
    stem = out / f"table{table.spec.number}"
    csv_frame(table).to_csv(stem.with_suffix(".csv"), encoding="utf-8")
    stem.with_suffix(".tex").write_text(to_latex(table), encoding="utf-8")
    return [stem.with_suffix(".csv"), stem.with_suffix(".tex"), *plot_table(table, stem)]


def _vit_for(model: str | None) -> dict[str, Any]:
    """The FLOPs architecture of the tables' model; ViT-B/16 when it cannot be resolved."""
    if model is None:
        return dict(VIT_B16)
    try:
        return open_clip_vit(model)
    except (ValueError, ImportError, KeyError) as e:
        log.warning("FLOPs: cannot read the architecture of %s (%s); counting ViT-B/16", model, e)
        return dict(VIT_B16)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + error
        report(f"{message} (analysis/make_tables.py --help)")
        self.exit(EXIT_USER_ERROR)


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="make_tables", description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("multirun"),
                   help="directory searched (any depth) for result.json (default: multirun/)")
    p.add_argument("--out", type=Path, default=Path("tables"), help="output directory")
    p.add_argument("--wandb-project", metavar="ENTITY/PROJECT",
                   help="read finished runs of this W&B project instead of --root")
    p.add_argument("--tables", type=int, nargs="+", default=list(TABLE_NUMBERS),
                   choices=TABLE_NUMBERS, metavar="N", help="tables to build (1-4)")
    p.add_argument("--model", help="model name to tabulate (default: the most common)")
    p.add_argument("--pretrained", help="pretrained tag (default: the most common of --model)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="sclip",
                   help="default short sides Tables 1-3 require: sclip (published code, "
                        "COCO-Stuff 448) or paper (336, Cityscapes 560)")
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return build_tables(args)
    except UserError as e:
        report(e)
        return EXIT_USER_ERROR


def build_tables(args: argparse.Namespace) -> int:
    """Read the records, write every requested table; UserError for unusable inputs."""
    check_writable_dir(args.out, "--out")  # before reading hundreds of records
    if args.wandb_project:
        try:
            records = load_wandb_records(args.wandb_project)
        except Exception as e:  # noqa: BLE001 - any API or network failure is one message
            raise UserError(f"cannot read W&B project {args.wandb_project} "
                            f"({type(e).__name__}: {message_of(e)[:200]}); check the name "
                            "and `wandb login`, or use --root with local records") from None
        source = f"W&B project {args.wandb_project}"
    else:
        if not args.root.is_dir():
            raise UserError(f"--root {args.root} is not a directory; point it at the sweep "
                            "outputs (e.g. --root multirun/)")
        records = load_local_records(args.root)
        source = str(args.root)
    if not records:
        log.warning("no finished result records in %s; tables hold the paper's values only",
                    source)
    records, model = select_model(records, args.model, args.pretrained)
    vit = _vit_for(model) if 4 in args.tables else None
    for number in sorted(set(args.tables)):
        table = build_table(number, records, vit=vit, preset=args.preset)
        paths = write_table(table, args.out)
        print(f"\nTable {number}: {table.spec.title}  [{model or 'no records'}]")
        print(console_frame(table).to_string())
        print("-> " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
