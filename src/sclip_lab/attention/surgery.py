"""CLIP Surgery (arXiv 2304.05653; github.com/xmed-lab/CLIP_Surgery @ d4696d4): a v-v
attention path without FFN over the last blocks, and feature surgery on the logits.

Architecture surgery (``clip/clip_surgery_model.py``): the last six blocks (L321 ``for i in
range(1, 7)``) get a second path beside the vanilla one. Both read LN1 of the *vanilla*
stream (``ResidualAttentionBlock.forward`` L253–274); the new path replaces q and k by v
(``Attention.forward`` L81–83, scale d_h^-1/2 L63), adds its output and skips the MLP
(L263, L273). Its output therefore has a closed form over the vanilla hidden states::

    g = h_{D−n} + Σ_{l=D−n+1..D} out_proj_l(concat_h softmax(v_l v_lᵀ/√d_h) v_l),
        v_l from LN1_l(h_{l−1})

and its CLS token is the vanilla CLS output (L349 ``x[0] = x_ori[0]``), ``ln_post`` and
``proj`` go on every token (L352–353). Feature surgery (``clip/clip.py``
``clip_feature_surgery`` L287–308) reweights each class by the crop's vanilla CLS
prediction and subtracts the per-token mean over classes.

``surgery_last`` is the last-block approximation (v-v attention, residual, no MLP), which
``surgery`` with ``depth=1`` and ``feature_surgery=false`` equals on the patch tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from sclip_lab.attention.core import (
    AttentionInputs,
    around,
    attention_qkv,
    merge_heads,
    register_attention,
    softmax_attention,
)
from sclip_lab.knobs import TRUNK_DEPTH, Knob

SURGERY_DEPTH = 6  # clip_surgery_model.py L321: range(1, 7), the last six blocks
# A block's attention on its path: (z, q, k, v) of that block -> (B, heads, N, N).
BlockAttention = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------- the parallel path


def path_layers(knobs: Mapping, depth: int) -> tuple[int, ...]:
    """The trunk hidden states a last-``knobs["depth"]``-blocks path reads: h_{D−n} … h_{D−2}
    (h_{D−1} is the last block's own input)."""
    return tuple(range(depth - knobs["depth"], depth - 1))


def stream(x: AttentionInputs, layer: int) -> Tensor:
    """``h_layer`` of the vanilla stream: a kept trunk state, or ``h_{D−1}``, the last
    block's input (never kept: it comes anyway). The tower's depth, not its open_clip
    blocks, says which: a timm tower passes none."""
    if layer in x.hidden:
        return x.hidden[layer]
    if layer == (x.depth or len(x.blocks)) - 1:
        return x.x
    raise KeyError(f"h_{layer} was not kept by the trunk; declare it in the variant's hidden=")


def side_path(x: AttentionInputs, depth: int, attention: BlockAttention) -> Tensor:
    """``(B, N, D)``: the parallel path over the last ``depth`` blocks.

    At each block l the path's attention ``A_l = attention(z_l, q_l, k_l, v_l)`` is taken on
    ``z_l = LN1_l(h_{l−1})`` of the vanilla stream, ``o_l = out_proj_l(A_l v_l)``, and the
    path, starting at ``h_{D−depth}``, becomes ``g + α·o_l`` (``residual``, the official
    form) or ``α·o_l`` (ClearCLIP's ``ignore_residual``: only the last o survives), then
    ``+ MLP(LN2(·))`` where ``ffn`` (off in the official form). Layer scale goes with the
    residual, as in the lab's block (identity in CLIP).
    """
    D = len(x.blocks)
    residual, ffn = x.block.get("residual", True), x.block.get("ffn", False)
    alpha = x.block.get("alpha", 1.0)
    g = stream(x, D - depth)
    for layer in range(D - depth + 1, D + 1):
        block = x.blocks[layer - 1]
        if layer == D:
            z, q, k, v = x.z, x.q, x.k, x.v
        else:
            z = block.ln_1(stream(x, layer - 1))
            q, k, v = attention_qkv(block, z)
        a = attention(z, q, k, v)
        o = block.attn.out_proj(merge_heads(a.to(v.dtype) @ v))
        g = around(block, g, o, residual, ffn, alpha)
    return g


def vanilla_cls(x: AttentionInputs) -> Tensor:
    """``(B, 1, D)``: the vanilla last block's CLS output (CLIP's own, residual and MLP)."""
    block = x.blocks[-1]
    a = softmax_attention(x.q[:, :, :1], x.k, x.q.shape[-1] ** 0.5)  # (B, heads, 1, N)
    c = x.x[:, :1] + block.ls_1(block.attn.out_proj(merge_heads(a @ x.v)))
    return c + block.ls_2(block.mlp(block.ln_2(c)))


# ------------------------------------------------------------------ CLIP Surgery


def vv_attention(z: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """CLIP Surgery's path attention softmax(v vᵀ/√d_h) (``Attention.forward`` L81–95)."""
    return softmax_attention(v, v, v.shape[-1] ** 0.5)


def class_shares(query_class: Tensor | None, num_queries: int, device: torch.device
                 ) -> Tensor:
    """``(Q,)`` each query's share of its class, 1 / (its class's query count); all ones
    without a mapping (one class per query, as in CLIP Surgery's own vocabularies)."""
    if query_class is None:
        return torch.ones(num_queries, device=device)
    query_class = query_class.to(device)
    return 1.0 / torch.bincount(query_class)[query_class].float()


def feature_surgery_logits(feats: Tensor, queries: Tensor, depth: int = SURGERY_DEPTH,
                           feature_surgery: bool = True, query_class: Tensor | None = None
                           ) -> Tensor:
    """``(B, h·w, Q)`` patch logits; with ``feature_surgery`` CLIP Surgery's
    (``clip_feature_surgery`` L293–306, per window), its softmax and means over classes::

        w_t = p_t / m(p),   p_t = exp(2·c_t) / Σ_t' s_t'·exp(2·c_t'),   c_t = cos(F_cls, T_t)
        sim[i, t] = w_t·cos(F_i, T_t) − m(w·cos(F_i, T)),   m(x) = Σ_t s_t·x_t / C

    s_t = 1 / (the query count of t's class, ``query_class`` ``(Q,)``). The official code
    has one query per class (s = 1: m is its mean over classes). With synonyms each
    query counts for its share of the class, so a class's weight does not grow with its
    number of synonyms and a duplicated query changes no logit (docs/protocol.md §16).
    ``feats`` ``(B, N, E)`` are unit rows, CLS (the vanilla one) first; ``depth`` is
    unused (the readout receives every knob)."""
    cos = feats @ queries.T  # (B, N, Q)
    if not feature_surgery:
        return cos[:, 1:]
    share = class_shares(query_class, queries.shape[0], cos.device)  # (Q,)
    num_classes = share.sum()

    def class_mean(x: Tensor) -> Tensor:  # (B, n, Q) -> (B, n, 1)
        return (x * share).sum(-1, keepdim=True) / num_classes

    # softmax whose denominator sums classes: Σ_t share_t·exp(2c_t); the 2 is L295's
    p = (2 * cos[:, :1] + share.log()).softmax(-1) / share  # (B, 1, Q)
    weighted = cos[:, 1:] * (p / class_mean(p))
    return weighted - class_mean(weighted)


def surgery_maps(x: AttentionInputs, depth: int = SURGERY_DEPTH,
                 feature_surgery: bool = True) -> Tensor:
    """The last block's v-v attention on the surgery path (figures)."""
    return vv_attention(x.z, x.q, x.k, x.v)


@register_attention(
    "surgery", output="tokens", residual=True, ffn=False, hidden=path_layers,
    pos_embed="bilinear",  # clip_surgery_model.py L339 (docs/protocol.md §1)
    readout=feature_surgery_logits, maps=surgery_maps, requires=("cls", "blocks", "hidden"),
    knobs=[Knob("depth", "int", SURGERY_DEPTH, "blocks on the v-v path (the last n)",
                low=1, high=TRUNK_DEPTH),
           Knob("feature_surgery", "bool", True, "reweight classes by the CLS prediction "
                "and subtract the class mean (clip_feature_surgery)")])
def surgery(x: AttentionInputs, depth: int = SURGERY_DEPTH,
            feature_surgery: bool = True) -> Tensor:
    """CLIP Surgery: v-v path over the last n blocks without MLP, vanilla CLS, feature surgery."""
    g = side_path(x, depth, vv_attention)
    return torch.cat([vanilla_cls(x).to(g.dtype), g[:, 1:]], dim=1)  # L349


@register_attention("surgery_last", residual=True, ffn=False, pos_embed="bilinear")
def surgery_last(x: AttentionInputs) -> Tensor:
    """CLIP Surgery's last-block approximation: softmax(v vᵀ/8), residual on, no MLP."""
    return vv_attention(x.z, x.q, x.k, x.v)
