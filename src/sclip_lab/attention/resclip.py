"""ResCLIP on NACLIP's last block: RCS (Residual Cross-correlation Self-attention) and SFR
(Semantic Feedback Refinement), each switchable.

Transcribed from the official code, github.com/yvhangyang/ResCLIP @ 0e085f7
(``clip/model.py``, ``resclip_segmentor.py``, ``configs/cfg_*.py``)::

    A_c = mean_{l = s..e} softmax(q_l k_lᵀ / 8)            # per head, CLS row/column kept
    L   = k kᵀ / 8
    L   = τ_s · [(1 − λ_s) · L + λ_s · Â_sfr]               # sfr: Â_sfr from a first pass
    A   = softmax(L + G_σ)                                 # attn_strategy 'resclip' ≡ 'naclip'
    A'  = τ_rcs · [(1 − λ_rcs) · A + λ_rcs · A_c]          # rcs: rows sum to τ_rcs (2.0)
    o   = out_proj(A' v), no residual, no MLP              # arch 'wo_resi'

* ``VisionTransformer.forward`` runs blocks 1…11 through ``custom_attn(with_attn=True)``,
  which is vanilla attention computed explicitly (the trunk is unchanged), keeps each
  block's per-head map and averages blocks 6–9 (list indices 5..8, hard-coded for every
  backbone). Here the range is the knobs ``rcs_start``/``rcs_end`` (1-indexed, inclusive),
  borrowed from the trunk through ``borrows=``.
* ``custom_attn``'s ``resclip`` and ``naclip`` branches are identical: k-k logits scaled by
  d_h^-1/2, the SFR blend (when on), NACLIP's Gaussian ω (σ = ``gaussian_std`` = 5, zero
  CLS row/column), a softmax, then the RCS blend with ``attn_rcs_weights = [τ, λ]``.
* The RCS blend comes after the softmax, so the rows of A' sum to τ_rcs; ``out_proj`` has
  a bias, so τ is not a neutral scale. τ = 2.0 on every benchmark; λ is per benchmark
  (``conf/attention/resclip.yaml``).
* SFR (below) runs the final block once with RCS and without SFR, classifies the window
  against every text query (PAMR on the window, softmax(s·), s the segmentor's logit
  scale: ``resclip_segmentor.py`` L75 passes ``logit_scale=self.logit_scale``, 40 in every
  cfg_*.py; here the segmenter's, ``AttentionInputs.logit_scale``: 40 under
  ``protocol=resclip``, the dataset's under SCLIP's, e.g. 65 on VOC21; 40 for callers
  that pass none), turns the patch labels into
  A_sfr and blends A_sfr / max A_sfr into the k-k logits *before* ω and the softmax, with
  ``attn_sfr_weights = [τ_s, λ_s]`` and ``temp_thd`` per benchmark. It reads
  ``AttentionInputs.queries``/``images``/``features``; a caller without them (attention
  figures, ``DenseEncoder.head``/``pooled``) gets a ``ConfigError`` naming
  ``attention.sfr=false`` rather than a silent RCS-only map.
* The official code cannot switch RCS or SFR off: ``self.use_rcs=use_rcs,`` and
  ``self.use_sfr=use_sfr,`` (``resclip_segmentor.py`` L61–62) have trailing commas, so
  both become 1-tuples, which are always true. Here ``rcs`` and ``sfr`` are real switches
  (the paper's ablation rows): rcs=false sfr=false is NACLIP exactly; sfr with λ_s = 0,
  τ_s = 1 is RCS alone.

SFR, from ``clip/model.py``, per window (the official code runs one crop at a time)::

    pass 1   tokens = block(A_rcs)                     # the final block, RCS on, SFR off
             logits = cos(features(tokens)[patches], queries)      # (Q, h, w), every query
             logits = PAMR_10,(8,16)(crop, bilinear(logits, crop size))     # create_logit_temp
             P      = softmax(s · logits) over the queries, s the logit scale
    labels   ℓ(pixel) = argmax_q P, 0 where max_q P < temp_thd; ℓ(patch) = mode over its
             p×p pixels                                            # create_patch_matrix
    A_sfr    M_ij = [ℓ_i = ℓ_j] (diagonal 1); delete_same_entity: M_ij ·= exp(−s_ij / s_max)
             where the sampled grid path from i to j leaves ℓ_i    # check_path
             each row of M convolved with a normalised 1-D Gaussian (σ, kernel min(hw, 6σ+1)
             made odd, zero padding) over the row-major flattened index; ReLU; rows / (Σ+1e-8);
             zero CLS row/column                                   # generate_attention_sfr
    pass 2   L = τ_s · [(1 − λ_s) · k kᵀ/8 + λ_s · A_sfr / max A_sfr] + ω_σ;  softmax; RCS

Code-level details kept because the numbers depend on them:

* ``check_path`` samples every pair's segment at ``t = linspace(0, 1, s_max + 1)`` with one
  ``s_max`` for the whole grid (the largest Chebyshev distance, ``max(h, w) − 1``) and keeps
  only the first ``s_ij + 1`` samples, so a pair ``s_ij`` steps apart is checked over the
  first ``s_ij / s_max`` of its segment, not the whole segment. The sample points are
  ``round(start·(1 − t) + end·t)`` in fp32, round-half-to-even.
* The decay divides by that same ``s_max``; pairs whose labels differ stay 0 either way.
* The 1-D Gaussian runs along the flattened patch index, so it crosses grid rows.
* Label 0 doubles as "unsure" and as query 0.
* The official block runs in fp16 and casts A_sfr/max to fp16; here everything is fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sclip_lab import refine
from sclip_lab.attention.core import (
    HEAD_TEMPERATURE,
    AttentionInputs,
    around,
    gaussian_grid_bias,
    grid_coords,
    merge_heads,
    register_attention,
    score_attention,
)
from sclip_lab.errors import ConfigError
from sclip_lab.knobs import TRUNK_DEPTH, BindContext, Knob

RCS_LAYERS = (6, 9)  # blocks 6..9 (resclip's attn_map[5:9])
RCS_TAU = 2.0  # configs/cfg_*.py attn_rcs_weights[0], every benchmark
RCS_LAMBDA = 0.3  # attn_rcs_weights[1] of VOC21, Context60, ADE20K (conf/attention/resclip.yaml)
# Without a dataset (tests, benchmarks) SFR takes ADE20K's set, as λ_rcs does:
# cfg_ade20k.py L6–9 temp_thd=0.25, attn_sfr_weights=[2.1, 0.7]; per benchmark in the yaml.
SFR_TAU, SFR_LAMBDA, SFR_TEMP_THD = 2.1, 0.7, 0.25
SFR_PAMR_STEPS, SFR_PAMR_DILATIONS = 10, (8, 16)  # create_logit_temp: PAMR(10, (8, 16))
# resclip_segmentor.py's default logit_scale=40 (no cfg_*.py overrides it): SFR's scale
# when the caller passes none (AttentionInputs.logit_scale), e.g. DenseEncoder.logits alone
SFR_LOGIT_SCALE = 40.0
PATH_CHUNK = 64  # start patches per step when building a grid's path table


def rcs_layers(knobs: Mapping) -> tuple[int, ...]:
    """The borrowed blocks ``rcs_start..rcs_end`` (none with rcs=false; empty when the range
    is reversed, which ``check_resclip`` then refuses)."""
    if not knobs.get("rcs", True):
        return ()
    return tuple(range(knobs["rcs_start"], knobs["rcs_end"] + 1))


def check_resclip(knobs: dict, ctx: BindContext) -> dict:
    """Cross-knob rules: the RCS block range runs forwards, temp_thd < 1 (a threshold of 1
    would label every pixel 0), PAMR dilations are whole pixels."""
    where = "attention=resclip"
    if knobs["rcs"] and knobs["rcs_start"] > knobs["rcs_end"]:
        raise ConfigError(f"{where}: rcs_start={knobs['rcs_start']} > rcs_end="
                          f"{knobs['rcs_end']}; give a range of blocks start ≤ end "
                          "(ResCLIP averages blocks 6..9)")
    if knobs["temp_thd"] >= 1:
        raise ConfigError(f"{where}: temp_thd={knobs['temp_thd']} is out of range: temp_thd "
                          "must be a number ≥ 0 < 1 (0.1–0.5 in ResCLIP's configs)")
    dilations = knobs["sfr_pamr_dilations"]
    dilations = (dilations,) if isinstance(dilations, (int, float)) else dilations
    if any(d != int(d) for d in dilations):
        raise ConfigError(f"{where}: sfr_pamr_dilations={list(dilations)} must be whole "
                          "pixels, e.g. [8, 16]")
    return {**knobs, "sfr_pamr_dilations": tuple(int(d) for d in dilations)}


def rcs_blend(attention: Tensor, borrowed: Tensor, lambda_rcs: float, tau_rcs: float
              ) -> Tensor:
    """``τ · [(1 − λ) · A + λ · A_c]`` in fp32, returned in A's dtype."""
    out = tau_rcs * ((1 - lambda_rcs) * attention.float() + lambda_rcs * borrowed.float())
    return out.to(attention.dtype)


