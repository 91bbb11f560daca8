"""See what the model sees: last-block attention maps and segmentation panels.

``python -m sclip_lab.visualize image=PATH points="[[x, y], ...]" attentions="[vanilla, csa]"``
draws, for every source point, the last block's attention row of its patch token (mean over
heads) as a heat map over the resized image, one row per attention variant (the paper's
Fig. 2 and 4: vanilla CLIP's maps look alike for every point, CSA's follow the point).
``mode=segment`` draws the image and one class-coloured prediction per variant with a legend
(Fig. 1). Both write ``<name>.png`` and ``<name>.pdf`` into ``output`` (default: the Hydra run
dir). Every entry of ``attentions`` is an attention name plus optional knobs, as the run's
``variants`` take them: ``'sharpen temperature=2'``, ``'csa projection=random n=4'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import Tensor

from sclip_lab import data, segment, viz
from sclip_lab.build import (
    learned_of,
    segmenter_from_config,
    variant_configs,
    vocabulary,
)
from sclip_lab.cli import hydra_entry
from sclip_lab.errors import ConfigError, check_writable_dir, integer
from sclip_lab.head_spec import head_spec_of
from sclip_lab.heads import trunk_needs
from sclip_lab.model import DenseEncoder, LastBlock
from sclip_lab.proxy import window_features

log = logging.getLogger("sclip_lab")

HEAT_ALPHA = 0.5  # heat map opacity over the photo


# ------------------------------------------------------------------ attention entries


def attention_entries(cfg: DictConfig, compose=None) -> list[tuple[str, DictConfig]]:
    """``cfg.attentions`` -> ``[(entry, composed config)]``, through the same variant
    mechanism as ``run``'s ``variants`` (at least one entry; each listed once)."""
    entries = cfg.attentions
    if isinstance(entries, str):
        entries = [entries]
    labels = [str(e) for e in entries or []]
    if not labels:
        raise ConfigError("attentions=[] is empty; give e.g. attentions=\"[vanilla, csa]\"")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"attentions={labels} repeats an entry; list each variant once")
    return variant_configs(cfg, labels, compose)


# ------------------------------------------------------------------- attention maps


def parse_points(points: Any) -> list[tuple[float, float]]:
    """``[[x, y], ...]`` (original-image pixels) -> a list of ``(x, y)`` floats."""
    out = []
    for p in points or []:
        try:
            x, y = (float(v) for v in p)
        except (TypeError, ValueError):
            raise ConfigError(f"points: {p} is not an [x, y] pair; write "
                              "points=\"[[120, 80], [300, 200]]\"") from None
        out.append((x, y))
    if not out:
        raise ConfigError("mode=attention needs source points: "
                          "points=\"[[x, y], ...]\" in original-image pixels")
    return out


def resized_point(point: tuple[float, float], size: tuple[int, int],
                  resized: tuple[int, int]) -> tuple[float, float]:
    """Centre of original pixel ``(x, y)`` in the resized image's continuous coordinates.

    Args:
        point: ``(x, y)`` in original pixels, ``0 ≤ x < W``, ``0 ≤ y < H``.
        size: original ``(H, W)``.
        resized: resized ``(h, w)``.
    """
    x, y = point
    H, W = size
    if not (0 <= x < W and 0 <= y < H):
        raise ConfigError(f"point ({x:g}, {y:g}) lies outside the {W}×{H} image; points are "
                          "(x, y) in original-image pixels, 0 ≤ x < width, 0 ≤ y < height")
    # Pixel i covers [i, i + 1); its centre i + 0.5 scales like any continuous coordinate.
    return (x + 0.5) * resized[1] / W, (y + 0.5) * resized[0] / H


