"""ProxyCLIP's last block (mc-lan/ProxyCLIP @e7b767f, open_clip/transformer.py
``VisionTransformer.forward`` L503–535 and ``custom_attn`` L560–587; docs/protocol.md §16).

A second, vision-only backbone (the ``proxy`` config group: DINO, DINOv2, MAE, SAM, or
CLIP's own hidden state) supplies features F ``(C, Hv, Wv)`` per window. The last block
attends over the proxy grid with one map for all heads::

    S = n(F)ᵀ n(F)   (M × M, M = Hv·Wv);   A = softmax(γ·(S − β·mean S)), entries < 0 masked

and reads CLIP's values resampled to that grid (bilinear), ``o = out_proj(A v)``, no
residual, no MLP. The readout (ln_post, proj, cosine) runs at the proxy grid; the window
logits are upsampled to the window like any other. Window grids are (rows, cols) of the
actual window: the official code takes both from one side, which only square crops hide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sclip_lab.attention.core import AttentionInputs, around, merge_heads, register_attention
from sclip_lab.attention.surgery import vanilla_cls
from sclip_lab.errors import ConfigError
from sclip_lab.knobs import Knob

GAMMA = 3.0  # VisionTransformer.forward(..., beta=1.2, gamma=3.0), L503
BETA = 1.2


def proxy_attention(feats: Tensor, gamma: float = GAMMA, beta: float = BETA) -> Tensor:
    """``(B, C, Hv, Wv)`` proxy features -> ``(B, M, M)`` attention over the proxy grid.

    The mean is per window (the official code runs one crop per batch). A window whose
    every score is negative (mean cosine above 1/β: all features alike) would be all −inf
    and NaN there; its tokens keep themselves (the diagonal is never masked), which
    changes nothing anywhere else, since S_ii = 1 is every row's largest score.
    """
    f = F.normalize(feats.flatten(2).float(), dim=1)  # (B, C, M)
    s = f.transpose(1, 2) @ f  # (B, M, M) cosine
    s = (s - beta * s.mean(dim=(1, 2), keepdim=True)) * gamma
    keep = s >= 0
    keep |= torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    return s.masked_fill(~keep, float("-inf")).softmax(dim=-1)


def to_grid(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``(B, ..., h·w, d)`` patch tokens on ``grid`` (rows, cols) -> ``(B, ..., Hv·Wv, d)``
    bilinearly resampled to ``size`` (``align_corners=False``, as the official ``v``)."""
    lead, d = tokens.shape[:-2], tokens.shape[-1]
    if tuple(grid) == tuple(size):
        return tokens
    t = tokens.reshape(-1, *grid, d).permute(0, 3, 1, 2)
    t = F.interpolate(t.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return t.permute(0, 2, 3, 1).reshape(*lead, size[0] * size[1], d).to(tokens.dtype)


def proxy_features(x: AttentionInputs) -> Tensor:
    """``(B, C, Hv, Wv)`` the proxy's features for these windows (one clear error without)."""
    if x.proxy is None:
        raise ConfigError("attention=proxy needs a proxy backbone: add proxy=dino_vitb8 "
                          "proxy.pretrained=/path/dino_vitb8_pretrain.pth (or another "
                          "conf/proxy option), or proxy=clip_self")
    return x.proxy


def proxy_maps(x: AttentionInputs, gamma: float = GAMMA, beta: float = BETA) -> Tensor:
    """``(B, 1, 1 + M, 1 + M)``: the proxy attention for figures, an empty CLS row and
    column in front so that it reads like a CLIP map over the proxy grid."""
    a = proxy_attention(proxy_features(x), gamma, beta)
    return F.pad(a, (1, 0, 1, 0)).unsqueeze(1)


@register_attention("proxy", output="tokens", residual=False, ffn=False, proxy=True,
                    maps=proxy_maps, requires=("cls", "blocks"),
                    knobs=[Knob("gamma", "float", GAMMA, "scale γ of the proxy scores",
                                above=0),
                           Knob("beta", "float", BETA, "share β of the mean similarity "
                                "subtracted before masking")])
def proxy(x: AttentionInputs, gamma: float = GAMMA, beta: float = BETA) -> Tensor:
    """ProxyCLIP: a proxy backbone's feature similarities as the last block's one attention."""
    feats = proxy_features(x)
    size = tuple(feats.shape[-2:])
    a = proxy_attention(feats, gamma, beta).unsqueeze(1)  # (B, 1, M, M), shared by heads
    v = to_grid(x.v[:, :, 1:], x.grid, size)  # (B, heads, M, d)
    block = x.blocks[-1]
    o = block.attn.out_proj(merge_heads(a.to(v.dtype) @ v))
    # The block knobs still apply: the residual stream is resampled like v.
    stream = to_grid(x.x[:, 1:], x.grid, size)
    y = around(block, stream, o, x.block["residual"], x.block["ffn"], x.block["alpha"])
    return torch.cat([vanilla_cls(x).to(y.dtype), y], dim=1)