def mean_early(x: AttentionInputs, layers: tuple[int, ...]) -> Tensor:
    """``(B, heads, N, N)``: the mean of the borrowed vanilla maps of ``layers``."""
    return torch.stack([x.early[layer].float() for layer in layers]).mean(0)


RCS_KNOBS = [
    Knob("sigma", "float", 5.0, "NACLIP Gaussian σ in patches (gaussian_std)", above=0),
    Knob("lambda_rcs", "float", RCS_LAMBDA, "weight of the mid-layer maps in the blend",
         low=0, high=1),
    Knob("tau_rcs", "float", RCS_TAU, "scale of the blended map (its row sum)", above=0),
    Knob("rcs_start", "int", RCS_LAYERS[0], "first borrowed block, 1..depth−1", low=1,
         high=TRUNK_DEPTH),
    Knob("rcs_end", "int", RCS_LAYERS[1], "last borrowed block (inclusive), 1..depth−1",
         low=1, high=TRUNK_DEPTH),
    Knob("rcs", "bool", True, "RCS on (off: no mid-layer blend)"),
]
SFR_KNOBS = [
    Knob("sfr", "bool", True, "SFR on: two-pass last block fed back by its own text labels"),
    Knob("lambda_sfr", "float", SFR_LAMBDA, "weight of A_sfr in the k-k logits", low=0,
         high=1),
    Knob("tau_sfr", "float", SFR_TAU, "scale of the SFR-blended logits", above=0),
    Knob("temp_thd", "float", SFR_TEMP_THD, "pass-1 probability below which a pixel is "
         "labelled 0 (< 1)", low=0, high=1),
    Knob("sfr_pamr_steps", "int", SFR_PAMR_STEPS, "PAMR iterations on the pass-1 logits",
         low=0),
    Knob("sfr_pamr_dilations", "floats", SFR_PAMR_DILATIONS, "their PAMR dilations (pixels)",
         low=1),
    Knob("sfr_sigma", "float", 5.0, "σ of A_sfr's 1-D row Gaussian (gaussian_std)", above=0),
    Knob("delete_same_entity", "bool", True, "decay same-label pairs whose grid path leaves "
         "the label"),
]