def point_token(point: tuple[float, float], size: tuple[int, int], resized: tuple[int, int],
                grid: tuple[int, int], patch: int) -> int:
    """Token index (CLS = 0, then the grid row-major) of the patch holding ``point``.

    Args:
        point: ``(x, y)`` in original pixels.
        size: original ``(H, W)``; resized: resized ``(h, w)``.
        grid: ``(gh, gw)`` patch grid of the resized image; patch: patch size in pixels.
    """
    xr, yr = resized_point(point, size, resized)
    # The patch conv drops the last (h mod patch) rows / columns: a point there belongs to the
    # nearest patch, the last one.
    row = min(int(yr // patch), grid[0] - 1)
    col = min(int(xr // patch), grid[1] - 1)
    return 1 + row * grid[1] + col


def point_maps(attn: Tensor, tokens: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """Rows of ``tokens`` over the patch grid.

    Args:
        attn: ``(1, heads, N, N)`` attention of one image.
        tokens: P query token indices (≥ 1, patch tokens).
        grid: ``(gh, gw)`` with ``N = 1 + gh·gw``.

    Returns:
        ``(P, gh, gw)`` float32: mean over heads of each row, CLS column dropped.
    """
    rows = attn[0].float().mean(0)[list(tokens)]  # (P, N)
    return rows[:, 1:].reshape(len(tokens), *grid).cpu().numpy()


@torch.no_grad()
def attention_maps(encoder: DenseEncoder, resized: Tensor,
                   tokens: Sequence[int] | Callable[[tuple[int, int], Any], list[int]],
                   lasts: Mapping[str, LastBlock], proxies: Mapping[Any, Any] | None = None
                   ) -> dict[str, np.ndarray]:
    """One whole-image trunk pass (per position-embedding rule), then every variant's point
    rows.

    Args:
        resized: ``(3, Hr, Wr)`` normalised image (positional embeddings are interpolated to
            its grid).
        tokens: P patch token indices, or ``(grid, proxy spec or None) -> indices`` where
            variants' grids differ (a proxy variant attends over its proxy's grid).
        lasts: label -> built last block.
        proxies: proxy spec -> loaded backbone (None for clip_self), for proxy variants.

    Returns:
        label -> ``(P, gh, gw)`` attention maps (mean over heads), on each variant's grid.
    """
    device = encoder.visual.conv1.weight.device
    image = resized[None].to(device)
    out = {}
    for rule in dict.fromkeys(last.pos_embed for last in lasts.values()):  # one trunk each
        group = {label: last for label, last in lasts.items() if last.pos_embed == rule}
        early, hidden, named = trunk_needs(group.values(), encoder.depth)
        trunk = encoder.trunk(image, early, hidden, rule, named)
        for label, last in group.items():
            grid = trunk.grid
            if last.proxy is not None:
                feats = window_features(last.proxy, (proxies or {}).get(last.proxy), trunk,
                                        [image])
                trunk.proxy[last.proxy] = feats
                grid = tuple(feats.shape[-2:])
            rows = tokens(grid, last.proxy) if callable(tokens) else tokens
            out[label] = point_maps(encoder.last_attention(trunk, last), rows, grid)
    return {label: out[label] for label in lasts}


def attention_figure(image: np.ndarray, maps: Mapping[str, np.ndarray],
                     points: Sequence[tuple[float, float]], titles: Sequence[str], patch: int,
                     path_stem: Path, cover: Mapping[str, tuple[float, float]] | None = None
                     ) -> list[Path]:
    """Heat maps over the resized image: a row per variant, a column per point.

    Each panel's colours span its own min…max (maps of different variants differ in scale
    by orders of magnitude; the figure compares where, not how much).

    Args:
        image: ``(h, w, 3)`` uint8 resized image.
        maps: label -> ``(P, gh, gw)`` attention maps.
        points: P ``(x, y)`` marker positions in resized-image coordinates.
        titles: P column titles.
        patch: patch size; the grid covers ``(gh·patch, gw·patch)`` from the top-left.
        path_stem: output path without suffix; ``.png`` and ``.pdf`` are written.
        cover: label -> ``(height, width)`` in pixels that row's grid covers, where it is
            not CLIP's (proxy grids).
    """
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    rows, cols = len(maps), len(points)
    panel = 3.2
    fig = Figure(figsize=(panel * cols + 0.6, panel * h / w * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (label, stack) in enumerate(maps.items()):
        gh, gw = stack.shape[1:]
        ch, cw = (cover or {}).get(label, (gh * patch, gw * patch))
        for c, (x, y) in enumerate(points):
            ax = axes[r, c]
            m = stack[c]
            m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
            heat = cv2.resize(m.astype(np.float32), (round(cw), round(ch)),
                              interpolation=cv2.INTER_LINEAR)
            ax.imshow(image, extent=(0, w, h, 0))
            ax.imshow(heat, cmap="jet", alpha=HEAT_ALPHA, vmin=0, vmax=1,
                      extent=(0, cw, ch, 0))
            ax.plot([x], [y], marker="o", markersize=11, markerfacecolor="white",
                    markeredgecolor="black", markeredgewidth=2.5)
            ax.plot([x], [y], marker="+", markersize=7, color="black", markeredgewidth=1.5)
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=11)
            if c == 0:
                ax.set_ylabel(label, fontsize=12, fontweight="bold")
    return viz.save_figure(fig, path_stem)


# ------------------------------------------------------------------------------ modes


def attention_mode(cfg: DictConfig, output: Path, compose=None) -> list[Path]:
    """Fig. 2/4: attention maps of ``cfg.points`` under every ``cfg.attentions`` entry."""
    points = parse_points(cfg.points)
    entries = attention_entries(cfg, compose)
    short = integer(cfg.size, "size", 1)
    image = data.read_image(Path(cfg.image))
    small = segment.resize_image(image, short)
    size, resized = image.shape[:2], small.shape[:2]
    # Check the points before the (slow) model load.
    marks = [resized_point(p, size, resized) for p in points]
    segmenter, info = segmenter_from_config(entries[0][1], None, 1.0, 0.0, None, heads=[
        (head_spec_of(v), learned_of(v)) for _, v in entries])  # no text: maps only
    encoder, proxies = segmenter.encoder, segmenter.proxies
    lasts = {label: head.last for (label, _), head in zip(entries, segmenter.heads)}
    grid = (resized[0] // encoder.patch, resized[1] // encoder.patch)
    if min(grid) < 1:
        raise ConfigError(f"size={cfg.size} gives no {encoder.patch}-pixel patch; raise size")

    def tokens(grid: tuple[int, int], spec: Any) -> list[int]:
        # A proxy resized to a fixed input (SAM) covers the whole image; else whole patches.
        patch = encoder.patch if spec is None or spec.arch is None else spec.patch
        if spec is not None and spec.input_size is not None:
            patch = resized[0] / grid[0]
        return [point_token(p, size, resized, grid, patch) for p in points]

    maps = attention_maps(encoder, segment.normalize(small), tokens, lasts, proxies)
    cover = {label: proxy_cover(lasts[label].proxy, resized, maps[label].shape[1:])
             for label, _ in entries if lasts[label].proxy is not None}
    titles = [f"point ({x:g}, {y:g})" for x, y in points]
    paths = attention_figure(small, maps, marks, titles, encoder.patch, output / "attention",
                             cover)
    log.info("%s: %d×%d patch grid, %s %s", cfg.image, *grid, info["arch"], info["precision"])
    return paths


def proxy_cover(spec: Any, resized: tuple[int, int], grid: tuple[int, int]
                ) -> tuple[float, float]:
    """Pixels ``(height, width)`` of the resized image a proxy's ``grid`` covers: whole
    patches from the top-left, or all of it for a proxy with a fixed input size (SAM)."""
    if spec.arch is not None and spec.input_size is not None:
        return float(resized[0]), float(resized[1])
    patch = spec.patch or resized[0] // grid[0]  # clip_self: CLIP's own patch
    return float(grid[0] * patch), float(grid[1] * patch)


def segment_mode(cfg: DictConfig, output: Path, compose=None) -> list[Path]:
    """Fig. 1: the image and one prediction per ``cfg.attentions`` entry, with a legend."""
    entries = attention_entries(cfg, compose)
    image = data.read_image(Path(cfg.image))
    classes, scale, prob_thd, area_thd = vocabulary(cfg)
    segmenter, info = segmenter_from_config(entries[0][1], classes, scale, prob_thd, area_thd,
                                            heads=[(head_spec_of(v), learned_of(v))
                                                   for _, v in entries])
    resized = segmenter.prep(image)
    per_head = segmenter.logits_many([resized], [image.shape[:2]])
    preds = {label: segmenter.classes(logits[0]).cpu().numpy()
             for (label, _), logits in zip(entries, per_head)}
    names = viz.class_names(classes, has_background=prob_thd > 0)
    log.info("%s: %d classes, %s %s", cfg.image, len(classes), info["arch"], info["precision"])
    return viz.segmentation_figure(image, preds, names, output / "segmentation")


MODES = {"attention": attention_mode, "segment": segment_mode}


def visualize(cfg: DictConfig, output: Path, compose=None) -> list[Path]:
    """Run ``cfg.mode`` and write its figures into ``output``; return their paths.

    ``compose(overrides) -> config`` builds each attention entry's config (default: Hydra's
    compose on top of this job's overrides, as ``run``'s variants)."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode={cfg.mode!r}; choose one of {list(MODES)}")
    paths = MODES[cfg.mode](cfg, Path(output), compose)
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


@hydra_entry("visualize")
def main(cfg: DictConfig) -> None:
    output = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
    check_writable_dir(output, "output")
    visualize(cfg, output)


if __name__ == "__main__":
    main()
