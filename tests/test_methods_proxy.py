"""ProxyCLIP's last block against an independent transcription of the official code (fp32,
the tiny random 4-block ViT, random proxy features).

Transcribed (rewritten here in plain torch, in the official sequence-first layout, one
crop per call as its segmentor runs) from github.com/mc-lan/ProxyCLIP @ e7b767f,
``open_clip/transformer.py``:

* ``VisionTransformer.forward`` (L503–535): blocks 1…D−1 as usual, then ``custom_attn`` on
  ``ln_1`` of the last block's input with the proxy features, no residual, no MLP, then
  ``ln_post`` and ``proj`` on every output token (the proxy grid, no CLS);
* ``custom_attn`` (L560–587): S = cosine of the proxy features, ``(S − mean(S)·β)·γ``,
  entries < 0 set to −inf, softmax, the same map for every head; v of the patch tokens
  reshaped to ``token_size`` and bilinearly resized (align_corners=False) to the proxy grid;
  ``out_proj(A v)``;
* ``proxyclip_segmentor.forward_feature`` (L106–186): unit features, cosine with the text,
  logits reshaped to the proxy grid (I, J).

``token_size`` is built as ``(W/p, H/p)`` but used as (rows, cols): the transcription takes
it literally on square windows, and as (H/p, W/p) on the non-square case, where the literal
rule scrambles the grid (shown below).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from sclip_lab.attention.proxy import proxy_attention
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import head_spec
from sclip_lab.pipeline import build_last_block

ATOL, RTOL = 1e-5, 1e-4
SECTION = {"name": "proxy", "gamma": 3.0, "beta": 1.2}
CLIP_SELF = {"name": "clip_self", "arch": None, "pretrained": None, "layer": 2}


def official_last_block(enc, x_nld, feats, beta, gamma, token_size):
    """``custom_attn`` then ``ln_post @ proj`` on one crop: ``(1, N, D)`` block input,
    ``(1, C, H, W)`` proxy features -> ``(1, H·W, E)`` (not normalised)."""
    visual = enc.visual
    blk = visual.transformer.resblocks[-1]
    x = blk.ln_1(x_nld).permute(1, 0, 2)  # LND, as the official code runs its blocks
    attn_layer = blk.attn
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    B, C, H, W = feats.shape
    qk = F.normalize(feats.flatten(2, 3), dim=1)
    sim = torch.einsum("bcm,bcn->bmn", qk, qk)
    sim = (sim - torch.mean(sim) * beta) * gamma
    sim[sim < 0.0] = float("-inf")
    mask = sim.to(q.dtype).unsqueeze(1).repeat(1, num_heads, 1, 1)
    mask = mask.reshape(bsz * num_heads, mask.shape[2], mask.shape[3])
    weights = F.softmax(mask, dim=-1)
    v = v[:, 1:, :].reshape(bsz * num_heads, token_size[0], token_size[1], head_dim)
    v = F.interpolate(v.permute(0, 3, 1, 2), size=(H, W), mode="bilinear",
                      align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(bsz * num_heads, H * W, head_dim)
    out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    out = attn_layer.out_proj(out).permute(1, 0, 2)  # NLD
    return visual.ln_post(out) @ visual.proj


def official_logits(enc, x_nld, feats, queries, token_size, beta=1.2, gamma=3.0):
    """``forward_feature``'s logits before the resize to the crop: ``(1, Q, I, J)``."""
    f = official_last_block(enc, x_nld, feats, beta, gamma, token_size)
    f = f / f.norm(dim=-1, keepdim=True)
    logits = f @ queries.T
    return logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], *feats.shape[-2:])


def lab_logits(enc, images, feats, queries, section=SECTION):
    last = build_last_block(section, None, enc, proxy=CLIP_SELF)
    with torch.no_grad():
        trunk = enc.trunk(images, last.early_layers, last.hidden_layers)
        trunk.proxy[last.proxy] = feats
        return enc.logits(trunk, last, queries), trunk


def proxy_feats(batch, channels, grid, seed=3):
    gen = torch.Generator().manual_seed(seed)
    # a shared direction plus noise: cosines spread around a positive mean, as real
    # backbones' features do, so that masking cuts a real share of each row
    base = torch.randn(1, channels, 1, 1, generator=gen)
    return base + 0.9 * torch.randn(batch, channels, *grid, generator=gen)


@pytest.mark.parametrize("pixels,proxy_grid", [((96, 96), (12, 12)), ((96, 96), (6, 6)),
                                                ((96, 96), (5, 7))])
def test_square_windows_match_the_official_code(enc, queries, pixels, proxy_grid):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, *pixels, generator=gen)
    feats = proxy_feats(2, 24, proxy_grid)
    ours, trunk = lab_logits(enc, images, feats, queries)
    assert ours.shape == (2, len(queries), *proxy_grid)
    h, w = trunk.grid
    for i in range(2):  # the official code, one crop at a time
        with torch.no_grad():
            ref = official_logits(enc, trunk.x[i:i + 1], feats[i:i + 1], queries.float(),
                                  (w, h))  # (W/p, H/p), literally
        torch.testing.assert_close(ours[i:i + 1], ref, atol=ATOL, rtol=RTOL)


