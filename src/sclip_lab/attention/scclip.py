"""SC-CLIP, Self-Calibrated CLIP (arXiv 2411.15869; github.com/SuleBai/SC-CLIP @ 0417ba9).

Transcribed from ``clip/model.py`` (``VisionTransformer.forward`` L254–316, ``lof_pytorch``
L208–227, ``custom_attn`` L318–341, ``adaptively_aggregate`` L343–346,
``mean_interpolation`` L348–373), with its constants (L247–252, ``configs/base_config.py``).
Per window, with ``h_l`` the vanilla stream after block l, D blocks, P = patch tokens::

    O  = LOF outliers of h_{D−1}[P] (k = 30, contamination 0.05)            L272–274
    X  = repair(h_{D−1}[P], O)        each outlier := mean of its non-outlier 8-neighbours
    M  = cos(repair(h_9[P], O))                        hw×hw, the same outliers   L280–286
    X  = rownorm(M·[M ≥ β]) X                          pre-aggregation, β = 0.4   L287
    y  = out_proj(A v) + 0.3·h_{D−1}[CLS],  k, v from LN1(X), no residual, no MLP L291
         A = ½[softmax(3·(M − mean M) masked < 0 → −∞) + softmax(k kᵀ/√d_h)]     L329–335
    S  = cos(h_4[P]) · [≥ β]                           no repair                 L293–296
    y  = rownorm(S) y                                  post-aggregation          L297
    r  = Σ_{l=4..10} h_l                               CLS included              L299–302
    y += rownorm(S) (out_proj(A' v') + 0.3·r[CLS]),  A' with the same M, k', v' from LN1(r[P])

The CLS token takes no part in the last block (the official drops it from the block input
and re-adds 0.3·CLS to every patch; here its key is masked, which is the same for the patch
rows) and the method returns the hw patch tokens only (``return_all``), read out by
``ln_post`` and ``proj``. Here the CLS slot of the output, which the lab's readout drops,
holds the vanilla last block's CLS output (CLIP's own image embedding, for ``pooled``).

Where the lab differs, on purpose:

* **Non-square grids.** The official outlier position is ``(i // feat_w, i % feat_w)``
  with ``feat_w`` the number of *rows* (L275): right only when rows = columns (every
  224 window). Here it is ``(i // w, i % w)`` on any grid.
* **Self in the k-NN.** The official takes the k + 1 nearest and drops the first, assuming
  it is the point itself; here the point is excluded explicitly (the same unless two tokens
  are identical, where the official order is a tie).
* **Precision.** LOF, repair, similarities and aggregations run in fp32 (the official runs
  everything in the fp16 of ``clip.load``, where a squared distance above 65504 is inf).
* **Batches.** Every statistic (the LOF quantile, mean M) is per window; the official
  code only runs one window at a time (``squeeze(1)``).

Kept, as the official computes it: the LOF reach distance max(d_ij, kdist_i) uses the
point's *own* k-distance (so LRD_i = k/kdist_i; ``lof_reach=neighbour`` is the textbook
kdist_j, an ablation); distances are squared Euclidean; outliers are LOF > the
(1 − contamination) quantile; the 1e-6 in the row normalisation. ``scclip_attention`` is
the attention term alone on the lab's usual last block (METHODS' partial recipe).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from sclip_lab.attention.core import (
    AttentionInputs,
    around,
    attention_qkv,
    grid_coords,
    merge_heads,
    register_attention,
)
from sclip_lab.attention.surgery import stream, vanilla_cls
from sclip_lab.errors import ConfigError
from sclip_lab.knobs import TRUNK_DEPTH, BindContext, Knob

LOF_K, CONTAMINATION = 30, 0.05  # L274 lof_pytorch(..., n_neighbors=30, contamination=0.05)
PRE_LAYER = 9  # pre_adjust_idx = 8 (L248): feats_list[8] = h_9
POST_LAYER = 4  # post_adjust_idx = 3 (L249): h_4
MULTI_LAYERS = (4, 10)  # multi_start_idx = 3, multi_end_idx = 10 (L250–251): h_4..h_10
RES_CLS = 0.3  # L252
BETA = 0.4  # L247, both thresholds
SIM_SCALE = 3.0  # L329
ROW_EPS = 1e-6  # L344


# ------------------------------------------------------------------ anomaly tokens


def lof_outliers(p: Tensor, k: int, contamination: float, reach: str = "own") -> Tensor:
    """``(B, n)`` bool: the LOF outliers among the rows of ``p`` ``(B, n, C)``, per window.

    Squared Euclidean distances (‖a‖² + ‖b‖² − 2a·b, fp32), the k nearest others;
    reach_ij = max(d_ij, kdist) with the point's own k-distance (``own``, L213–214) or the
    neighbour's (``neighbour``);
    LRD = k / mean reach; LOF_i = mean_j LRD_j / LRD_i; outliers: LOF > its (1 − c) quantile.
    """
    n = p.shape[1]
    if n < k + 1:
        raise ConfigError(f"attention.lof_k={k} needs more than {k} patches per window; "
                          f"this window has {n}: lower attention.lof_k")
    sq = (p * p).sum(-1)
    d = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * p @ p.transpose(-2, -1)).clamp(min=0)
    d = d.masked_fill(torch.eye(n, dtype=torch.bool, device=p.device), float("inf"))
    knn_d, knn = d.topk(k, dim=-1, largest=False)  # (B, n, k), ascending
    kdist = knn_d[..., -1]  # (B, n)
    other = kdist.unsqueeze(-1) if reach == "own" else torch.gather(
        kdist.unsqueeze(1).expand(-1, n, -1), 2, knn)
    lrd = k / torch.nan_to_num(torch.maximum(knn_d, other).mean(-1), nan=1e-6)
    neighbours = torch.gather(lrd.unsqueeze(1).expand(-1, n, -1), 2, knn)
    lof = (neighbours / lrd.unsqueeze(-1)).mean(-1)
    return lof > torch.quantile(lof, 1 - contamination, dim=-1, keepdim=True)


def repair(p: Tensor, outliers: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, hw, C)``: each outlier replaced by the mean of its in-grid non-outlier
    8-neighbours on the row-major (h, w) grid, kept where it has none
    (``mean_interpolation``'s zero-padded 3×3 convolutions, as one matrix product)."""
    pos = grid_coords(grid, p.device)
    ring = (pos[:, None] - pos[None]).abs().amax(-1) == 1  # (hw, hw) 8-neighbours
    weights = ring.to(p.dtype) * (~outliers).to(p.dtype).unsqueeze(1)  # (B, hw, hw)
    total, count = weights @ p, weights.sum(-1, keepdim=True)
    fix = outliers.unsqueeze(-1) & (count > 0)
    return torch.where(fix, total / count.clamp(min=1), p)


