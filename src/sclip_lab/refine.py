"""Refinements of stitched logits at the resized image's size (docs/protocol.md §7).

A refinement sees a head's ``(Q, H, W)`` stitched logits and the ``(3, H, W)`` normalised
image they were computed on, and returns logits of the same shape; the class map is read
from what it returns. PAMR (``postprocess=pamr``) is the one in the field's protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Refine:
    """PAMR on the stitched logits (``postprocess=pamr``; docs/protocol.md §7)."""

    steps: int = 10
    dilations: tuple[int, ...] = (8, 16)


def _neighbours(x: torch.Tensor, dilation: int) -> list[torch.Tensor]:
    """The 8 dilated 3×3 neighbours of every pixel of ``(B, K, H, W)``, replicate-padded."""
    H, W = x.shape[-2:]
    d = dilation
    padded = F.pad(x, (d, d, d, d), mode="replicate")
    return [padded[..., d + dy * d: d + dy * d + H, d + dx * d: d + dx * d + W]
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def pamr_affinity(guide: torch.Tensor, dilations: Sequence[int]) -> list[torch.Tensor]:
    """PAMR's pixel-adaptive affinities of a ``(B, 3, H, W)`` guide image.

    Returns one ``(B, 1, H, W)`` weight per neighbour position (8 per dilation), a softmax
    over positions of the channel-mean of −|x − x_p| / (1e-8 + 0.1·σ), with σ the unbiased
    std over all stencil samples of all dilations, centre included once per dilation.
    """
    neigh = [n for d in dilations for n in _neighbours(guide, d)]
    samples = torch.stack(neigh + [guide] * len(dilations), dim=2)  # (B, 3, P + D, H, W)
    sigma = samples.std(dim=2, unbiased=True)
    logits = torch.stack([-(guide - n).abs() / (1e-8 + 0.1 * sigma) for n in neigh], dim=2)
    weights = logits.mean(1).softmax(1)  # (B, P, H, W)
    return list(weights.unsqueeze(2).unbind(1))


def pamr(guide: torch.Tensor, logits: torch.Tensor, steps: int = 10,
         dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """Pixel-adaptive mask refinement (docs/protocol.md §7).

    Args:
        guide: ``(3, H, W)`` normalised image at the logits' size.
        logits: ``(Q, H, W)`` stitched logits.

    Returns:
        ``(Q, H, W)``: ``steps`` times m ← Σ_p a_p · m_p (centre excluded).
    """
    weights = pamr_affinity(guide[None].float(), dilations)
    m = logits[None].float()
    for _ in range(steps):
        neigh = [n for d in dilations for n in _neighbours(m, d)]
        m = sum(w * n for w, n in zip(weights, neigh))
    return m[0]
