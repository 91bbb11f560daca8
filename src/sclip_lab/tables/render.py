"""A built table as text: a numeric CSV, and the console and LaTeX (pandas ``Styler``) views.

Two sources everywhere: "reproduced" (the records of this lab's runs) and "paper"; Δ =
reproduced − paper. A named table with a ``table.rerun`` section (the methods leaderboard)
has a third, "re-run": an independent re-run published by another paper or repository,
beside the paper's value. Never "ours": the paper calls its own method that (a row, shown
as "SCLIP").

CSV (:func:`csv_frame`): numbers only, so ``pd.read_csv(path, index_col=0)`` gives float,
int and bool columns; a missing value is an empty field (NaN). The index is the row label,
named as the table's (``Mode``, ``Method``…). Table 4 leads with ``short_side``, ``window``,
``stride`` (its preprocessing), ``flops`` (counted, relative to mode #1) and
``flops_paper`` (the paper's rough ratio: "~4×" is 4). Then, per dataset (its config name,
e.g. ``coco_stuff``; ``avg`` for an "Avg." column), six columns ``<dataset>_<stat>``
(``CSV_STATS``):

- ``mean``: the reproduced mIoU (%), the mean over the cell's k records;
- ``std``: their sample std (empty unless k ≥ 2);
- ``k``: the records averaged (random trials; 1 for other rows; 0 = no record); the
  average's is the fewest of its benchmarks';
- ``partial``: True when a record behind the cell evaluated part of the split (``limit=``);
- ``paper``: the paper's value; ``delta``: mean − paper;
- ``rerun`` (only in a table with re-runs, between ``paper`` and ``delta``): the re-run by
  others (empty where a row has none).

Console and LaTeX keep the paper's layout: random-trial cells read ``mean ± std (k)``,
missing cells "–" ("--" in LaTeX), a partial cell ends in † and a note (:func:`notes`,
in the LaTeX caption) gives the limit. LaTeX has one decimal and the best reproduced value
per column in bold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sclip_lab.tables.collect import Table, backbone_groups, build_table
from sclip_lab.tables.layout import AVG, MISSING, PAPER, PARTIAL_MARK, REPRODUCED, RERUN, Row
from sclip_lab.tables.plot import plot_table

STATS = (REPRODUCED, PAPER, "Δ")
STATS_LATEX = {REPRODUCED: REPRODUCED, PAPER: PAPER, RERUN: RERUN, "Δ": r"$\Delta$"}
CSV_STATS = ("mean", "std", "k", "partial", "paper", "delta")
CSV_RERUN = "rerun"  # a table with re-runs by others: ``<dataset>_rerun`` after ``_paper``
# Table 4's leading columns under CSV names (the config keys of conf/preprocess/modeK.yaml).
CSV_EXTRA = {"Img size": "short_side", "Window": "window", "Stride": "stride",
             "FLOPs": "flops", "FLOPs (paper)": "flops_paper"}
CSV_DECIMALS = 4  # drops float noise (58.199999…) and keeps far more than a metric's precision
_PRINTED_RATIO = re.compile(r"~?\s*(\d+(?:\.\d+)?)\s*×?")


def _column_labels(table: Table) -> dict[str, str]:
    labels = dict(table.spec.columns)
    if AVG in table.ours.columns:
        labels[AVG] = "Avg."
    return labels


# ---------------------------------------------------------------------------------- CSV


def _number(value: Any) -> Any:
    """A number as is, a printed ratio ("~4×", "1×") as its number; other text unchanged."""
    if isinstance(value, int | float | np.number):
        return value
    found = _PRINTED_RATIO.fullmatch(str(value).strip())
    return float(found.group(1)) if found else value


def csv_frame(table: Table) -> pd.DataFrame:
    """The tidy numeric CSV layout (see the module docstring for the columns)."""
    keys = [r.key for r in table.spec.rows]
    columns: dict[str, pd.Series] = {CSV_EXTRA.get(name, name): table.extra[name].map(_number)
                                     for name in table.extra.columns}
    for name in _column_labels(table):
        mean, paper = table.ours[name], table.paper[name]
        stats = dict(zip(CSV_STATS, (mean, table.std[name], table.trials[name].astype(int),
                                     table.partial[name].astype(bool), paper, mean - paper),
                         strict=True))
        if table.spec.has_rerun:
            stats = _after(stats, "paper", CSV_RERUN, table.rerun[name])
        columns |= {f"{name}_{stat}": values for stat, values in stats.items()}
    frame = pd.DataFrame(columns).reindex(keys).round(CSV_DECIMALS)
    frame.index = pd.Index([r.label for r in table.spec.rows], name=table.spec.index_name)
    return frame


def _after(items: Mapping[str, Any], key: str, new: str, value: Any) -> dict[str, Any]:
    """``items`` with ``new: value`` inserted right after ``key``."""
    out = {}
    for k, v in items.items():
        out[k] = v
        if k == key:
            out[new] = value
    return out


BACKBONE = "Backbone"


def backbone_csv_frame(tables: Sequence[tuple[str, Table]]) -> pd.DataFrame:
    """One CSV frame of several backbones' tables: each table's :func:`csv_frame` rows with
    a ``Backbone`` column (``<model>/<pretrained>``) first, backbones in the given order."""
    frames = [csv_frame(table) for _, table in tables]
    for (name, _), frame in zip(tables, frames, strict=True):
        frame.insert(0, BACKBONE, name)
    return pd.concat(frames)


def write_backbones(number: int | str, records: Sequence[Mapping[str, Any]], out: Path,
                    preset: str = "sclip") -> Path | None:
    """``<stem>-backbones.csv`` under ``out``: table ``number`` once per backbone found in
    ``records`` (records of every model), with a ``Backbone`` column; None (nothing
    written) when the records hold fewer than two backbones. The paper columns are the
    published values of each method's own backbone, repeated on every backbone's rows."""
    groups = backbone_groups(records)
    if len(groups) < 2:
        return None
    tables = [(name, build_table(number, group, preset=preset)) for name, group in groups]
    path = out / f"{tables[0][1].spec.stem}-backbones.csv"
    backbone_csv_frame(tables).to_csv(path, encoding="utf-8")
    return path


# ------------------------------------------------------------------ console and LaTeX


def _reproduced_text(table: Table, row: Row, name: str, decimals: int, latex: bool) -> str:
    mean = table.ours.loc[row.key, name]
    if math.isnan(mean):
        return "--" if latex else MISSING
    text = f"{mean:.{decimals}f}"
    if row.trials:
        std = table.std.loc[row.key, name]
        pm = r" $\pm$ " if latex else " ± "
        spread = f"{pm}{std:.{decimals}f}" if not math.isnan(std) else ""
        text = f"{text}{spread} ({table.trials.loc[row.key, name]})"  # (k): trials averaged
    if table.partial.loc[row.key, name]:
        text += latex_text(PARTIAL_MARK) if latex else PARTIAL_MARK
    return text


def _value_text(value: float, decimals: int, latex: bool, signed: bool = False) -> str:
    if math.isnan(value):
        return "--" if latex else MISSING
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    return text.replace("-", "$-$") if latex and signed else text


def _flops_text(value: Any, latex: bool) -> str:
    text = f"{value:.1f}×" if isinstance(value, float) else str(value)
    return text.replace("~", r"$\sim$").replace("×", r"$\times$") if latex else text


def display_frame(table: Table, decimals: int, latex: bool = False) -> pd.DataFrame:
    """Strings in the paper's layout: columns ``(column label, reproduced | paper | Δ)``
    (``reproduced | paper | re-run | Δ`` in a table with re-runs by others).

    Random-trial cells read ``mean ± std (k)`` with k the number of trials, a partial cell
    ends in †, missing cells are "–" ("--" in LaTeX). Table 4 leads with its preprocessing
    and FLOPs columns.
    """
    rows = table.spec.rows
    columns: dict[tuple[str, str], list[str]] = {}
    for name, text in table.extra.items():
        columns[("", name)] = [_flops_text(v, latex) if name.startswith("FLOPs") else str(v)
                               for v in text]
    stat = STATS_LATEX if latex else {s: s for s in STATS}
    for name, label in _column_labels(table).items():
        delta = table.ours[name] - table.paper[name]
        columns[(label, stat[REPRODUCED])] = [_reproduced_text(table, r, name, decimals, latex)
                                              for r in rows]
        columns[(label, stat[PAPER])] = [_value_text(table.paper.loc[r.key, name], decimals,
                                                     latex) for r in rows]
        if table.spec.has_rerun:
            columns[(label, RERUN)] = [_value_text(table.rerun.loc[r.key, name], decimals,
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


def notes(table: Table) -> list[str]:
    """The footnotes of the console and LaTeX views: what † means, when a cell has one."""
    if not table.partial.to_numpy().any():
        return []
    limits = ", ".join(str(v) for v in table.limits)
    return [f"{PARTIAL_MARK} partial split (limit={limits}): not the whole benchmark"]


def best_mask(table: Table, frame: pd.DataFrame) -> np.ndarray:
    """True on the reproduced cells holding the best (highest) reproduced value per column."""
    mask = np.zeros(frame.shape, dtype=bool)
    labels = _column_labels(table)
    for j, (label, stat) in enumerate(frame.columns):
        name = next((n for n, lab in labels.items() if lab == label), None)
        if name is None or stat != STATS_LATEX[REPRODUCED]:
            continue
        values = table.ours[name].to_numpy()
        if np.isfinite(values).any():
            mask[:, j] = np.isclose(values, np.nanmax(values), rtol=0.0, atol=1e-9)
    return mask


def latex_text(text: str) -> str:
    """Plain text (a title, a note) made safe for LaTeX: escapes and math for ±, τ, ×, †."""
    for plain, tex in (("%", r"\%"), ("#", r"\#"), ("&", r"\&"), ("_", r"\_"),
                       ("±", r"$\pm$"), ("τ", r"$\tau$"), ("×", r"$\times$"),
                       (PARTIAL_MARK, r"$^\dagger$")):
        text = text.replace(plain, tex)
    return text


def to_latex(table: Table) -> str:
    """booktabs LaTeX via ``Styler.to_latex``: one decimal, the best reproduced value per
    column bold; the caption explains the columns and any †."""
    frame = display_frame(table, decimals=1, latex=True)
    mask = best_mask(table, frame)
    styler = frame.style.apply(lambda _: np.where(mask, "textbf:--rwrap;", ""), axis=None)
    n_text = len(table.extra.columns) + 1
    caption = (f"{latex_text(caption_text(table.spec))}. Reproduced vs the paper; "
               r"$\Delta$ = reproduced $-$ paper."
               + (f" {latex_text(rerun_note(table))}." if table.spec.has_rerun else "")
               + "".join(f" {latex_text(note)}." for note in notes(table)))
    return styler.to_latex(
        hrules=True, multicol_align="c", position_float="centering",
        column_format="l" * n_text + "r" * (frame.shape[1] - n_text + 1),
        caption=caption, label=f"tab:{table.spec.stem}")


def rerun_note(table: Table) -> str:
    """What the re-run column is and where each row's numbers come from (a caption note)."""
    labels = {r.key: r.label for r in table.spec.rows}
    sources = "; ".join(f"{labels[key]}: {text}" for key, text in table.spec.rerun_source.items())
    return f"{RERUN.capitalize()}: an independent re-run published by others ({sources})"


