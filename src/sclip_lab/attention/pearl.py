"""PEARL's Procrustes-aligned attention (arXiv 2603.21528; github.com/PGSmall/PEARL @ c26062b).

Transcribed from ``pearl/attn.py`` (``pa_attn`` L22–78, ``_polar_unitary_newton_schulz``
L5–19), as ``clip/model.py`` calls it on the last block (L121–125 ``arch='reduced'``: no
residual, no MLP; L238–272 ``detach_cls=True``). Per head, over all N tokens, fp32::

    w   = ‖q_t‖ with the CLS weight 0, w ← w / (Σ w + 1e-6)
    q_c = q − Σ_t w_t q_t,   k_c = k − Σ_t w_t k_t
    R   = polar(k_cᵀ q_c)                 5 Newton–Schulz steps (or an exact SVD)
    A   = softmax(q (k R)ᵀ/√d_h + α_kk · k_c k_cᵀ/√d_h)

R is the orthogonal Procrustes rotation taking the centred keys onto the centred queries;
the first term uses the *uncentred* keys, which changes nothing: k and k_c differ by one
vector, so each row's logits shift by a constant that the softmax drops. Newton–Schulz
from the Frobenius-normalised MᵀM (+1e-6·I) is an approximation after five steps (small
singular values converge slowly): the iteration is reproduced, ``solver=svd`` is the exact
rotation. α_kk is 0.08, 0.3 on ADE20K and Cityscapes (``configs/cfg_*.py``). Its
refinement is ``postprocess=tlp`` (``sclip_lab.refine.TLP``), its protocol
``protocol=pearl``.

On a tower without a CLS token the zero weight goes to its prefix tokens (none on SigLIP),
read from the grid: N − h·w of them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sclip_lab.attention.core import AttentionInputs, register_attention
from sclip_lab.knobs import Knob

ALPHA_KK = 0.08  # pa_attn(alpha_kk=0.08); the segmentor's default
POLAR_ITERS = 5
EPS = 1e-6


def polar_newton_schulz(m: Tensor, iters: int = POLAR_ITERS, eps: float = EPS) -> Tensor:
    """``(…, d, d)``: M (MᵀM)^(−1/2) by ``iters`` coupled Newton–Schulz steps from the
    Frobenius-normalised MᵀM + eps·I (``_polar_unitary_newton_schulz``)."""
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype).expand_as(m)
    a = m.transpose(-2, -1) @ m
    norm = a.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]
    y, z = a / norm + eps * eye, eye.clone()
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return m @ (z / norm.sqrt())


def polar_svd(m: Tensor) -> Tensor:
    """``(…, d, d)``: U Vᵀ of M's SVD, the exact orthogonal polar factor."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def pa_attention(q: Tensor, k: Tensor, prefix: int, alpha_kk: float = ALPHA_KK,
                 solver: str = "polar", polar_iters: int = POLAR_ITERS,
                 use_kk: bool = True) -> Tensor:
    """``(B, heads, N, N)`` fp32 Procrustes-aligned attention of per-head ``q``, ``k``
    ``(B, heads, N, d_h)``; the first ``prefix`` tokens get zero centring weight."""
    q, k = q.float(), k.float()
    scale = q.shape[-1] ** -0.5
    w = q.norm(dim=-1, keepdim=True)
    w[..., :prefix, :] = 0.0
    w = w / (w.sum(-2, keepdim=True) + EPS)
    q_c = q - (w * q).sum(-2, keepdim=True)
    k_c = k - (w * k).sum(-2, keepdim=True)
    m = k_c.transpose(-2, -1) @ q_c
    r = polar_newton_schulz(m, polar_iters) if solver == "polar" else polar_svd(m)
    logits = (q * scale) @ (k @ r).transpose(-2, -1)
    if use_kk:
        logits = logits + alpha_kk * (k_c @ k_c.transpose(-2, -1)) * scale
    return logits.softmax(-1)


PEARL_KNOBS = [
    Knob("alpha_kk", "float", ALPHA_KK, "weight of the centred k-k term (0.3 on ADE20K, "
         "Cityscapes)"),
    Knob("solver", "choice", "polar", "the rotation: Newton–Schulz (official) or an exact "
         "SVD", choices=("polar", "svd")),
    Knob("polar_iters", "int", POLAR_ITERS, "Newton–Schulz steps", low=1),
    Knob("use_kk", "bool", True, "add the centred k-k term"),
]


@register_attention("pearl", residual=False, ffn=False, knobs=PEARL_KNOBS)
def pearl(x: AttentionInputs, alpha_kk: float = ALPHA_KK, solver: str = "polar",
          polar_iters: int = POLAR_ITERS, use_kk: bool = True) -> Tensor:
    """PEARL: Procrustes-aligned q-k attention (+ centred k-k), no residual, no FFN."""
    prefix = x.q.shape[2] - x.grid[0] * x.grid[1]
    return pa_attention(x.q, x.k, prefix, alpha_kk, solver, polar_iters, use_kk).to(x.q.dtype)