# ------------------------------------------------------------------------------- SFR


def block_output(x: AttentionInputs, attention: Tensor) -> Tensor:
    """``(B, N, D)``: the last block's output under ``attention`` with the bound block knobs
    (``x.block``: residual, ffn, alpha), as ``DenseEncoder.last_block`` computes it."""
    block = x.blocks[-1]
    out = block.attn.out_proj(merge_heads(attention.to(x.v.dtype) @ x.v))
    return around(block, x.x, out, x.block.get("residual", False), x.block.get("ffn", False),
                  x.block.get("alpha", 1.0))


def patch_size(x: AttentionInputs) -> int:
    """The tower's patch side: the encoder's own when ``features`` is its bound method,
    else the largest p with (h·p, w·p) inside the window (the same for every window whose
    leftover pixels are fewer than its patches per side)."""
    patch = getattr(getattr(x.features, "__self__", None), "patch", None)
    if isinstance(patch, int):
        return patch
    (h, w), (H, W) = x.grid, x.images.shape[-2:]
    return min(H // h, W // w)


def feedback_probabilities(x: AttentionInputs, attention: Tensor, pamr_steps: int,
                           dilations: Sequence[int]) -> Tensor:
    """``(B, Q, H, W)``: pass 1 read out against every query, bilinear to the window, PAMR
    guided by the window pixels, then softmax(s · logits) over the queries, s the
    segmenter's logit scale (``SFR_LOGIT_SCALE`` when the caller passes none)."""
    feats = x.features(block_output(x, attention))[:, 1:]  # (B, h·w, E) unit rows
    B, (h, w) = feats.shape[0], x.grid
    logits = (feats @ x.queries.float().T).transpose(1, 2).reshape(B, -1, h, w)
    size = tuple(x.images.shape[-2:])
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if pamr_steps > 0:
        logits = torch.stack([refine.pamr(img.float(), lg, pamr_steps, dilations)
                              for img, lg in zip(x.images, logits)])
    scale = SFR_LOGIT_SCALE if x.logit_scale is None else x.logit_scale
    return (logits * scale).softmax(1)


def patch_labels(probs: Tensor, grid: tuple[int, int], patch: int, temp_thd: float
                 ) -> Tensor:
    """``(B, h, w)`` long: per pixel the most probable query (0 where its probability is
    below ``temp_thd``), then per patch the mode of its p×p pixels (pixels past the last
    whole patch are dropped, as ``unfold`` does)."""
    labels = probs.argmax(1)
    labels[probs.amax(1) < temp_thd] = 0
    (h, w), B = grid, probs.shape[0]
    tiles = labels[:, :h * patch, :w * patch].reshape(B, h, patch, w, patch)
    return tiles.permute(0, 1, 3, 2, 4).reshape(B, h, w, patch * patch).mode(-1).values


@functools.lru_cache(maxsize=8)
def path_table(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For the grid ``h×w``: ``(hw, hw, s_max+1)`` int32 flat indices of the patches
    ``check_path`` samples from i towards j (samples past the pair's own step count point
    back at i, so they always pass), and ``(hw, hw)`` the decay exp(−s_ij / s_max)."""
    pos = grid_coords((h, w), device)  # (hw, 2) row, col
    steps = (pos[:, None] - pos[None]).abs().amax(-1)  # (hw, hw) Chebyshev
    s_max = max(h, w) - 1
    t = torch.linspace(0, 1, s_max + 1, device=device)[None, None, :, None]
    k = torch.arange(s_max + 1, device=device)
    rows = []
    for i0 in range(0, h * w, PATH_CHUNK):
        start = pos[i0:i0 + PATH_CHUNK, None, None, :].float()
        pts = (start * (1 - t) + pos[None, :, None, :].float() * t).round().long()
        flat = pts[..., 0] * w + pts[..., 1]  # (chunk, hw, s_max+1)
        own = torch.arange(i0, i0 + start.shape[0], device=device)[:, None, None]
        flat = torch.where(k <= steps[i0:i0 + start.shape[0], :, None], flat, own)
        rows.append(flat.to(torch.int32))
    decay = torch.exp(-steps / s_max) if s_max else torch.ones_like(steps, dtype=torch.float)
    return torch.cat(rows), decay


def row_gaussian(n: int, sigma: float, device: torch.device) -> Tensor:
    """``(1, 1, k)`` the normalised 1-D Gaussian, k = min(n, int(6σ + 1)) made odd."""
    size = min(n, int(6 * sigma + 1))
    size += 1 - size % 2
    x = torch.arange(size, device=device) - size // 2
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (kernel / kernel.sum()).view(1, 1, -1)


def sfr_matrix(labels: Tensor, sigma: float, delete_same_entity: bool = True) -> Tensor:
    """``(B, N, N)`` A_sfr / max A_sfr of patch labels ``(B, h, w)`` (zero CLS row/column)."""
    B, h, w = labels.shape
    flat = labels.reshape(B, h * w)
    same = (flat[:, :, None] == flat[:, None, :]).float()
    same.diagonal(dim1=1, dim2=2).fill_(1)
    if delete_same_entity:
        idx, decay = path_table(h, w, labels.device)
        for b in range(B):  # one window at a time: (hw, hw, s_max+1) samples each
            lab = flat[b].to(torch.int32)
            valid = (lab[idx] == lab[:, None, None]).all(-1)
            same[b] = torch.where(valid, same[b], same[b] * decay)
    kernel = row_gaussian(h * w, sigma, labels.device)
    blurred = F.conv1d(same.reshape(B * h * w, 1, h * w), kernel,
                       padding=kernel.shape[-1] // 2).reshape(B, h * w, h * w).relu()
    blurred = blurred / (blurred.sum(-1, keepdim=True) + 1e-8)
    out = F.pad(blurred, (1, 0, 1, 0))
    return out / out.amax(dim=(1, 2), keepdim=True)


def refined_attention(x: AttentionInputs, a_sfr: Tensor, sigma: float, tau_sfr: float,
                      lambda_sfr: float) -> Tensor:
    """``(B, heads, N, N)`` softmax(τ_s[(1 − λ_s)·k kᵀ/8 + λ_s·Â_sfr] + ω_σ) (fp32 inside)."""
    scores = (x.k @ x.k.transpose(-2, -1)).float()
    scores = scores / HEAD_TEMPERATURE
    scores = tau_sfr * ((1 - lambda_sfr) * scores + lambda_sfr * a_sfr[:, None].float())
    scores = scores + gaussian_grid_bias(x.grid, sigma, x.k.device)
    return scores.softmax(-1).to(x.k.dtype)


def feedback(x: AttentionInputs, first_pass: Tensor, *, temp_thd: float, pamr_steps: int,
             dilations: Sequence[int], sigma: float, delete_same_entity: bool
             ) -> Tensor:
    """``(B, N, N)`` Â_sfr of every window, from the pass-1 attention ``first_pass``."""
    probs = feedback_probabilities(x, first_pass, pamr_steps, dilations)
    labels = patch_labels(probs, x.grid, patch_size(x), temp_thd)
    return sfr_matrix(labels, sigma, delete_same_entity)


# -------------------------------------------------------------------------- variant


@register_attention("resclip", residual=False, ffn=False, knobs=RCS_KNOBS + SFR_KNOBS,
                    borrows=rcs_layers, prepare=check_resclip, requires=("cls", "blocks"))
def resclip(x: AttentionInputs, sigma: float = 5.0, lambda_rcs: float = RCS_LAMBDA,
            tau_rcs: float = RCS_TAU, rcs_start: int = RCS_LAYERS[0],
            rcs_end: int = RCS_LAYERS[1], rcs: bool = True, sfr: bool = True,
            lambda_sfr: float = SFR_LAMBDA, tau_sfr: float = SFR_TAU,
            temp_thd: float = SFR_TEMP_THD, sfr_pamr_steps: int = SFR_PAMR_STEPS,
            sfr_pamr_dilations: tuple[int, ...] = SFR_PAMR_DILATIONS, sfr_sigma: float = 5.0,
            delete_same_entity: bool = True) -> Tensor:
    """ResCLIP: softmax(τ_s[(1−λ_s)k kᵀ/8 + λ_s·Â_sfr] + G_σ), then RCS τ[(1−λ)A + λ·A_c]."""
    borrowed = mean_early(x, tuple(range(rcs_start, rcs_end + 1))) if rcs else None

    def with_rcs(attention: Tensor) -> Tensor:
        return rcs_blend(attention, borrowed, lambda_rcs, tau_rcs) if rcs else attention

    first = with_rcs(score_attention(x, ("kk",), sigma=sigma))
    if not sfr:
        return first
    if x.queries is None or x.images is None or x.features is None:
        raise ConfigError("attention=resclip with sfr=true classifies each window against "
                          "the text queries, and this caller passes no queries or pixels "
                          "(e.g. attention figures); set attention.sfr=false for RCS alone")
    a_sfr = feedback(x, first, temp_thd=temp_thd, pamr_steps=sfr_pamr_steps,
                     dilations=sfr_pamr_dilations, sigma=sfr_sigma,
                     delete_same_entity=delete_same_entity)
    return with_rcs(refined_attention(x, a_sfr, sigma, tau_sfr, lambda_sfr))
