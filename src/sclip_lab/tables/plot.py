"""A built table as a figure: one panel per dataset, reproduced vs paper bars per row.

The panels share one x-range (mIoU %), so bars compare across benchmarks. A missing value
is never a zero-length bar (which reads as 0): its slot says "n/a". A partial cell (a
record of part of the split, ``limit=`` set) is hatched, with a "partial split" legend
entry. Error bars: sample std over random trials.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sclip_lab.tables.collect import Table
from sclip_lab.tables.layout import PAPER, REPRODUCED

NA_TEXT = "n/a"
PARTIAL_HATCH = "///"
BAR = 0.4  # bar height: a row's two bars fill 0.8 of its slot
COLUMNS_PER_ROW = 4


def row_labels(table: Table) -> list[str]:
    """The y labels; Table 4 shows each mode's relative cost next to its name."""
    rows = table.spec.rows
    if table.spec.number == 4:
        flops = table.extra["FLOPs"]
        return [f"{r.label} ({flops[r.key]:.1f}×)" for r in rows]
    return [r.label for r in rows]


def x_limit(table: Table) -> float:
    """The shared upper x-limit: the longest bar with its error bar, rounded up to 10."""
    names = list(table.spec.columns)
    tops = np.concatenate([(table.ours[names] + table.std[names].fillna(0)).to_numpy().ravel(),
                           table.paper[names].to_numpy(dtype=float).ravel()])
    tops = tops[np.isfinite(tops)]
    top = float(tops.max()) if tops.size else 100.0
    return max(10.0, math.ceil(top * 1.05 / 10) * 10)


def _bars(ax, y: np.ndarray, values: np.ndarray, color, hatched: np.ndarray,
          xerr: np.ndarray) -> None:
    """Horizontal bars at ``y``; a NaN value gets "n/a" in its slot instead of a bar."""
    for yi, value, partial, err in zip(y, values, hatched, xerr, strict=True):
        if math.isnan(value):
            # x in axes coordinates: the label sits at the panel's left edge at any range.
            ax.text(0.02, yi, NA_TEXT, transform=ax.get_yaxis_transform(), ha="left",
                    va="center", fontsize=6, style="italic", color="0.35")
            continue
        ax.barh(yi, value, height=BAR, color=color, edgecolor="0.15" if partial else color,
                linewidth=0.5, hatch=PARTIAL_HATCH if partial else None,
                xerr=None if math.isnan(err) else err, capsize=2, error_kw={"linewidth": 1})


def _panel(ax, table: Table, name: str, colors) -> None:
    keys = [r.key for r in table.spec.rows]
    y = np.arange(len(keys), dtype=float)
    none = np.zeros(len(keys), dtype=bool)
    _bars(ax, y - BAR / 2, table.ours.loc[keys, name].to_numpy(dtype=float), colors[0],
          table.partial.loc[keys, name].to_numpy(dtype=bool),
          table.std.loc[keys, name].to_numpy(dtype=float))
    _bars(ax, y + BAR / 2, table.paper.loc[keys, name].to_numpy(dtype=float), colors[1], none,
          np.full(len(keys), np.nan))
    ax.set_title(table.spec.columns[name])
    ax.grid(axis="y", visible=False)  # a row's grid line would cut between its two bars


def _legend_handles(table: Table, colors) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[0], label=REPRODUCED), Patch(color=colors[1], label=PAPER)]
    if table.partial[list(table.spec.columns)].to_numpy().any():
        limits = ", ".join(str(v) for v in table.limits)
        handles.append(Patch(facecolor=colors[0], edgecolor="0.15", hatch=PARTIAL_HATCH,
                             label=f"partial split (limit={limits})"))
    handles.append(Line2D([], [], linestyle="none", label=f"{NA_TEXT}: no value"))
    return handles


def figure_of(table: Table):
    """The table's figure (a matplotlib ``Figure``, no pyplot state): one panel per dataset
    column, shared x (mIoU %) and y (rows) axes."""
    import seaborn as sns
    from matplotlib.figure import Figure

    names = list(table.spec.columns)
    ncols = min(COLUMNS_PER_ROW, len(names))
    nrows = math.ceil(len(names) / ncols)
    height = 0.35 * len(table.spec.rows) + 1.0
    # Scoped styles: building a figure must not restyle the caller's figures.
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        colors = sns.color_palette("deep", 2)
        fig = Figure(figsize=(3.0 * ncols + 1.5, height * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
        for ax, name in zip(axes, names, strict=False):
            _panel(ax, table, name, colors)
            ax.tick_params(axis="x", labelbottom=True)  # every panel keeps its scale
        for ax in axes[len(names):]:
            ax.set_visible(False)
        first = axes[0]
        first.set_yticks(np.arange(len(table.spec.rows)), row_labels(table))
        first.set_ylim(len(table.spec.rows) - 0.5, -0.5)  # first row on top
        first.set_xlim(0.0, x_limit(table))
        fig.supxlabel("mIoU (%)")
        fig.suptitle(table.spec.heading)
        fig.legend(handles=_legend_handles(table, colors), loc="outside right center",
                   frameon=False)
    return fig


def plot_table(table: Table, stem: Path) -> list[Path]:
    """The figure as ``<stem>.png`` and ``<stem>.pdf``."""
    fig = figure_of(table)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=150)
    return paths
