"""The q-q + k-k + v-v self-correlation block of CLIPtrase and of SegEarth-OV, and
SegEarth-OV's [CLS] bias subtraction on the logits.

Both sum three softmaxes of self-correlations at CLIP's own scale d_h^-1/2 = 1/8, so the
rows of A sum to 3 (kept: ``out_proj`` has a bias)::

    A = softmax(q qᵀ/8) + softmax(k kᵀ/8) + softmax(v vᵀ/8)

* CLIPtrase (github.com/leaves162/CLIPtrase @ 2b7de61): ``clip_utils/attn2.py``
  ``multi_head_attention_forward`` with ``self_qk_weight=True`` (L254–277: ``bmm(q·scaling,
  qᵀ)`` etc., ``scaling = head_dim ** -0.5``), called for block 12 only by
  ``clip_utils/model.py`` ``VisionTransformer.forward`` (L247–254); the block itself is the
  standard ``x + attn(ln_1(x))`` then ``+ mlp(ln_2(x))`` (L191–195), so **residual and MLP
  are kept**. Block 11's ``self_out_weight=True`` only exports a head-mean map of
  (cos qq + cos kk + cos vv)/3; its output is vanilla. Out of scope: that map's use in
  ``clip_self_correlation.py`` (global-patch removal, DBSCAN clustering, median filter,
  majority vote; VOC20's CLS-logit product) and its centre-crop protocol.
* SegEarth-OV (github.com/likyoo/SegEarth-OV @ 3e22a96): ``open_clip/transformer.py``
  ``custom_attn`` ``model_type='SegEarth'`` (L641–645), with ``ignore_residual=True``
  (``configs/base_config.py``), which outputs ``custom_attn(ln_1(x))`` alone (L526–530): no
  residual, no MLP. ``segearth_segmentor.py`` ``forward_feature`` (L172–192) reads out the
  same block's CLS (``ln_post``, ``proj``, L2 norm) and adds ``cls_token_lambda ·
  cos(CLS, t)`` to every patch's ``cos(patch, t)``, with ``cls_token_lambda = -0.3``
  (``configs/base_config.py`` L12; ``cfg_xBD.py`` sets 0): a subtraction of 0.3·CLS. Out of
  scope: SimFeatUp (``feature_up=True``, a trained JBU upsampler applied to the patch
  features before the normalisation; its checkpoint is not part of this lab).
"""

from __future__ import annotations

from torch import Tensor

from sclip_lab.attention.core import AttentionInputs, register_attention, score_attention
from sclip_lab.knobs import Knob

SELF_CORRELATIONS = ("qq", "kk", "vv")
CLS_LAMBDA = -0.3  # SegEarth-OV configs/base_config.py cls_token_lambda


@register_attention("cliptrase_block", residual=True, ffn=True)
def cliptrase_block(x: AttentionInputs) -> Tensor:
    """CLIPtrase block: Σ softmax(q qᵀ/8, k kᵀ/8, v vᵀ/8), residual and MLP kept."""
    return score_attention(x, SELF_CORRELATIONS)


def cls_readout(feats: Tensor, queries: Tensor, cls_lambda: float = CLS_LAMBDA) -> Tensor:
    """``(B, h·w, Q)``: cos(patch, t) + λ·cos(CLS, t), from unit features ``(B, N, E)`` with
    the CLS first and unit queries ``(Q, E)`` (λ < 0 subtracts the global bias)."""
    logits = feats @ queries.T  # (B, N, Q)
    return logits[:, 1:] + cls_lambda * logits[:, :1]


@register_attention("segearth_block", residual=False, ffn=False, readout=cls_readout,
                    requires=("cls",),
                    knobs=[Knob("cls_lambda", "float", CLS_LAMBDA,
                                "weight of the CLS logits added to each patch's (< 0 "
                                "subtracts them)")])
def segearth_block(x: AttentionInputs, cls_lambda: float = CLS_LAMBDA) -> Tensor:
    """SegEarth-OV: Σ softmax(qq/8, kk/8, vv/8), no residual/MLP; logits + λ·CLS logits."""
    return score_attention(x, SELF_CORRELATIONS)
