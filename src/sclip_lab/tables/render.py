"""A built table as text: the CSV and console frames and LaTeX (pandas ``Styler``).

Each dataset column has three: ours, the paper's value and Δ = ours − paper. Random-trial
cells read ``mean ± std (k)`` with k the number of trials; missing cells are "–" ("--" in
LaTeX). CSV has two decimals, LaTeX one, with the best of ours per column in bold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sclip_lab.tables.collect import Table
from sclip_lab.tables.layout import AVG, MISSING
from sclip_lab.tables.plot import plot_table

STATS = ("ours", "paper", "Δ")
STATS_LATEX = {"ours": "ours", "paper": "paper", "Δ": r"$\Delta$"}


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
        caption=f"{latex_text(caption_text(table.spec))}. Ours vs the paper; "
                r"$\Delta$ = ours $-$ paper.",
        label=f"tab:{table.spec.stem}")


def caption_text(spec) -> str:
    """The caption without "Table N:", which LaTeX's ``\\caption`` prints itself; the
    paper's number goes in words."""
    if isinstance(spec.number, int):
        return f"{spec.title} (the paper's Table {spec.number})"
    return spec.title


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


def write_table(table: Table, out: Path) -> list[Path]:
    """``<stem>.csv``, ``.tex``, ``.png``, ``.pdf`` under ``out`` (stem: ``tableN`` or the
    named table's)."""
    stem = out / table.spec.stem
    csv_frame(table).to_csv(stem.with_suffix(".csv"), encoding="utf-8")
    stem.with_suffix(".tex").write_text(to_latex(table), encoding="utf-8")
    return [stem.with_suffix(".csv"), stem.with_suffix(".tex"), *plot_table(table, stem)]