# -------------------------------------------------------------- the last block


def cosine(p: Tensor) -> Tensor:
    """``(B, n, n)`` cosine similarities of the rows of ``p``."""
    u = F.normalize(p.float(), dim=-1)
    return u @ u.transpose(-2, -1)


def aggregate(t: Tensor, sim: Tensor, beta: float) -> Tensor:
    """``rownorm(sim · [sim ≥ β]) t`` in fp32 (``adaptively_aggregate``), in t's dtype."""
    w = sim * (sim >= beta)
    return ((w / (w.sum(-1, keepdim=True) + ROW_EPS)) @ t.float()).to(t.dtype)


def sim_attention(k: Tensor, sim: Tensor, sim_scale: float) -> Tensor:
    """``(B, heads, N, N)`` SC-CLIP's attention with the CLS key masked (tokens CLS first).

    Patch rows: ½[softmax(s·(M − mean M), entries < 0 at −∞) + softmax(k kᵀ/√d_h)] over the
    patch keys (mean over the window's whole hw×hw M, shared by the heads); the CLS row,
    which the official never computes: its k-k term alone. Rows sum to 1, fp32 softmax.
    """
    kp = k[:, :, 1:]
    kk = ((k @ kp.transpose(-2, -1)).float() / k.shape[-1] ** 0.5).softmax(-1)
    m = sim_scale * (sim - sim.mean((-2, -1), keepdim=True))
    m = m.masked_fill(m < 0, float("-inf")).softmax(-1).unsqueeze(1)  # (B, 1, hw, hw)
    kk[:, :, 1:] = (m + kk[:, :, 1:]) / 2
    return F.pad(kk, (1, 0)).to(k.dtype)  # a zero CLS column


