"""GEM, Grounding Everything (CVPR 2024; github.com/WalBouss/GEM @ 5fa677c): a self-self
attention ensemble over q, k and v on a path without FFN over the last blocks.

``gem/gem_utils.py`` ``SelfSelfAttention.forward`` (L60–123) computes, on the block's LN1
output z of the *vanilla* stream, for each of p ∈ {v, k, q} (L75–77)::

    τ⁻¹ = mean_n ‖z_n‖ · d_h^-1/2              (L79–81; ss_attn_temp replaces it, L83)
    x = p; repeat ss_attn_iter times: x = n(x); x = softmax(τ⁻¹ x xᵀ) x       (L85–100)
    x = n(x); A_p = softmax(τ⁻¹ x xᵀ)                                          (L103–113)
    o = out_proj(mean_p(A_p v))                                               (L115–121)

``GEMResidualBlock.forward`` (L131–149) adds o to the path and skips the MLP; the path starts
at the input of the first wrapped block, ``GEMWrapper.apply_gem`` (``gem_wrapper.py``
L23 ``range(1, depth)``, ``gem.py`` L94 ``gem_depth=7``) wraps the last six. The CLS token
is not replaced (``modified_vit_forward`` L183–193).

``gem_last`` is the form vendored in github.com/mc-lan/ClearCLIP @ ad68a40
(``gem/gem_utils.py`` L149–150, ``ignore_residual``): the path is reset to o at every block,
so only the last block's o survives: no residual, no MLP.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from sclip_lab.attention.core import AttentionInputs, register_attention
from sclip_lab.attention.surgery import path_layers, side_path
from sclip_lab.knobs import TRUNK_DEPTH, Knob

GEM_DEPTH = 6  # gem.py L94 gem_depth=7 and gem_wrapper.py L23 range(1, depth): six blocks
GEM_ITERATIONS = 1  # gem.py L95 ss_attn_iter=1


def gem_attention(z: Tensor, q: Tensor, k: Tensor, v: Tensor, iterations: int = GEM_ITERATIONS,
                  temperature: float | None = None) -> Tensor:
    """``(B, heads, N, N)``: GEM's mean of the three self-self attentions of q, k, v.

    ``temperature`` is τ (the logits of unit rows are divided by it; the official
    ``ss_attn_temp`` is its inverse); None takes τ⁻¹ = mean_n ‖z_n‖ / √d_h per window,
    CLS included. Computed in fp32, returned in v's dtype; rows sum to 1.
    """
    if temperature is None:
        inv = z.float().norm(dim=-1).mean(-1).view(-1, 1, 1, 1) / q.shape[-1] ** 0.5
    else:
        inv = 1.0 / temperature
    total = 0
    for p in (v, k, q):
        s = p.float()
        for _ in range(iterations):
            s = F.normalize(s, dim=-1)
            s = ((s @ s.transpose(-2, -1)) * inv).softmax(-1) @ s
        s = F.normalize(s, dim=-1)
        total = total + ((s @ s.transpose(-2, -1)) * inv).softmax(-1)
    return (total / 3).to(v.dtype)


GEM_KNOBS = [
    Knob("iterations", "int", GEM_ITERATIONS, "self-self iterations before the last one "
         "(ss_attn_iter)", low=0),
    Knob("temperature", "float", None, "τ of the self-self softmax (1/ss_attn_temp); "
         "null = adaptive, √d_h / mean‖z‖", above=0, nullable=True),
]


def gem_maps(x: AttentionInputs, depth: int = GEM_DEPTH, iterations: int = GEM_ITERATIONS,
             temperature: float | None = None) -> Tensor:
    """The last block's GEM attention on the path (figures)."""
    return gem_attention(x.z, x.q, x.k, x.v, iterations, temperature)


@register_attention(
    "gem", output="tokens", residual=True, ffn=False, hidden=path_layers, maps=gem_maps,
    requires=("blocks", "hidden"),
    pos_embed="bicubic_antialias",  # gem_utils.py L166-171 (docs/protocol.md §1)
    knobs=[Knob("depth", "int", GEM_DEPTH, "blocks on the GEM path (the last n; the "
                "official gem_depth is n + 1)", low=1, high=TRUNK_DEPTH), *GEM_KNOBS])
def gem(x: AttentionInputs, depth: int = GEM_DEPTH, iterations: int = GEM_ITERATIONS,
        temperature: float | None = None) -> Tensor:
    """GEM: q/k/v self-self ensemble on a path over the last n blocks without MLP."""
    return side_path(x, depth, partial(gem_attention, iterations=iterations,
                                       temperature=temperature))


@register_attention("gem_last", residual=False, ffn=False, knobs=GEM_KNOBS,
                    pos_embed="bicubic_antialias")
def gem_last(x: AttentionInputs, iterations: int = GEM_ITERATIONS,
             temperature: float | None = None) -> Tensor:
    """GEM as ClearCLIP runs it: the last block's GEM attention, no residual, no MLP."""
    return gem_attention(x.z, x.q, x.k, x.v, iterations, temperature)