def test_non_square_windows_keep_rows_and_columns(enc, queries):
    """A 64×112 window (grid 4×7): ours equals the official computation with token_size
    as (rows, cols); the literal (W/p, H/p) reads the grid transposed and differs."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 64, 112, generator=gen)
    feats = proxy_feats(1, 24, (8, 14))
    ours, trunk = lab_logits(enc, images, feats, queries)
    assert trunk.grid == (4, 7) and ours.shape == (1, len(queries), 8, 14)
    with torch.no_grad():
        right = official_logits(enc, trunk.x, feats, queries.float(), trunk.grid)
        literal = official_logits(enc, trunk.x, feats, queries.float(), trunk.grid[::-1])
    torch.testing.assert_close(ours, right, atol=ATOL, rtol=RTOL)
    assert (ours - literal).abs().max() > 1e-3


def test_knobs_reach_the_attention(enc, queries):
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    feats = proxy_feats(1, 24, (6, 6))
    ours, trunk = lab_logits(enc, images, feats, queries, {**SECTION, "gamma": 5.0,
                                                           "beta": 0.8})
    with torch.no_grad():
        ref = official_logits(enc, trunk.x, feats, queries.float(), trunk.grid, beta=0.8,
                              gamma=5.0)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_attention_masks_negatives_and_shares_the_mean_per_window():
    feats = proxy_feats(2, 16, (3, 4))
    a = proxy_attention(feats, 3.0, 1.2)
    assert a.shape == (2, 12, 12)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 12))
    for i in range(2):  # each window alone gives the same rows: the mean is per window
        torch.testing.assert_close(a[i:i + 1], proxy_attention(feats[i:i + 1], 3.0, 1.2))
    f = F.normalize(feats.flatten(2), dim=1)
    s = f.transpose(1, 2) @ f
    masked = (s - 1.2 * s.mean(dim=(1, 2), keepdim=True)) < 0
    assert masked.any() and (a[masked] == 0).all() and (a[~masked] > 0).all()


def test_the_hard_mask_turns_tiny_feature_errors_into_large_logit_errors(enc, queries):
    """Why the proxies must reproduce the official features exactly (tests/test_proxy.py:
    bitwise, with explicit attention). A feature error of 2e-4, what timm's fused attention
    kernel gave on a COCO photo with DINO, flips a few pairs across ProxyCLIP's S < 0 cut:
    each flip adds or removes a whole softmax term, so the attention jumps by ~1e-2 where
    the same error with the mask held fixed moves it by ~3e-5, and the logits move by
    ~3e-2, thousands of times the 1e-5 tolerance against the official code that exact
    features meet."""
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    feats = proxy_feats(1, 24, (12, 12))
    error = 2e-4 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(9))

    def scores(f):  # custom_attn's (S − β·mean S)·γ, before the cut
        f = F.normalize(f.flatten(2), dim=1)
        s = f.transpose(1, 2) @ f
        return (s - 1.2 * s.mean()) * 3.0

    keep = scores(feats) >= 0
    flipped = keep != (scores(feats + error) >= 0)
    assert 1 <= int(flipped.sum()) <= 10  # a handful of 20736 pairs
    fixed = [scores(f).masked_fill(~keep, float("-inf")).softmax(-1)
             for f in (feats, feats + error)]
    assert (fixed[1] - fixed[0]).abs().max() < 1e-4  # smooth: the error's own size
    jump = proxy_attention(feats + error, 3.0, 1.2) - proxy_attention(feats, 3.0, 1.2)
    assert jump.abs().max() > 1e-2
    exact, trunk = lab_logits(enc, images, feats, queries)
    off, _ = lab_logits(enc, images, feats + error, queries)
    with torch.no_grad():
        ref = official_logits(enc, trunk.x, feats, queries.float(), trunk.grid)
    torch.testing.assert_close(exact, ref, atol=ATOL, rtol=RTOL)
    assert (off - ref).abs().max() > 100 * ATOL


def test_identical_features_keep_each_token_instead_of_nan():
    """All features alike: every official score is negative (NaN rows there); ours keeps
    each token on itself."""
    feats = torch.ones(1, 8, 2, 3)
    a = proxy_attention(feats, 3.0, 1.2)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[0], torch.eye(6))


@pytest.mark.parametrize("section,proxy,message", [
    ({"name": "proxy", "gamma": 0}, CLIP_SELF, "attention.gamma=0 is out of range"),
    ({"name": "proxy", "gamma": -1}, CLIP_SELF, "attention.gamma=-1 is out of range"),
    ({"name": "proxy", "beta": float("nan")}, CLIP_SELF, "must be a finite number"),
    ({"name": "proxy", "beta": "inf"}, CLIP_SELF, "must be a finite number"),
    ({"name": "proxy"}, None, "attention=proxy needs a proxy backbone"),
    ({"name": "proxy"}, {"name": "none"}, "attention=proxy needs a proxy backbone"),
])
def test_bad_knobs_and_a_missing_proxy_fail_before_the_model(section, proxy, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        head_spec(section, None, None, proxy)