def attend(block, tokens: Tensor, sim: Tensor, sim_scale: float) -> tuple[Tensor, Tensor]:
    """``(out_proj(A v), A)`` of ``block`` on ``tokens`` (``custom_attn``, CLS first)."""
    _, k, v = attention_qkv(block, block.ln_1(tokens))
    a = sim_attention(k, sim, sim_scale)
    return block.attn.out_proj(merge_heads(a @ v)), a


def mid_similarity(x: AttentionInputs, pre_layer: int, lof_k: int, contamination: float,
                   lof_reach: str) -> tuple[Tensor, Tensor]:
    """``(outliers (B, hw), M (B, hw, hw))``: the LOF outliers of h_{D−1} and the cosine of
    the repaired h_{pre_layer} patches (L272–286)."""
    outliers = lof_outliers(x.x[:, 1:].float(), lof_k, contamination, lof_reach)
    mid = repair(stream(x, pre_layer)[:, 1:].float(), outliers, x.grid)
    return outliers, cosine(mid)


def path_block(x: AttentionInputs, block, tokens: Tensor, o: Tensor) -> Tensor:
    """The block knobs around o (default: o alone, as SC-CLIP): α·o, + input, + MLP."""
    residual, ffn, alpha = (x.block.get(k, d) for k, d in (("residual", False),
                                                           ("ffn", False), ("alpha", 1.0)))
    return around(block, tokens, o, residual, ffn, alpha)


def scclip_path(x: AttentionInputs, lof_k: int = LOF_K, contamination: float = CONTAMINATION,
                lof_reach: str = "own", pre_layer: int = PRE_LAYER,
                post_layer: int = POST_LAYER, multi_start: int = MULTI_LAYERS[0],
                multi_end: int = MULTI_LAYERS[1], beta: float = BETA,
                sim_scale: float = SIM_SCALE, res_cls: float = RES_CLS,
                pre_aggregate: bool = True, post_aggregate: bool = True,
                multi_level: bool = True) -> tuple[Tensor, Tensor]:
    """``(patch tokens (B, hw, D), main-pass attention (B, heads, N, N))``."""
    block = x.blocks[-1]
    cls = x.x[:, :1]
    outliers, sim = mid_similarity(x, pre_layer, lof_k, contamination, lof_reach)
    patches = repair(x.x[:, 1:].float(), outliers, x.grid)
    if pre_aggregate:
        patches = aggregate(patches, sim, beta)
    tokens = torch.cat([cls, patches.to(cls.dtype)], dim=1)
    o, a = attend(block, tokens, sim, sim_scale)
    y = path_block(x, block, tokens, o)[:, 1:] + res_cls * cls
    post = cosine(stream(x, post_layer)[:, 1:]) if post_aggregate else None
    if post is not None:
        y = aggregate(y, post, beta)
    if multi_level:
        r = torch.stack([stream(x, layer) for layer in range(multi_start, multi_end + 1)]
                        ).sum(0)
        o2, _ = attend(block, r, sim, sim_scale)
        y2 = path_block(x, block, r, o2)[:, 1:] + res_cls * r[:, :1]
        y = y + (aggregate(y2, post, beta) if post is not None else y2)
    return y, a


# ------------------------------------------------------------------- registration


