"""SFP (ICCV 2025; github.com/Kimsure/SFP @ 2804f5b, ``SFP_ICCV/``), SC-CLIP's sibling.

Transcribed from ``clip/model.py`` (``VisionTransformer.forward`` L242–356, ``custom_attn``
L358–378, ``sinkhorn_attn`` L380–394, ``mean_interpolation`` L416–441,
``adaptively_aggregate`` L443–446) with the constants of L232–235 and
``configs/base_config.py`` (``pm='SOM'``, ``res_cls=0.3``). The code was rewritten twice
after publication; this is its state at HEAD (the computation of ``d75e932``, 2026-03-09),
see docs/protocol.md §18. Per window, ``h_l`` the vanilla stream after block l, D blocks,
P the patch tokens, A_{D−1} block D−1's vanilla attention::

    O  = SOM outliers: with c_j = 1.5·mean_heads A_{D−1}[CLS, j] and s_j = its A[j, j],
         the 10 largest c_j among those with c_j > s_j                      L264, L269–287
    X  = repair(h_{D−1}[P], O)        each outlier := mean of its non-outlier 8-neighbours
    M  = cos(repair(h_9[P], O)) · [≥ 0.4]        thresholded in place          L319–325
    X  = rownorm(M) X                                                          L326
    y  = out_proj(A v) + 0.3·h_{D−1}[CLS],  q, k, v from LN1(X), no residual, no MLP
         A = ⅓[softmax(k kᵀ/√d_h) + softmax(q qᵀ/√d_h) + softmax(3·(M − mean M), < 0 → −∞)]
    S  = cos(h_4[P]) · [≥ 0.4]                   no repair                     L330–333
    y  = rownorm(S) y                                                          L334
    r  = Σ_{l=4..10} h_l                         CLS included                  L318
    y += rownorm(S) (out_proj(softmax(3·(M − mean M)) v') + 0.3·r[CLS]),
         v' from LN1(r[P]), the similarity term alone shared by the heads      L336–341

read out by ``ln_post`` and ``proj`` over the hw patches. M's mean includes the zeros of
its threshold. The 1.5 is ``res_cls · res_scale`` (0.3·5, L264), applied in place to the
stored maps' CLS rows (the stream is unchanged). ``detector=l2`` takes the 10 patches of
h_{D−1} of largest norm (L288–298), ``detector=lof`` SC-CLIP's LOF (L299–307).

Where the lab differs, on purpose (as for SC-CLIP, ``attention/scclip.py``): outlier
positions are ``(i // w, i % w)`` on any grid (the official divides by the number of rows,
right only on square windows); similarities, repairs and aggregations run in fp32 (the
official runs in fp16); every statistic is per window (the official runs one at a time).
Block D−1's map is recomputed from h_{D−2} with that block's own weights (the vanilla map
the trunk computed, bit for bit), because the block depends on the tower's depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from sclip_lab.attention.core import (
    AttentionInputs,
    attention_qkv,
    merge_heads,
    register_attention,
    softmax_attention,
)
from sclip_lab.attention.scclip import (
    BETA,
    CONTAMINATION,
    LOF_K,
    MULTI_LAYERS,
    POST_LAYER,
    PRE_LAYER,
    RES_CLS,
    SIM_SCALE,
    aggregate,
    check_scclip,
    cosine,
    layer_knob,
    lof_outliers,
    path_block,
    repair,
)
from sclip_lab.attention.surgery import stream, vanilla_cls
from sclip_lab.knobs import Knob

RES_SCALE = 5.0  # self.res_scale, L233: the CLS rows of the stored maps are × res_cls·5
OUTLIERS = 10  # order_idx[:10] (SOM), norm_order[:10] (L2)
DETECTORS = ("som", "l2", "lof")


def som_outliers(attn: Tensor, count: int, cls_weight: float) -> Tensor:
    """``(B, hw)`` bool: SOM's outliers of a block's per-head map ``(B, heads, N, N)``
    (CLS first): the ``count`` largest ``cls_weight · Ā[CLS, j]`` among the patches where it
    exceeds ``Ā[j, j]``, Ā the mean over heads."""
    mean = attn.float().mean(1)
    cls_row = mean[:, 0, 1:] * cls_weight
    own = mean[:, 1:, 1:].diagonal(dim1=-2, dim2=-1)
    score = cls_row.masked_fill(~(cls_row > own), float("-inf"))
    top = score.topk(min(count, score.shape[1]), dim=-1)
    picked = torch.zeros_like(score, dtype=torch.bool)
    return picked.scatter_(1, top.indices, top.values > float("-inf"))


def norm_outliers(patches: Tensor, count: int) -> Tensor:
    """``(B, hw)`` bool: the ``count`` patches of largest L2 norm (``pm='L2'``)."""
    top = patches.float().norm(dim=-1).topk(min(count, patches.shape[1]), dim=-1).indices
    return torch.zeros(patches.shape[:2], dtype=torch.bool,
                       device=patches.device).scatter_(1, top, True)


def block_map(x: AttentionInputs, layer: int) -> Tensor:
    """``(B, heads, N, N)`` block ``layer``'s vanilla attention on ``h_{layer−1}``."""
    block = x.blocks[layer - 1]
    q, k, _ = attention_qkv(block, block.ln_1(stream(x, layer - 1)))
    return softmax_attention(q, k)


