"""A position table resized to another patch grid, by each official code's rule: CLIP's
for each method (docs/protocol.md §1), and the proxy backbones' (§16).

The pretrained table holds ``1 + g²`` rows: CLS, then a g×g grid (g = 14 for B/16 at 224).
A window of another grid ``(h, w)`` needs the grid part resized, and the official codes
do it differently. On the native grid every rule is the table itself; off it (448 windows
of a 224 model) the rules give features ~1e-2 apart, so the rule is a trunk setting
(``attention.pos_embed``, set by each method's preset):

* ``bicubic_scale`` (the default): SCLIP, NACLIP, ClearCLIP, ResCLIP, SC-CLIP… (DINO's
  rule): bicubic, ``align_corners=False``, with ``scale_factor = ((h + 0.1)/g, (w + 0.1)/g)``
  — a scale factor, not a size, which also sets the sampling positions; the +0.1 makes the
  floored output size land on (h, w).
* ``bicubic_antialias``: GEM (WalBouss/GEM @5fa677c ``gem/gem_utils.py``
  ``resample_abs_pos_embed``, called with ``interpolation='bicubic', antialias=True``; the
  copy ClearCLIP vendors is the same): bicubic to the exact size (h, w), antialiased. Even
  when upsampling this is another kernel (PyTorch's antialiased bicubic is PIL's, a = −0.5;
  the plain one has a = −0.75).
* ``bilinear``: CLIP Surgery (xmed-lab/CLIP_Surgery @d4696d4 ``clip/clip_surgery_model.py``
  L335–341): bilinear to the exact size, ``align_corners`` unset (False).

Every rule interpolates in fp32 and casts the result to the table's dtype. The official
codes interpolate in the weights' dtype, which is fp32 in both (GEM's default precision;
CLIP Surgery's ``build_model`` leaves ``convert_weights`` commented out), so they agree
exactly; with ``precision=fp16`` the lab's resized table is rounded once to fp16.
CLIP Surgery resizes to a square grid only and writes the resized table back into the
model (``positional_embedding.data = …``), so a later window of another size is resized
from the already resized table; here every grid, square or not, is resized from the
pretrained table.

The proxy backbones resize their tables by the same functions (``proxy.official_pos_embed``):
DINO's rule is ``bicubic_scale``, DINOv2-with-registers' ``bicubic_antialias``, and MAE's
(``mae/pos_embed.py``) ``bicubic``: bicubic to the exact size, ``align_corners=False``, no
antialias. ``bicubic`` is not a CLIP method's, so it is no choice of ``attention.pos_embed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Resize = Callable[[Tensor, tuple[int, int]], Tensor]  # (1, D, g, g) -> (1, D, h, w)


def bicubic_scale(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(1, D, g, g)`` -> ``(1, D, h, w)``: bicubic by the scale factor (h + 0.1)/g."""
    g = patches.shape[-1]
    return F.interpolate(patches, scale_factor=((grid[0] + 0.1) / g, (grid[1] + 0.1) / g),
                         mode="bicubic", align_corners=False)


def bicubic_antialias(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(1, D, g, g)`` -> ``(1, D, h, w)``: bicubic to the size (h, w), antialiased."""
    return F.interpolate(patches, size=grid, mode="bicubic", align_corners=False,
                         antialias=True)


def bicubic(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(1, D, g, g)`` -> ``(1, D, h, w)``: bicubic to the size (h, w), no antialias."""
    return F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)


def bilinear(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(1, D, g, g)`` -> ``(1, D, h, w)``: bilinear to the size (h, w)."""
    return F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)


RULES: dict[str, Resize] = {"bicubic_scale": bicubic_scale,
                            "bicubic_antialias": bicubic_antialias, "bilinear": bilinear,
                            "bicubic": bicubic}
POS_EMBED_RULES = ("bicubic_scale", "bicubic_antialias", "bilinear")  # CLIP methods' rules
DEFAULT_POS_EMBED = "bicubic_scale"


def interpolate_pos_embed(pos: Tensor, grid: tuple[int, int], rule: str = DEFAULT_POS_EMBED,
                          *, prefix: int = 1, force: bool = False) -> Tensor:
    """``(prefix + g², D)`` table -> ``(prefix + h·w, D)`` for the grid ``(h, w)`` by ``rule``.

    The ``prefix`` rows (CLIP's CLS; 0 for a table of patch rows only) are kept as they are;
    the g×g rows are resized in fp32 and cast back to the table's dtype.

    Args:
        pos: the table, prefix rows first, then the grid in row-major order.
        grid: ``(h, w)``, rows and columns of patches.
        rule: a key of ``RULES``.
        prefix: how many rows precede the grid.
        force: resize even on the table's own grid, where the result is otherwise the
            table itself (DINO and DINOv2 do for a non-square image:
            ``proxy.official_pos_embed``).

    Example:
        >>> pos = torch.randn(1 + 14 * 14, 8)
        >>> interpolate_pos_embed(pos, (14, 14)) is pos
        True
        >>> interpolate_pos_embed(pos, (20, 30), "bilinear").shape
        torch.Size([601, 8])
    """
    if rule not in RULES:
        raise ValueError(f"unknown position-embedding rule {rule!r}; one of {tuple(RULES)}")
    g = math.isqrt(pos.shape[0] - prefix)
    if g * g != pos.shape[0] - prefix:
        raise ValueError(f"a position table of {pos.shape[0] - prefix} grid rows is not square")
    if grid == (g, g) and not force:
        return pos
    head, patches = pos[:prefix], pos[prefix:]
    patches = patches.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = RULES[rule](patches, grid)
    assert tuple(patches.shape[-2:]) == grid, (patches.shape, grid)
    patches = patches.permute(0, 2, 3, 1).reshape(-1, pos.shape[1]).to(pos.dtype)
    return torch.cat([head, patches]) if prefix else patches