def check_scclip(knobs: dict, ctx: BindContext, name: str = "scclip") -> dict:
    """The multi-level range must run forwards."""
    if knobs.get("multi_start", 0) > knobs.get("multi_end", 0):
        raise ConfigError(f"attention={name}: multi_start={knobs['multi_start']} > multi_end="
                          f"{knobs['multi_end']}; give blocks start ≤ end (SC-CLIP and SFP "
                          "sum h_4..h_10)")
    return knobs


def used_layers(knobs: Mapping, depth: int) -> tuple[int, ...]:
    """The trunk hidden states it reads (h_{D−1}, the block input, comes anyway)."""
    layers = {knobs["pre_layer"]}
    if "post_layer" in knobs:
        layers |= {knobs["post_layer"]} if knobs["post_aggregate"] else set()
        if knobs["multi_level"]:
            layers |= set(range(knobs["multi_start"], knobs["multi_end"] + 1))
    return tuple(sorted(layers - {depth - 1}))


def layer_knob(name: str, default: int, doc: str) -> Knob:
    return Knob(name, "int", default, f"{doc}, 1..depth−1", low=1, high=TRUNK_DEPTH)


SIM_KNOBS = [
    Knob("lof_k", "int", LOF_K, "LOF neighbours (n_neighbors)", low=1),
    Knob("contamination", "float", CONTAMINATION, "share of tokens called anomalous "
         "(0 = no repair)", low=0, high=1),
    Knob("lof_reach", "choice", "own", "LOF reach distance: the point's own k-distance "
         "(official) or the neighbour's (textbook)", choices=("own", "neighbour")),
    layer_knob("pre_layer", PRE_LAYER, "block whose repaired patches give M"),
    Knob("sim_scale", "float", SIM_SCALE, "scale of M − mean M before its softmax", above=0),
]
SCCLIP_KNOBS = [
    *SIM_KNOBS,
    layer_knob("post_layer", POST_LAYER, "block whose patches give the post-aggregation"),
    layer_knob("multi_start", MULTI_LAYERS[0], "first block summed for the second pass"),
    layer_knob("multi_end", MULTI_LAYERS[1], "last block summed (inclusive)"),
    Knob("beta", "float", BETA, "threshold of both aggregation similarities", low=-1, high=1),
    Knob("res_cls", "float", RES_CLS, "weight of the CLS token added to every patch"),
    Knob("pre_aggregate", "bool", True, "aggregate the block input by M"),
    Knob("post_aggregate", "bool", True, "aggregate the outputs by the post_layer cosine"),
    Knob("multi_level", "bool", True, "add the second pass on Σ h_start..h_end"),
]


def scclip_maps(x: AttentionInputs, **knobs) -> Tensor:
    """The main pass's attention (figures)."""
    return scclip_path(x, **knobs)[1]


@register_attention("scclip", output="tokens", residual=False, ffn=False,
                    knobs=SCCLIP_KNOBS, hidden=used_layers, prepare=check_scclip,
                    maps=scclip_maps, requires=("cls", "blocks", "hidden"))
def scclip(x: AttentionInputs, **knobs) -> Tensor:
    """SC-CLIP: LOF repair, mid-layer attention, pre/post aggregation, CLS add, 2nd pass."""
    y, _ = scclip_path(x, **knobs)
    return torch.cat([vanilla_cls(x).to(y.dtype), y], dim=1)


@register_attention("scclip_attention", residual=False, ffn=False, knobs=SIM_KNOBS,
                    hidden=used_layers, requires=("cls", "hidden"))
def scclip_attention(x: AttentionInputs, lof_k: int = LOF_K,
                     contamination: float = CONTAMINATION, lof_reach: str = "own",
                     pre_layer: int = PRE_LAYER, sim_scale: float = SIM_SCALE) -> Tensor:
    """SC-CLIP's attention alone: ½[softmax(mid-layer M') + softmax(k kᵀ/8)], CLS key masked."""
    _, sim = mid_similarity(x, pre_layer, lof_k, contamination, lof_reach)
    return sim_attention(x.k, sim, sim_scale)
