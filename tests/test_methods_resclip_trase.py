"""ResCLIP (RCS), CLIPtrase's block and SegEarth-OV's block and CLS readout against
independent transcriptions of the official code (fp32, tiny random 4-block ViT, a
non-square 6×7 patch grid, two images).

Transcribed (the computation, rewritten here in plain torch head by head, not copied):

* ResCLIP — github.com/yvhangyang/ResCLIP @ 0e085f7, ``clip/model.py``:
  ``VisionTransformer.forward`` (blocks 1…D−1 through ``custom_attn(with_attn=True)``, i.e.
  softmax(q·s kᵀ) per head, s = d_h^-1/2, their maps averaged over blocks 6..9 →
  ``attention_rcs``), ``custom_attn`` ``attn_strategy='resclip'`` (bmm(k, kᵀ)·s + ω, softmax,
  then ``τ·((1−λ)·A + λ·attention_rcs)`` with ``attn_rcs_weights=[τ, λ]``), ``arch='wo_resi'``
  (the block output is ``custom_attn(ln_1(x))`` alone), ``gaussian_window`` and
  ``get_attention_addition`` (NACLIP's ω: a conv2d of one-hot patch images with a
  (2h−1)×(2w−1) Gaussian window, zero CLS row/column). SFR is not transcribed (not built).
* CLIPtrase — github.com/leaves162/CLIPtrase @ 2b7de61, ``clip_utils/attn2.py``
  ``multi_head_attention_forward(self_qk_weight=True)``: softmax(bmm(q·s, qᵀ)) +
  softmax(bmm(k·s, kᵀ)) + softmax(bmm(v·s, vᵀ)), then ``out_proj``; ``clip_utils/model.py``
  ``ResidualAttentionBlock.forward``: x + attn(ln_1(x)), then + mlp(ln_2(x)).
* SegEarth-OV — github.com/likyoo/SegEarth-OV @ 3e22a96, ``open_clip/transformer.py``
  ``custom_attn(model_type='SegEarth')`` and ``forward(ignore_residual=True)`` (output =
  custom_attn(ln_1(x))), ``ln_post`` then ``proj`` with ``pooled = x[:, 0]``;
  ``segearth_segmentor.py`` ``forward_feature`` without SimFeatUp: cls /= ‖cls‖, patches
  /= ‖·‖, ``logits = patches @ Tᵀ + (cls @ Tᵀ) · cls_token_lambda``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab import attention as attn
from sclip_lab import records
from sclip_lab.attention import resclip as resclip_mod
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError
from sclip_lab.pipeline import build_last_block

ATOL, RTOL = 1e-5, 1e-4


# ------------------------------------------------------------------------- fixtures


def run_lab(enc, images, section):
    """``(last block output, attention map, trunk)`` of the lab under ``section``."""
    last = build_last_block(section, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images, last.early_layers, last.hidden_layers)
        return enc.last_block(trunk, last), enc.last_attention(trunk, last), trunk


# --------------------------------------------------------- official transcriptions


def heads_of(block, z):
    """Per image and head, q, k, v ``(d_h columns)`` as lists [b][h] (in_proj with bias)."""
    mha = block.attn
    qkv = F.linear(z, mha.in_proj_weight, mha.in_proj_bias)
    D, H = z.shape[-1], mha.num_heads
    d = D // H
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    split = [[[t[b, :, h * d:(h + 1) * d] for h in range(H)] for b in range(z.shape[0])]
             for t in (q, k, v)]
    return (*split, d ** -0.5)


def out_proj(block, per_head):
    """``out_proj`` of per-image lists of per-head outputs ``(N, d_h)`` -> ``(B, N, D)``."""
    merged = torch.stack([torch.cat(hs, dim=-1) for hs in per_head])
    return F.linear(merged, block.attn.out_proj.weight, block.attn.out_proj.bias)


def official_omega(n_patches, std):
    """ResCLIP/NACLIP ``gaussian_window`` + ``get_attention_addition``."""
    dim1, dim2 = n_patches
    c = 1 / (std * math.sqrt(2))
    axes = []
    for dim in (2 * dim1 - 1, 2 * dim2 - 1):
        start = -(dim - 1) / 2.0
        axes.append(torch.linspace(start * c, (start + dim - 1) * c, dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*axes, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2)).permute(0, 3, 1, 2)
    out = F.conv2d(m.reshape(-1, dim1, dim2).unsqueeze(1), window[None, None],
                   padding="same").squeeze(1).reshape(dim1 * dim2, dim1 * dim2)
    n = dim1 * dim2
    return torch.hstack([torch.zeros(n + 1, 1), torch.vstack([torch.zeros(1, n), out])])


def official_trunk_maps(enc, images):
    """ResCLIP's trunk: vanilla blocks, keeping each block's per-head softmax(q·s kᵀ)."""
    x, _ = enc.embed(images)
    maps = []
    for block in enc.visual.transformer.resblocks[:-1]:
        q, k, _, s = heads_of(block, block.ln_1(x))
        maps.append([[torch.softmax((qh * s) @ kh.T, -1) for qh, kh in zip(qb, kb)]
                     for qb, kb in zip(q, k)])
        x = block(x)
    return x, maps


def official_resclip(enc, images, std, tau, lam, start, end):
    """ResCLIP's last block, RCS on, SFR off, ``arch='wo_resi'``."""
    x, maps = official_trunk_maps(enc, images)
    block = enc.visual.transformer.resblocks[-1]
    q, k, v, s = heads_of(block, block.ln_1(x))
    omega = official_omega((images.shape[-2] // 16, images.shape[-1] // 16), std)
    out = []
    for b in range(len(k)):
        per_head = []
        for h, (kh, vh) in enumerate(zip(k[b], v[b])):
            a = torch.softmax(kh @ kh.T * s + omega, -1)
            rcs = torch.stack([maps[i][b][h] for i in range(start - 1, end)]).mean(0)
            per_head.append((tau * ((1 - lam) * a + lam * rcs)) @ vh)
        out.append(per_head)
    return out_proj(block, out)


def official_self_correlation(block, x):
    """Σ softmax over q-q, k-k, v-v with s = d_h^-1/2, then out_proj (CLIPtrase, SegEarth)."""
    q, k, v, s = heads_of(block, block.ln_1(x))
    out = [[(torch.softmax((qh * s) @ qh.T, -1) + torch.softmax((kh * s) @ kh.T, -1)
             + torch.softmax((vh * s) @ vh.T, -1)) @ vh for qh, kh, vh in zip(*hs)]
           for hs in zip(q, k, v)]
    return out_proj(block, out)


# ------------------------------------------------------------------------- ResCLIP


@pytest.mark.parametrize("sigma,tau,lam,start,end", [
    (5.0, 2.0, 0.3, 1, 3),   # VOC21's weights over every trunk block of the tiny model
    (5.0, 2.0, 0.6, 2, 3),   # VOC20's λ
    (2.5, 1.5, 1.0, 2, 2),   # one borrowed block, λ = 1: the borrowed map alone
])
def test_resclip_matches_the_official_rcs_block(enc, images, sigma, tau, lam, start, end):
    section = {"name": "resclip", "sigma": sigma, "tau_rcs": tau, "lambda_rcs": lam,
               "rcs_start": start, "rcs_end": end, "sfr": False}  # RCS alone (SFR: below)
    got, amap, _ = run_lab(enc, images, section)
    with torch.no_grad():
        want = official_resclip(enc, images, sigma, tau, lam, start, end)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # rows of the blended map sum to τ (kept: out_proj has a bias)
    torch.testing.assert_close(amap.sum(-1), torch.full_like(amap.sum(-1), tau))


def test_resclip_borrows_its_block_range_and_defaults_to_blocks_6_to_9():
    variant = attn.get_variant("resclip")
    knobs, block = variant.bind({"name": "resclip"}, 12)
    assert variant.borrows(knobs) == (6, 7, 8, 9)
    assert (knobs["lambda_rcs"], knobs["tau_rcs"], knobs["sigma"]) == (0.3, 2.0, 5.0)
    assert block == {"residual": False, "ffn": False, "alpha": 1.0}


def test_resclip_without_the_blend_is_naclip(enc, images):
    plain, plain_map, _ = run_lab(enc, images, {"name": "naclip", "sigma": 5.0})
    rcs = {"name": "resclip", "sigma": 5.0, "lambda_rcs": 0.0, "rcs_start": 1, "rcs_end": 3,
           "sfr": False}
    got, got_map, _ = run_lab(enc, images, {**rcs, "tau_rcs": 1.0})
    assert torch.equal(got_map, plain_map) and torch.equal(got, plain)
    _, doubled, _ = run_lab(enc, images, {**rcs, "tau_rcs": 2.0})
    assert torch.equal(doubled, 2 * plain_map)


RCS = {"name": "resclip", "rcs_start": 1, "rcs_end": 3}


@pytest.mark.parametrize("section,match", [
    ({**RCS, "lambda_rcs": 1.5}, "lambda_rcs=1.5 is out of range"),
    ({**RCS, "lambda_rcs": -0.1}, "lambda_rcs=-0.1 is out of range"),
    ({**RCS, "tau_rcs": float("inf")}, "tau_rcs=inf must be a finite number"),
    ({**RCS, "tau_rcs": float("nan")}, "tau_rcs=nan must be a finite number"),
    ({**RCS, "tau_rcs": 0.0}, "tau_rcs=0.0 is out of range"),
    ({**RCS, "sigma": 0.0}, "sigma=0.0 is out of range"),
    ({**RCS, "rcs_end": 4}, "rcs_end must be an integer ≥ 1 ≤ 3"),  # the last block: no
    ({**RCS, "rcs_start": 0}, "rcs_start must be an integer ≥ 1 ≤ 3"),
    ({**RCS, "rcs_start": 3, "rcs_end": 2}, "rcs_start=3 > rcs_end=2"),
    ({"name": "resclip", "rcs_start": 6, "rcs_end": 9}, "rcs_start=6 is out of range"),
    ({**RCS, "beta": 1}, "no knob 'beta'"),
])
def test_resclip_refuses_impossible_knobs_in_one_line(enc, section, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_last_block(section, None, enc)
    assert "\n" not in str(err.value)


def test_resclip_default_blocks_on_a_shallower_model_are_refused_at_build(enc):
    with pytest.raises(ConfigError, match="rcs_start=6 is out of range") as err:
        build_last_block({"name": "resclip"}, None, enc)  # 6..9 on a 4-block model
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------- ResCLIP SFR


def official_pamr(img, mask, num_iter, dilations):
    """``pamr.py`` PAMR: shift-kernel convolutions per dilation (replicate padding)."""
    def shifts(sign_centre, centre_row):
        w = torch.zeros(9, 1, 3, 3)
        for n in range(9):
            w[n, 0, n // 3, n % 3] = 1
        if not centre_row:  # the 8 neighbours only
            w = torch.cat([w[:4], w[5:]])
        if sign_centre:  # LocalAffinity: centre − neighbour
            w = -w
            w[:, 0, 1, 1] = 1
        return w

    def local(x, kernel):
        B, K, H, W = x.shape
        x = x.reshape(B * K, 1, H, W)
        out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d)
               for d in dilations]
        return torch.cat(out, 1).reshape(B, K, -1, H, W)

    mask = F.interpolate(mask, size=img.shape[-2:], mode="bilinear", align_corners=True)
    x_std = local(img, shifts(False, True)).std(2, keepdim=True)
    x = -local(img, shifts(True, False)).abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(num_iter):
        mask = (local(mask, shifts(False, False)) * x).sum(2)
    return mask


def official_patch_matrix(probs, n_patches, temp_thd, patch=16):
    """``create_patch_matrix``: argmax, 0 below ``temp_thd``, mode per 16×16 patch."""
    pred = probs.argmax(0, keepdim=True)
    pred[probs.max(0, keepdim=True)[0] < temp_thd] = 0
    tiles = pred[0].unfold(0, patch, patch).unfold(1, patch, patch)
    return torch.mode(tiles.reshape(n_patches[0], n_patches[1], -1), dim=-1)[0]


def official_check_path(labels, start, end, max_steps, t):
    """``check_path`` for one pair, literally: the first ``steps + 1`` of the grid's
    ``max_steps + 1`` samples of the segment, each rounded (fp32, half to even)."""
    steps = max(abs(end[0] - start[0]), abs(end[1] - start[1]))
    for k in range(min(steps, max_steps) + 1):
        r, c = (np.rint(np.float32(s) * (np.float32(1) - t[k]) + np.float32(e) * t[k])
                for s, e in zip(start, end))
        if labels[int(r), int(c)] != labels[start]:
            return False
    return True


def official_attention_sfr(labels, std, delete_same_entity=True):
    """``generate_attention_sfr`` of an ``(h, w)`` label map -> ``(N, N)``."""
    h, w = labels.shape
    n = h * w
    cells = [(i // w, i % w) for i in range(n)]
    lab = labels.numpy()
    m = np.array([[float(lab[a] == lab[b]) for b in cells] for a in cells], dtype=np.float32)
    np.fill_diagonal(m, 1)
    if delete_same_entity:
        max_steps = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in cells for b in cells)
        t = torch.linspace(0, 1, max_steps + 1).numpy()
        for i, a in enumerate(cells):
            for j, b in enumerate(cells):
                if not official_check_path(lab, a, b, max_steps, t):
                    m[i, j] *= math.exp(-max(abs(a[0] - b[0]), abs(a[1] - b[1])) / max_steps)
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * std ** 2))
    g = g / g.sum()
    band = np.zeros((n, n))  # zero-padded 1-D convolution of each row, as a matrix
    for j in range(n):
        for c in range(n):
            if abs(c - j) <= size // 2:
                band[j, c] = g[c - j + size // 2]
    blurred = np.maximum(m @ band, 0)
    blurred = blurred / (blurred.sum(1, keepdims=True) + 1e-8)
    out = torch.zeros(n + 1, n + 1)
    out[1:, 1:] = torch.from_numpy(blurred).float()
    return out


def official_resclip_sfr(enc, images, queries, k, logit_scale=40.0):
    """ResCLIP's last block with RCS (``k['rcs']``) and SFR, window by window; returns the
    block output ``(B, N, D)`` and each window's patch labels. ``logit_scale``: what
    ``resclip_segmentor.py`` L75 passes, its own ``self.logit_scale`` (40 by default)."""
    x, maps = official_trunk_maps(enc, images)
    block = enc.visual.transformer.resblocks[-1]
    q, kk, v, s = heads_of(block, block.ln_1(x))
    H, W = images.shape[-2:]
    n_patches = (H // 16, W // 16)
    omega = official_omega(n_patches, k["sigma"])

    def custom_attn(b, attn_sfr=None):
        per_head = []
        for h, (kh, vh) in enumerate(zip(kk[b], v[b])):
            a = kh @ kh.T * s
            if attn_sfr is not None:
                a = k["tau_sfr"] * ((1 - k["lambda_sfr"]) * a
                                    + k["lambda_sfr"] * attn_sfr / attn_sfr.max())
            a = torch.softmax(a + omega, -1)
            if k["rcs"]:
                rcs = torch.stack([maps[i][b][h] for i in range(k["rcs_start"] - 1,
                                                                 k["rcs_end"])]).mean(0)
                a = k["tau_rcs"] * ((1 - k["lambda_rcs"]) * a + k["lambda_rcs"] * rcs)
            per_head.append(a @ vh)
        return out_proj(block, [per_head])  # (1, N, D)

    outs, labels = [], []
    for b in range(len(kk)):
        tokens = enc.visual.ln_post(custom_attn(b)) @ enc.visual.proj  # create_logit_temp
        feats = tokens[:, 1:] / tokens[:, 1:].norm(dim=-1, keepdim=True)
        logits = (feats @ queries.T).permute(0, 2, 1).reshape(1, -1, *n_patches)
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        logits = official_pamr(images[b:b + 1], logits, k["sfr_pamr_steps"],
                               k["sfr_pamr_dilations"])
        probs = torch.softmax(logits[0] * logit_scale, dim=0)
        patch_labels = official_patch_matrix(probs, n_patches, k["temp_thd"])
        attn_sfr = official_attention_sfr(patch_labels, k["sfr_sigma"],
                                          k["delete_same_entity"])
        outs.append(custom_attn(b, attn_sfr))
        labels.append(patch_labels)
    return torch.cat(outs), labels


SFR = {"name": "resclip", "rcs_start": 1, "rcs_end": 3, "sigma": 5.0, "tau_rcs": 2.0,
       "lambda_rcs": 0.3, "rcs": True, "sfr": True, "tau_sfr": 2.1, "lambda_sfr": 0.7,
       "temp_thd": 0.25, "sfr_pamr_steps": 10, "sfr_pamr_dilations": [8, 16],
       "sfr_sigma": 5.0, "delete_same_entity": True}  # the defaults (ADE20K's set)


@pytest.mark.parametrize("change", [
    {},  # the default path: PAMR(10, (8, 16)), the path check on
    {"temp_thd": 0.8, "tau_sfr": 2.2, "lambda_sfr": 0.6, "sfr_pamr_steps": 2,
     "sfr_sigma": 2.5, "lambda_rcs": 0.6, "rcs_start": 2},  # some patches fall to label 0
    {"rcs": False, "temp_thd": 0.9, "sfr_pamr_steps": 0, "delete_same_entity": False,
     "sigma": 3.0, "sfr_sigma": 1.0},  # NACLIP + SFR
])
def test_resclip_sfr_matches_the_official_two_pass_block(enc, images, queries, change):
    knobs = {**SFR, **change}
    last = build_last_block(knobs, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images, last.early_layers, last.hidden_layers)
        got = enc.logits(trunk, last, queries)
        tokens, labels = official_resclip_sfr(enc, images, queries, knobs)
        feats = enc.visual.ln_post(tokens[:, 1:]) @ enc.visual.proj
        feats = feats / feats.norm(dim=-1, keepdim=True)
        want = (feats @ queries.T).permute(0, 2, 1).reshape(2, -1, 6, 7)
    assert len(labels[0].unique()) > 1  # the feedback is not trivial (window 2: flat)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_sfr_classifies_at_the_segmenters_logit_scale(enc, images, queries):
    """The official segmentor hands SFR its own logit scale (``resclip_segmentor.py`` L75):
    40 under protocol=resclip, but under SCLIP's protocol the dataset's (VOC21: 65), which
    the segmenter passes through ``AttentionInputs.logit_scale``."""
    from sclip_lab import segment
    from sclip_lab.pipeline import Head, Preprocess, Segmenter

    assert resolved("attention=resclip")["dataset"]["logit_scale"] == 65.0  # VOC21, SCLIP's
    assert resolved("attention=resclip", "protocol=resclip")["dataset"]["logit_scale"] == 40.0
    knobs = {**SFR, "temp_thd": 0.8}  # a threshold the scale moves some pixels across
    head = Head(build_last_block(knobs, None, enc))
    post = segment.PostProcess(torch.arange(5), 5, 65.0, 0.0, None)
    seg = Segmenter(enc, [head], queries, post, Preprocess(96, None, 32))  # whole windows
    with torch.no_grad():
        windows = seg.window_logits(seg.encode_heads(list(images), [head]), 2, head)
        got = torch.stack([w[(0, 96, 0, 112)] for w in windows])
        want = {}
        for scale in (65.0, 40.0):
            tokens, labels = official_resclip_sfr(enc, images, queries, knobs, scale)
            feats = enc.visual.ln_post(tokens[:, 1:]) @ enc.visual.proj
            feats = feats / feats.norm(dim=-1, keepdim=True)
            want[scale] = ((feats @ queries.T).permute(0, 2, 1).reshape(2, -1, 6, 7), labels)
    torch.testing.assert_close(got, want[65.0][0], atol=ATOL, rtol=RTOL)
    assert not torch.equal(want[65.0][1][0], want[40.0][1][0])  # the scale moves labels
    assert (want[65.0][0] - want[40.0][0]).abs().max() > 100 * ATOL
    with torch.no_grad():  # a caller without a scale: the official default, 40
        alone = enc.logits(seg.encode_heads(list(images[:1]), [head])[0].trunk, head.last,
                           queries)
    torch.testing.assert_close(alone, want[40.0][0][:1], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("grid,delete", [((6, 7), True), ((5, 3), True), ((6, 7), False)])
def test_sfr_matrix_matches_the_literal_path_check(grid, delete):
    gen = torch.Generator().manual_seed(sum(grid))
    labels = torch.randint(0, 3, (2, *grid), generator=gen)
    labels[1, :, grid[1] // 2] = 2  # a wall of one label across the grid
    got = resclip_mod.sfr_matrix(labels, 5.0, delete)
    for b in range(2):
        want = official_attention_sfr(labels[b], 5.0, delete)
        torch.testing.assert_close(got[b], want / want.max(), atol=1e-6, rtol=1e-5)
    if delete:  # the check decays some same-label pairs (it is not a no-op here)
        plain = resclip_mod.sfr_matrix(labels, 5.0, False)
        assert not torch.allclose(got, plain)
    assert resclip_mod.path_table(*grid, labels.device) is resclip_mod.path_table(
        *grid, labels.device)  # built once per grid


def test_sfr_with_no_weight_is_rcs_alone_and_both_off_is_naclip(enc, images, queries):
    rcs = {**SFR, "sfr": False}
    last = build_last_block(rcs, None, enc)
    neutral = build_last_block({**SFR, "lambda_sfr": 0.0, "tau_sfr": 1.0}, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images, last.early_layers, last.hidden_layers)
        assert torch.equal(enc.logits(trunk, neutral, queries), enc.logits(trunk, last, queries))
        assert torch.equal(enc.last_block(trunk, neutral, queries), enc.last_block(trunk, last))
    plain, plain_map, _ = run_lab(enc, images, {"name": "naclip", "sigma": 5.0})
    off = {**SFR, "rcs": False, "sfr": False}
    got, got_map, _ = run_lab(enc, images, off)
    assert torch.equal(got_map, plain_map) and torch.equal(got, plain)
    assert attn.get_variant("resclip").borrows(build_last_block(off, None, enc).params) == ()


def test_sfr_without_queries_or_pixels_is_refused_in_one_line(enc, images, queries):
    last = build_last_block(SFR, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images, last.early_layers, last.hidden_layers)
        for call in (lambda: enc.last_attention(trunk, last),  # figures pass no queries
                     lambda: enc.last_block(trunk, last)):
            with pytest.raises(ConfigError, match="set attention.sfr=false") as err:
                call()
            assert "\n" not in str(err.value)
        trunk.images = None
        with pytest.raises(ConfigError, match="sfr=true"):
            enc.logits(trunk, last, queries)


@pytest.mark.parametrize("change,match", [
    ({"lambda_sfr": 1.5}, "lambda_sfr=1.5 is out of range"),
    ({"lambda_sfr": -0.2}, "lambda_sfr=-0.2 is out of range"),
    ({"temp_thd": 1.0}, "temp_thd=1.0 is out of range"),
    ({"temp_thd": 1.5}, "temp_thd=1.5 is out of range"),
    ({"temp_thd": -0.1}, "temp_thd=-0.1 is out of range"),
    ({"tau_sfr": float("inf")}, "tau_sfr=inf must be a finite number"),
    ({"tau_sfr": float("nan")}, "tau_sfr=nan must be a finite number"),
    ({"tau_sfr": 0.0}, "tau_sfr=0.0 is out of range"),
    ({"sfr_sigma": 0.0}, "sfr_sigma=0.0 is out of range"),
    ({"sfr_pamr_steps": -1}, "sfr_pamr_steps=-1 is out of range"),
    ({"sfr_pamr_dilations": [8.5]}, "sfr_pamr_dilations=\\[8.5\\] must be whole pixels"),
    ({"sfr": "yes"}, "sfr='yes' is not true/false"),
])
def test_resclip_sfr_refuses_impossible_knobs_in_one_line(enc, change, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_last_block({**SFR, **change}, None, enc)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------- CLIPtrase, SegEarth


def test_cliptrase_block_matches_the_official_block(enc, images):
    got, amap, trunk = run_lab(enc, images, {"name": "cliptrase_block"})
    block = enc.visual.transformer.resblocks[-1]
    with torch.no_grad():
        x = trunk.x + official_self_correlation(block, trunk.x)
        want = x + block.mlp(block.ln_2(x))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(amap.sum(-1), torch.full_like(amap.sum(-1), 3.0))


def test_segearth_block_and_cls_readout_match_the_official_code(enc, images, queries):
    got, _, trunk = run_lab(enc, images, {"name": "segearth_block"})
    block = enc.visual.transformer.resblocks[-1]
    with torch.no_grad():
        out = official_self_correlation(block, trunk.x)
        tokens = enc.visual.ln_post(out) @ enc.visual.proj
        cls = tokens[:, 0] / tokens[:, 0].norm(dim=-1, keepdim=True)
        patches = tokens[:, 1:] / tokens[:, 1:].norm(dim=-1, keepdim=True)
        logits = patches @ queries.T + (cls @ queries.T)[:, None] * -0.3  # (B, hw, Q)
        want = logits.permute(0, 2, 1).reshape(2, -1, *trunk.grid)
        last = build_last_block({"name": "segearth_block"}, None, enc)
        lab = enc.logits(trunk, last, queries)
    torch.testing.assert_close(got, out, atol=ATOL, rtol=RTOL)
    assert lab.shape == (2, 5, 6, 7)
    torch.testing.assert_close(lab, want, atol=ATOL, rtol=RTOL)


def recipe(residual, ffn):
    return {"name": "recipe", "scores": ["qq", "kk", "vv"], "residual": residual, "ffn": ffn}


def test_the_blocks_are_recipe_presets(enc, images, queries):
    trase, _, _ = run_lab(enc, images, {"name": "cliptrase_block"})
    assert torch.equal(trase, run_lab(enc, images, recipe(True, True))[0])
    earth, _, trunk = run_lab(enc, images, {"name": "segearth_block"})
    assert torch.equal(earth, run_lab(enc, images, recipe(False, False))[0])
    with torch.no_grad():  # cls_lambda = 0 is the plain patch cosine of that recipe
        no_cls = build_last_block({"name": "segearth_block", "cls_lambda": 0.0}, None, enc)
        plain = build_last_block(recipe(False, False), None, enc)
        torch.testing.assert_close(enc.logits(trunk, no_cls, queries),
                                   enc.logits(trunk, plain, queries), atol=1e-6, rtol=0)


def test_segearth_refuses_a_non_finite_lambda(enc):
    with pytest.raises(ConfigError, match="cls_lambda=nan must be a finite number"):
        build_last_block({"name": "segearth_block", "cls_lambda": float("nan")}, None, enc)


def test_heads_share_one_trunk_pass_in_the_segmenter(enc, queries):
    from sclip_lab import segment
    from sclip_lab.pipeline import Head, Preprocess, Segmenter

    sections = [{"name": "resclip", "rcs_start": 1, "rcs_end": 2},
                {"name": "segearth_block"}, {"name": "cliptrase_block"}]
    heads = [Head(build_last_block(s, None, enc)) for s in sections]
    post = segment.PostProcess(torch.arange(5), 5, 40.0, 0.0, None)
    seg = Segmenter(enc, heads, queries, post, Preprocess(64, 64, 32))
    assert seg.early_layers(heads) == (1, 2)
    out = seg.logits_many([torch.randn(3, 64, 96)], [(64, 96)])
    assert [tuple(h[0].shape) for h in out] == [(5, 64, 96)] * 3
    assert all(torch.isfinite(h[0]).all() for h in out)


# -------------------------------------------------------------------------- configs


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("dataset,lam", [
    ("voc21", 0.3), ("context60", 0.3), ("coco_object", 0.4), ("voc20", 0.6),
    ("cityscapes", 0.2), ("ade20k", 0.3), ("coco_stuff", 0.4), ("context59", 0.4),
])
def test_resclip_config_carries_the_per_benchmark_weights(dataset, lam):
    a = resolved("attention=resclip", f"dataset={dataset}")["attention"]
    assert (a["name"], a["lambda_rcs"], a["tau_rcs"], a["sigma"], a["rcs_start"],
            a["rcs_end"]) == ("resclip", lam, 2.0, 5.0, 6, 9)


@pytest.mark.parametrize("dataset,want", [
    ("voc21", (336, None, 112, 40.0, 0.1, None, "none")),
    ("voc20", (336, None, 112, 40.0, 0.0, None, "none")),
    ("context60", (336, 224, 112, 40.0, 0.1, None, "none")),
    ("cityscapes", (560, 224, 112, 40.0, 0.0, None, "none")),
    ("coco_stuff", (336, 224, 112, 40.0, 0.0, None, "none")),
])
def test_resclip_protocol(dataset, want):
    cfg = resolved("protocol=resclip", "attention=resclip", f"dataset={dataset}")
    p, d = cfg["preprocess"], cfg["dataset"]
    assert (p["short_side"], p["window"], p["stride"], d["logit_scale"], d["prob_thd"],
            d["area_thd"], cfg["postprocess"]["name"]) == want
    assert cfg["protocol"]["name"] == "resclip"


def test_new_variants_compose_and_are_keyed_and_recorded():
    keys = {records.result_key(resolved(f"attention={name}"))
            for name in ("naclip", "resclip", "cliptrase_block", "segearth_block")}
    assert len(keys) == 4
    rcs = resolved("attention=resclip", "attention.lambda_rcs=0.5")
    assert records.result_key(rcs) != records.result_key(resolved("attention=resclip"))
    summary = records.summary_of(rcs, {})
    assert (summary["lambda_rcs"], summary["tau_rcs"], summary["rcs_start"],
            summary["rcs_end"]) == (0.5, 2.0, 6, 9)
    earth = records.summary_of(resolved("attention=segearth_block"), {})
    assert earth["cls_lambda"] == -0.3 and earth["residual"] is False