def outliers_of(x: AttentionInputs, detector: str, outliers: int, res_cls: float,
                res_scale: float, lof_k: int, contamination: float) -> Tensor:
    depth = len(x.blocks)
    if detector == "som":
        return som_outliers(block_map(x, depth - 1), outliers, res_cls * res_scale)
    if detector == "l2":
        return norm_outliers(x.x[:, 1:], outliers)
    return lof_outliers(x.x[:, 1:].float(), lof_k, contamination)


def thresholded(sim: Tensor, beta: float) -> Tensor:
    """``sim`` with entries below β set to 0 (the official's in-place ``sim[sim < β] = 0``)."""
    return sim.masked_fill(sim < beta, 0.0)


def similarity_softmax(m: Tensor, sim_scale: float) -> Tensor:
    """``(B, 1, n, n)`` softmax(s·(M − mean M)) with negative entries at −∞, per window."""
    s = sim_scale * (m - m.mean((-2, -1), keepdim=True))
    return s.masked_fill(s < 0, float("-inf")).softmax(-1).unsqueeze(1)


def sfp_attention(q: Tensor, k: Tensor, m: Tensor, sim_scale: float) -> Tensor:
    """``(B, heads, n, n)`` ⅓[softmax(k kᵀ/√d_h) + softmax(q qᵀ/√d_h) + softmax(similarity)]
    over the patch tokens (``custom_attn``), fp32."""
    scale = q.shape[-1] ** 0.5
    kk = ((k @ k.transpose(-2, -1)).float() / scale).softmax(-1)
    qq = ((q @ q.transpose(-2, -1)).float() / scale).softmax(-1)
    return (kk + qq + similarity_softmax(m, sim_scale)) / 3


