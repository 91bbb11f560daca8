"""Colours for class maps: the VOC bit-pattern palette, palette PNGs, overlays and figures."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def palette(num_colors: int = 256) -> np.ndarray:
    """``(num_colors, 3)`` uint8: PASCAL VOC's palette (index 0 black, 255 almost white)."""
    out = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[i] = (r, g, b)
    return out


def class_names(classes: Sequence[str], has_background: bool) -> list[str]:
    """Legend names: each class line's first synonym; class 0 ``background`` when it is one.

    A background class is a bag of stuff synonyms (VOC's line 0 starts with ``sky``), so its
    first synonym would mislabel it. Only benchmarks with a background class set a
    probability threshold (docs/protocol.md §5.12), which is how callers can tell.
    """
    names = [c.split(", ")[0].strip() for c in classes]
    if has_background and names:
        names[0] = "background"
    return names


# Classes a palette PNG can hold: its indices are one byte.
PALETTE_CLASSES = 256


def save_palette_png(pred: np.ndarray, path: str | Path) -> None:
    """Write an ``(H, W)`` class map (values < 256) as a palette PNG (indices preserved)."""
    if pred.max(initial=0) >= PALETTE_CLASSES:
        raise ValueError(f"a palette PNG holds at most {PALETTE_CLASSES} classes")
    img = Image.fromarray(pred.astype(np.uint8), mode="P")
    img.putpalette(palette().flatten().tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def colorize(pred: np.ndarray) -> np.ndarray:
    """``(H, W)`` class map -> ``(H, W, 3)`` uint8 colours (classes ≥ 256 wrap)."""
    return palette()[pred.astype(np.int64) % 256]


def overlay(image: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an ``(H, W, 3)`` uint8 RGB image with the colours of an ``(H, W)`` class map."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colorize(pred).astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)


def present_classes(preds: Iterable[np.ndarray]) -> list[int]:
    """Sorted class indices that occur in any of the ``(H, W)`` class maps."""
    found: set[int] = set()
    for pred in preds:
        found.update(int(c) for c in np.unique(pred))
    return sorted(found)


# Legend geometry (matplotlib's legend units: multiples of the font size).
LEGEND_FONT = 11  # points, for a handful of classes
LEGEND_FONT_MANY = 9  # points, beyond LEGEND_MANY entries (ADE20K, COCO-Stuff)
LEGEND_MANY = 40
HANDLE_LENGTH, HANDLE_PAD, COLUMN_SPACING, LABEL_SPACING = 1.4, 0.8, 1.5, 0.5
FIGURE_MARGIN = 0.2  # inches left free beside the legend on each side
# Longest side of a panel as drawn: a larger photo is subsampled for the figure only.
MAX_PANEL_SIDE = 2048


def legend_columns(labels: Sequence[str], width: float, fontsize: float) -> int:
    """How many legend columns of ``labels`` (at ``fontsize`` points) fit ``width`` inches:
    every column as wide as the widest entry (swatch, pad, text), at least one."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    prop = FontProperties(size=fontsize)
    text = max(text_to_path.get_text_width_height_descent(s, prop, ismath=False)[0]
               for s in labels) / 72
    em = fontsize / 72
    column = (HANDLE_LENGTH + HANDLE_PAD) * em + 1.1 * text  # 10% for the renderer's hinting
    spacing = COLUMN_SPACING * em
    fits = int((width - 2 * FIGURE_MARGIN - 2 * em + spacing) // (column + spacing))
    return max(1, min(len(labels), fits))


def overlay_figure(image: np.ndarray, pred: np.ndarray | Mapping[str, np.ndarray],
                   classes: Sequence[str], alpha: float = 0.6) -> Figure:
    """The image, then one class-coloured overlay per prediction, with a class legend.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        pred: an ``(H, W)`` class map, or panel title -> class map (several methods side
            by side); each the size of ``image``.
        classes: the display name of each class index, e.g. ``Segmenter.class_names``
            (indices beyond it are shown as ``class k``).
        alpha: weight of the class colours over the photo.

    Returns:
        A matplotlib ``Figure`` (off-screen: shown by Jupyter, written by ``savefig`` or
        ``save_figure``). The legend, below the panels, lists only the classes present in
        the maps shown, each a swatch in its palette colour and its full name, in as many
        columns as fit the panels' width (or one, the figure widened for a name longer
        than that) and as many rows as needed: the figure grows to hold it, so no entry
        of any vocabulary is ever clipped.

    Example:
        >>> image = np.zeros((4, 6, 3), np.uint8)
        >>> fig = overlay_figure(image, np.ones((4, 6), np.int64), ["sky", "cat"])
        >>> [ax.get_title() for ax in fig.axes]
        ['image', 'prediction']
    """
    # The object-oriented API draws off-screen without touching pyplot's global backend.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    preds = {k: np.asarray(p) for k, p in
             (pred.items() if isinstance(pred, Mapping) else [("prediction", pred)])}
    present = present_classes(preds.values())  # of the full maps: no class is lost
    H, W = image.shape[:2]
    step = -(-max(H, W) // MAX_PANEL_SIDE)  # the figure shows no more pixels than that
    shown = image[::step, ::step]
    panels = [("image", shown)] + [(title, overlay(shown, p[::step, ::step], alpha))
                                   for title, p in preds.items()]
    width = 4.0  # inches per panel
    panel_height = width * H / W + 0.5  # the image and its title
    fig_width = width * len(panels)
    fig = Figure(figsize=(fig_width, panel_height), layout="constrained")
    for ax, (title, img) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=12)
        ax.set_axis_off()
    if not present:
        return fig
    labels = [classes[c] if 0 <= c < len(classes) else f"class {c}" for c in present]
    fontsize = LEGEND_FONT if len(labels) <= LEGEND_MANY else LEGEND_FONT_MANY
    ncol = legend_columns(labels, fig_width, fontsize)
    rows = -(-len(labels) // ncol)
    # A first guess of the legend's height, so that the first layout has room for it.
    fig.set_size_inches(fig_width, panel_height + (rows * (1 + LABEL_SPACING) + 1.5)
                        * fontsize / 72 + 0.2)
    colors = palette()
    handles = [Patch(facecolor=colors[c % 256] / 255, edgecolor="black", label=label)
               for c, label in zip(present, labels)]
    legend = fig.legend(handles=handles, loc="outside lower center", ncol=ncol,
                        frameon=False, fontsize=fontsize, handlelength=HANDLE_LENGTH,
                        handletextpad=HANDLE_PAD, columnspacing=COLUMN_SPACING,
                        labelspacing=LABEL_SPACING)
    # Then the figure is sized by the legend as drawn: as wide as it (at least the
    # panels), as tall as the panels above it (font sizes are in points, so the legend's
    # size in inches does not depend on the figure's).
    fig.draw_without_rendering()
    box = legend.get_window_extent()
    fig.set_size_inches(max(fig_width, box.width / fig.dpi + 2 * FIGURE_MARGIN),
                        panel_height + box.height / fig.dpi + 0.2)
    return fig


def segmentation_figure(image: np.ndarray, preds: dict[str, np.ndarray], class_names: list[str],
                        path_stem: Path, alpha: float = 0.6) -> list[Path]:
    """``overlay_figure`` of ``preds`` (panel title -> ``(H, W)`` class map) written as
    ``<path_stem>.png`` and ``<path_stem>.pdf`` (a stem may contain dots, e.g. an image
    id); returns the written paths (PNG, PDF)."""
    return save_figure(overlay_figure(image, preds, class_names, alpha), path_stem)


def save_figure(fig: Figure, path_stem: str | Path, dpi: int = 150,
                formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write a matplotlib figure as ``<stem>.png`` and ``<stem>.pdf`` (or the ``formats``
    given), each through a temporary name; return the paths.

    The suffixes are appended, not substituted, so a stem may contain dots (image ids).
    """
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.parent / f"{path_stem.name}.{ext}" for ext in formats]
    for path in paths:  # through a temporary name: a full disk leaves no half figure
        tmp = path.with_name(f".{path.name}.part")
        try:
            fig.savefig(tmp, dpi=dpi, format=path.suffix[1:])
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return paths