def caption_text(spec) -> str:
    """The caption without "Table N:", which LaTeX's ``\\caption`` prints itself; the
    paper's number goes in words."""
    if isinstance(spec.number, int):
        return f"{spec.title} (the paper's Table {spec.number})"
    return spec.title


def console_frame(table: Table) -> pd.DataFrame:
    """A compact view: ``reproduced (Δ)`` per column."""
    full = display_frame(table, decimals=2)
    view = {}
    for label in _column_labels(table).values():
        values, delta = full[(label, REPRODUCED)], full[(label, "Δ")]
        view[label] = [v if d == MISSING else f"{v} ({d})"
                       for v, d in zip(values, delta, strict=True)]
    lead = {c: full[("", c)] for c in table.extra.columns if c in ("Img size", "FLOPs")}
    return pd.DataFrame({**lead, **view}, index=full.index)


def console_text(table: Table) -> str:
    """The console view with a key line and the notes under it."""
    key = f"cells: {REPRODUCED} mIoU (Δ = {REPRODUCED} − {PAPER})"
    return "\n".join([console_frame(table).to_string(), key, *notes(table)])


def write_table(table: Table, out: Path) -> list[Path]:
    """``<stem>.csv``, ``.tex``, ``.png``, ``.pdf`` under ``out`` (stem: ``tableN`` or the
    named table's)."""
    stem = out / table.spec.stem
    csv_frame(table).to_csv(stem.with_suffix(".csv"), encoding="utf-8")
    stem.with_suffix(".tex").write_text(to_latex(table), encoding="utf-8")
    return [stem.with_suffix(".csv"), stem.with_suffix(".tex"), *plot_table(table, stem)]