def sfp_path(x: AttentionInputs, detector: str = "som", outliers: int = OUTLIERS,
             res_cls: float = RES_CLS, res_scale: float = RES_SCALE, lof_k: int = LOF_K,
             contamination: float = CONTAMINATION, pre_layer: int = PRE_LAYER,
             post_layer: int = POST_LAYER, multi_start: int = MULTI_LAYERS[0],
             multi_end: int = MULTI_LAYERS[1], beta: float = BETA,
             sim_scale: float = SIM_SCALE) -> tuple[Tensor, Tensor]:
    """``(patch tokens (B, hw, D), main-pass attention (B, heads, hw, hw))``."""
    block = x.blocks[-1]
    cls = x.x[:, :1]
    bad = outliers_of(x, detector, outliers, res_cls, res_scale, lof_k, contamination)
    m = thresholded(cosine(repair(stream(x, pre_layer)[:, 1:].float(), bad, x.grid)), beta)
    patches = aggregate(repair(x.x[:, 1:].float(), bad, x.grid), m, beta).to(cls.dtype)
    q, k, v = attention_qkv(block, block.ln_1(patches))
    a = sfp_attention(q, k, m, sim_scale)
    o = block.attn.out_proj(merge_heads(a.to(v.dtype) @ v))
    y = path_block(x, block, patches, o) + res_cls * cls
    post = thresholded(cosine(stream(x, post_layer)[:, 1:]), beta)
    y = aggregate(y, post, beta)
    r = torch.stack([stream(x, layer) for layer in range(multi_start, multi_end + 1)]).sum(0)
    rp = r[:, 1:]
    _, _, v2 = attention_qkv(block, block.ln_1(rp))
    o2 = block.attn.out_proj(merge_heads(similarity_softmax(m, sim_scale).to(v2.dtype) @ v2))
    y2 = path_block(x, block, rp, o2) + res_cls * r[:, :1]
    return y + aggregate(y2, post, beta), a


def sfp_layers(knobs: Mapping, depth: int) -> tuple[int, ...]:
    """The hidden states it reads: h_pre, h_post, h_start..h_end, and h_{D−2} for SOM's
    map of block D−1 (h_{D−1}, the block input, comes anyway)."""
    layers = {knobs["pre_layer"], knobs["post_layer"],
              *range(knobs["multi_start"], knobs["multi_end"] + 1)}
    if knobs["detector"] == "som":
        layers.add(depth - 2)
    return tuple(sorted(layers - {depth - 1}))


SFP_KNOBS = [
    Knob("detector", "choice", "som", "outlier detector: SOM on block D−1's CLS row "
         "(official default), the largest norms, or SC-CLIP's LOF", choices=DETECTORS),
    Knob("outliers", "int", OUTLIERS, "outliers taken by som and l2", low=0),
    Knob("res_cls", "float", RES_CLS, "weight of the CLS token added to every patch"),
    Knob("res_scale", "float", RES_SCALE, "SOM's CLS row is × res_cls·res_scale"),
    Knob("lof_k", "int", LOF_K, "LOF neighbours (detector=lof)", low=1),
    Knob("contamination", "float", CONTAMINATION, "LOF's share of outliers (detector=lof)",
         low=0, high=1),
    layer_knob("pre_layer", PRE_LAYER, "block whose repaired patches give M"),
    layer_knob("post_layer", POST_LAYER, "block whose patches give the post-aggregation"),
    layer_knob("multi_start", MULTI_LAYERS[0], "first block summed for the second pass"),
    layer_knob("multi_end", MULTI_LAYERS[1], "last block summed (inclusive)"),
    Knob("beta", "float", BETA, "threshold of M and S", low=-1, high=1),
    Knob("sim_scale", "float", SIM_SCALE, "scale of M − mean M before its softmax", above=0),
]


def sfp_maps(x: AttentionInputs, **knobs) -> Tensor:
    """The main pass's attention over the patches, a zero CLS row and column (figures)."""
    return F.pad(sfp_path(x, **knobs)[1], (1, 0, 1, 0))


@register_attention("sfp", output="tokens", residual=False, ffn=False, knobs=SFP_KNOBS,
                    hidden=sfp_layers, prepare=partial(check_scclip, name="sfp"), maps=sfp_maps,
                    requires=("cls", "blocks", "hidden"))
def sfp(x: AttentionInputs, **knobs) -> Tensor:
    """SFP: SOM outlier repair, three-term last block, pre/post aggregation, 2nd pass."""
    y, _ = sfp_path(x, **knobs)
    return torch.cat([vanilla_cls(x).to(y.dtype), y], dim=1)
