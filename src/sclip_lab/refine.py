"""Refinements of a head's stitched logits at the original size (docs/protocol.md §7, §19).

A refinement is called as ``rule(guide, logits, queries)``: the ``(Q, H, W)`` stitched
cosine logits, the ``(3, H, W)`` normalised image resized to them and the ``(Q, E)`` unit
text queries; it returns logits of the same shape, from which the class map is read.
PAMR (``postprocess=pamr``, NACLIP's) and PEARL's text-aware Laplacian propagation
(``postprocess=tlp``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PAMR:
    """PAMR on the stitched logits (``postprocess=pamr``; docs/protocol.md §7)."""

    steps: int = 10
    dilations: tuple[int, ...] = (8, 16)

    def __call__(self, guide: torch.Tensor, logits: torch.Tensor,
                 queries: torch.Tensor | None = None) -> torch.Tensor:
        return pamr(guide, logits, self.steps, self.dilations)


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


# -------------------------------------------------------------------------------- TLP


@dataclass(frozen=True)
class TLP:
    """PEARL's text-aware Laplacian propagation (``postprocess=tlp``; PGSmall/PEARL @c26062b,
    ``pearl/prop.py``; docs/protocol.md §19). Defaults are the official constants (L34–40).

    ``agree``: ``diagonal`` is the official ``einsum('cc,bcij->bcij', S, p)``, which reads
    only S's diagonal (S_cc · p_c); ``matrix`` is S·p over the queries (an ablation).
    """

    grid: int = 80
    tau_s: float = 0.5
    diag_boost: float = 10.0
    edge: float = 5.0
    cg_iters: int = 25
    tau: float = 1.0
    min_conf: float = 0.05
    agree: str = "diagonal"

    def __call__(self, guide: torch.Tensor, logits: torch.Tensor,
                 queries: torch.Tensor | None = None) -> torch.Tensor:
        if queries is None:
            raise ValueError("postprocess=tlp needs the text queries")
        return tlp(guide, logits, queries, self)


Refinement = PAMR | TLP
EPS = 1e-6  # TLP(eps=1e-6)


def text_affinity(queries: torch.Tensor, tau_s: float, diag_boost: float) -> torch.Tensor:
    """``(Q, Q)``: rownorm(softmax(T Tᵀ / τ_S) + boost·I) of the unit queries (``bind_text``)."""
    t = F.normalize(queries.float(), dim=-1)
    s = torch.softmax(t @ t.T / max(tau_s, EPS), dim=1)
    if diag_boost > 0:
        s = s + diag_boost * torch.eye(len(s), device=s.device)
        s = s / (s.sum(1, keepdim=True) + EPS)
    return s


def _mixer(s: torch.Tensor, agree: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``p (1, Q, …) -> S p`` per pixel: S's diagonal alone, or the matrix product."""
    if agree == "diagonal":
        diag = s.diagonal().view(1, -1, 1, 1)
        return lambda p: diag * p
    return lambda p: torch.einsum("cd,bdij->bcij", s, p)


def _laplacian(x: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """``L_w x`` on the 4-neighbour grid, ``w_h`` ``(1, 1, H, W−1)``, ``w_v`` ``(1, 1, H−1, W)``."""
    out = torch.zeros_like(x)
    d = w_h * (x[..., 1:] - x[..., :-1])
    out[..., 1:] += d
    out[..., :-1] -= d
    d = w_v * (x[..., 1:, :] - x[..., :-1, :])
    out[..., 1:, :] += d
    out[..., :-1, :] -= d
    return out


def _cg(apply, b: torch.Tensor, x: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` conjugate-gradient steps on ``apply(x) = b`` from ``x`` (``_cg_solve``)."""
    r = b - apply(x)
    p, rs = r.clone(), (r * r).sum()
    for _ in range(iters):
        ap = apply(p)
        alpha = rs / ((p * ap).sum() + 1e-12)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum()
        p = r + rs_new / (rs + 1e-12) * p
        rs = rs_new
    return x


def tlp(guide: torch.Tensor, logits: torch.Tensor, queries: torch.Tensor, rule: TLP
        ) -> torch.Tensor:
    """PEARL's TLP of one image's ``(Q, H, W)`` logits (``TLP.forward``), fp32.

    Both are average-pooled by ``round(H/grid) × round(W/grid)``; p = softmax over the raw
    logits, C_w = max(max p, min_conf)² (1 + Σ p·Sp); edge weights exp(−edge·|∇gray|/mean)
    (1 + Σ p_i·Sp_j) clipped to [0, 1]; ``cg_iters`` CG steps on (C_w + τ L_w) F = C_w L from
    F = L; bilinear back to (H, W).
    """
    h, w = logits.shape[-2:]
    sh, sw = max(1, round(h / float(rule.grid))), max(1, round(w / float(rule.grid)))
    img, lg = guide[None].float(), logits[None].float()
    if sh > 1 or sw > 1:
        img = F.avg_pool2d(img, (sh, sw), (sh, sw), count_include_pad=False)
        lg = F.avg_pool2d(lg, (sh, sw), (sh, sw), count_include_pad=False)
    mix = _mixer(text_affinity(queries.to(lg.device), rule.tau_s, rule.diag_boost), rule.agree)
    probs = torch.softmax(lg, dim=1)
    agree = (probs * mix(probs)).sum(1, keepdim=True).clamp(0.0, 1.0)
    weight = probs.max(1, keepdim=True)[0].clamp_min(rule.min_conf) ** 2 * (1.0 + agree)
    gray = 0.299 * img[:, :1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
    edges = []
    for dim in (3, 2):  # horizontal, then vertical neighbours
        n = gray.shape[dim] - 1
        g = (gray.narrow(dim, 1, n) - gray.narrow(dim, 0, n)).abs()
        image_w = torch.exp(-rule.edge * (g / (g.mean() + EPS)))
        gain = (probs.narrow(dim, 1, n) * mix(probs.narrow(dim, 0, n))).sum(1, keepdim=True)
        edges.append((image_w * (1.0 + gain.clamp(0.0, 1.0))).clamp(0.0, 1.0))
    out = _cg(lambda x: weight * x + rule.tau * _laplacian(x, *edges), weight * lg, lg,
              rule.cg_iters)
    if sh > 1 or sw > 1:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return out[0]
