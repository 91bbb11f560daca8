"""PEARL against an independent transcription of the official code (fp32): the
Procrustes-aligned attention on the tiny random ViT and TLP on random logits and images.

Transcribed from github.com/PGSmall/PEARL @ c26062b:

* ``pearl/attn.py`` ``pa_attn`` (L22–78) in its ``(B·heads, T, d)`` layout with
  ``detach_cls=True``, and ``_polar_unitary_newton_schulz`` (L5–19);
* ``clip/model.py`` L124–125 (``arch='reduced'``): the last block is ``out_proj(A v)``;
* ``pearl/prop.py`` ``TLP.forward`` (L130–175) with ``bind_text``, ``_semantic_agree``,
  ``_edge_weights`` (the ``einsum('cc,bcij->bcij')`` kept as written), ``_apply_laplacian``
  and ``_cg_solve`` (per batch sums), on ``(1, Q, H, W)`` logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sclip_lab import refine
from sclip_lab.attention.pearl import pa_attention, polar_newton_schulz, polar_svd
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import head_spec
from sclip_lab.pipeline import build_last_block

# ---------------------------------------------------------------- official transcription


def official_polar(M, iters=5, eps=1e-6):
    B, d, _ = M.shape
    ident = torch.eye(d).unsqueeze(0).expand(B, -1, -1)
    A = M.transpose(1, 2) @ M
    Anorm = A.reshape(B, -1).norm(dim=1).clamp_min(eps).view(B, 1, 1)
    Y, Z = A / Anorm + eps * ident, ident.clone()
    for _ in range(iters):
        T = 0.5 * (3.0 * ident - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    return M @ (Z / torch.sqrt(Anorm))


def official_pa(q, k, alpha_kk=0.08, solver="polar", iters=5, use_kk=True):
    """``pa_attn(..., return_attn=True)`` on ``(B·heads, T, d)``."""
    d = q.shape[-1]
    w = q.norm(dim=2, keepdim=True)
    w[:, 0:1, :] = 0.0
    w = w / (w.sum(dim=1, keepdim=True) + 1e-6)
    q_c = q - (w * q).sum(dim=1, keepdim=True)
    k_c = k - (w * k).sum(dim=1, keepdim=True)
    M = torch.bmm(k_c.transpose(1, 2), q_c)
    if solver == "polar":
        R = official_polar(M, iters)
    else:
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
        R = torch.bmm(U, Vh)
    logits = torch.bmm(q * d ** -0.5, torch.bmm(k, R).transpose(1, 2))
    if use_kk:
        logits = logits + alpha_kk * torch.bmm(k_c, k_c.transpose(1, 2)) * d ** -0.5
    return F.softmax(logits, dim=-1)


def official_tlp(image, logits, text, grid=80, agree_matrix=False):
    """``TLP(grid).forward(image (1,3,H,W), logits (1,C,H,W))`` after ``bind_text(text)``."""
    eps = 1e-6
    T = F.normalize(text, dim=-1)
    S = torch.softmax((T @ T.t()) / 0.5, dim=1)
    S = S + 10.0 * torch.eye(S.size(0))
    S = S / (S.sum(dim=1, keepdim=True) + eps)

    def Smix(p):
        if agree_matrix:
            return torch.einsum("cd,bdij->bcij", S, p)
        return torch.einsum("cc,bcij->bcij", S, p)

    B, C, H, W = logits.shape
    sh, sw = int(max(1, round(H / float(grid)))), int(max(1, round(W / float(grid))))
    if sh > 1 or sw > 1:
        img_s = F.avg_pool2d(image, (sh, sw), (sh, sw), ceil_mode=False, count_include_pad=False)
        log_s = F.avg_pool2d(logits, (sh, sw), (sh, sw), ceil_mode=False,
                             count_include_pad=False)
    else:
        img_s, log_s = image, logits
    probs = torch.softmax(log_s, dim=1)
    conf = probs.max(dim=1, keepdim=True)[0]
    agree = (probs * Smix(probs)).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    Cw = (conf.clamp_min(0.05) ** 2) * (1.0 + agree)
    gray = 0.299 * img_s[:, 0:1] + 0.587 * img_s[:, 1:2] + 0.114 * img_s[:, 2:3]
    gx = torch.abs(gray[:, :, :, 1:] - gray[:, :, :, :-1])
    gy = torch.abs(gray[:, :, 1:, :] - gray[:, :, :-1, :])
    gx, gy = gx / (gx.mean() + eps), gy / (gy.mean() + eps)
    g_h = (probs[:, :, :, 1:] * Smix(probs[:, :, :, :-1])).sum(dim=1, keepdim=True)
    g_v = (probs[:, :, 1:, :] * Smix(probs[:, :, :-1, :])).sum(dim=1, keepdim=True)
    w_h = (torch.exp(-5.0 * gx) * (1.0 + g_h.clamp(0.0, 1.0))).clamp_(0.0, 1.0)
    w_v = (torch.exp(-5.0 * gy) * (1.0 + g_v.clamp(0.0, 1.0))).clamp_(0.0, 1.0)
    w_h = torch.cat([torch.ones_like(w_h[:, :, :, :1]), w_h], dim=3)
    w_v = torch.cat([torch.ones_like(w_v[:, :, :1, :]), w_v], dim=2)

    def lap(X):
        out = torch.zeros_like(X)
        diff_h = X[:, :, :, 1:] - X[:, :, :, :-1]
        out[:, :, :, 1:] += w_h[:, :, :, 1:] * diff_h
        out[:, :, :, :-1] -= w_h[:, :, :, 1:] * diff_h
        diff_v = X[:, :, 1:, :] - X[:, :, :-1, :]
        out[:, :, 1:, :] += w_v[:, :, 1:, :] * diff_v
        out[:, :, :-1, :] -= w_v[:, :, 1:, :] * diff_v
        return out

    def A(X):
        return Cw * X + 1 * lap(X)

    X = log_s.clone()
    Bt = Cw * log_s
    R = Bt - A(X)
    P = R.clone()
    rsold = (R * R).sum(dim=(1, 2, 3), keepdim=True)
    for _ in range(25):
        AP = A(P)
        alpha = rsold / ((P * AP).sum(dim=(1, 2, 3), keepdim=True) + 1e-12)
        X = X + alpha * P
        R = R - alpha * AP
        rsnew = (R * R).sum(dim=(1, 2, 3), keepdim=True)
        P = R + rsnew / (rsold + 1e-12) * P
        rsold = rsnew
    if sh > 1 or sw > 1:
        X = F.interpolate(X, size=(H, W), mode="bilinear", align_corners=False)
    return X


# ---------------------------------------------------------------------------- attention

CASES = [({}, {}), ({"alpha_kk": 0.3}, {"alpha_kk": 0.3}), ({"solver": "svd"}, {"solver": "svd"}),
         ({"polar_iters": 2, "use_kk": False}, {"iters": 2, "use_kk": False})]


@pytest.mark.parametrize("knobs,want", CASES, ids=["default", "alpha", "svd", "iters"])
def test_pa_attention_matches_the_official_pa_attn(enc, images, knobs, want):
    last = build_last_block({"name": "pearl", **knobs}, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images)
        got = enc.last_attention(trunk, last)
        out = enc.last_block(trunk, last)
        x = enc.last_inputs(trunk, last)
        B, H, N, d = x.q.shape
        ref = official_pa(x.q.reshape(B * H, N, d), x.k.reshape(B * H, N, d), **want)
        block = enc.visual.transformer.resblocks[-1]
        v = x.v.transpose(1, 2).reshape(B, N, H * d)
        heads = [ref.view(B, H, N, N)[:, h] @ v[..., h * d:(h + 1) * d] for h in range(H)]
        want_out = block.attn.out_proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(got, ref.view(B, H, N, N), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)  # no residual, no MLP


def test_newton_schulz_is_the_iteration_and_svd_the_exact_rotation():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 8, 8, generator=g)
    torch.testing.assert_close(polar_newton_schulz(m), official_polar(m), atol=1e-6, rtol=1e-5)
    r = polar_svd(m)
    torch.testing.assert_close(r @ r.transpose(-2, -1), torch.eye(8).expand(3, -1, -1),
                               atol=1e-5, rtol=1e-5)
    close = polar_newton_schulz(m, iters=30)  # converges to the polar factor
    torch.testing.assert_close(close, r, atol=1e-3, rtol=1e-3)
    assert (polar_newton_schulz(m, 5) - r).abs().max() > 1e-3  # five steps: approximate


def test_the_cls_weight_goes_to_the_prefix_tokens():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 10, 4, generator=g)
    one = pa_attention(q, k, prefix=1)
    torch.testing.assert_close(one.reshape(6, 10, 10), official_pa(q.reshape(6, 10, 4),
                                                                    k.reshape(6, 10, 4)))
    assert not torch.allclose(pa_attention(q, k, prefix=0), one)


# ---------------------------------------------------------------------------------- TLP


@pytest.mark.parametrize("hw,grid", [((170, 250), 80), ((60, 90), 80), ((200, 260), 224)],
                         ids=["pooled-2x3", "unpooled", "city-grid"])
@pytest.mark.parametrize("agree", ["diagonal", "matrix"])
def test_tlp_matches_the_official_forward(hw, grid, agree):
    g = torch.Generator().manual_seed(2)
    q, e = 6, 16
    image = torch.randn(3, *hw, generator=g)
    logits = 0.05 * torch.randn(q, *hw, generator=g) + 0.2
    logits[2, : hw[0] // 2] += 0.05  # a region that the text agrees on
    text = F.normalize(torch.randn(q, e, generator=g), dim=-1)
    got = refine.TLP(grid=grid, agree=agree)(image, logits, text)
    want = official_tlp(image[None], logits[None], text, grid, agree == "matrix")[0]
    assert got.shape == logits.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, logits, atol=1e-4)  # it does change the logits


def test_tlp_reads_only_the_diagonal_by_default():
    """The official einsum takes S_cc: with text queries that make S non-diagonal, the two
    agreement rules differ, and ``diagonal`` equals a run with S's off-diagonal zeroed."""
    g = torch.Generator().manual_seed(4)
    image, logits = torch.randn(3, 50, 70, generator=g), 0.1 * torch.randn(4, 50, 70, generator=g)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    diag = refine.TLP()(image, logits, text)
    assert not torch.allclose(diag, refine.TLP(agree="matrix")(image, logits, text))
    s = refine.text_affinity(text, 0.5, 10.0)
    assert (s.diagonal() > 0.85).all() and torch.allclose(s.sum(1), torch.ones(4), atol=1e-5)


def test_the_segmenter_refines_with_tlp_and_its_class_map_is_the_classes_of_it(enc, queries):
    from sclip_lab import segment
    from sclip_lab.pipeline import Head, Preprocess, Segmenter

    spec = head_spec({"name": "pearl"}, postprocess={"name": "tlp", "grid": 16})
    head = Head(build_last_block({"name": "pearl"}, None, enc), spec.refine, spec)
    post = segment.PostProcess(torch.arange(5), 5, 40.0, 0.0, None)
    seg = Segmenter(enc, [head], queries, post, Preprocess(64, 64, 32))
    image = torch.randint(0, 255, (70, 90, 3), dtype=torch.uint8).numpy()
    logits = seg.logits(image)
    plain = Segmenter(enc, [Head(head.last)], queries, post, Preprocess(64, 64, 32))
    raw = plain.logits(image)
    guide = segment.upsample(seg.prep(image).float(), (70, 90))
    torch.testing.assert_close(logits, refine.TLP(grid=16)(guide, raw, queries))
    assert torch.equal(seg.class_map(image), seg.classes(logits))


@pytest.mark.parametrize("section,match", [
    ({"name": "tlp", "grid": 0}, "postprocess.grid=0 is impossible: use an integer ≥ 1"),
    ({"name": "tlp", "tau_s": 0.0}, "postprocess.tau_s=0.0 is impossible: use a value > 0"),
    ({"name": "tlp", "agree": "full"}, "postprocess.agree='full'"),
    ({"name": "tlp", "steps": 3}, "postprocess=tlp has no knob 'steps'"),
    ({"name": "tlp", "cg_iters": -1}, "postprocess.cg_iters=-1 is impossible"),
])
def test_bad_tlp_knobs_are_one_line(section, match):
    with pytest.raises(ConfigError, match=match):
        head_spec({"name": "pearl"}, postprocess=section)


def test_bad_pearl_knobs_are_one_line(enc):
    with pytest.raises(ConfigError, match="solver='exact'"):
        build_last_block({"name": "pearl", "solver": "exact"}, None, enc)
    with pytest.raises(ConfigError, match="polar_iters=0 is out of range"):
        build_last_block({"name": "pearl", "polar_iters": 0}, None, enc)


def test_protocol_pearl_is_naclips_with_tlp():
    from hydra import compose, initialize_config_dir

    from sclip_lab import data
    from sclip_lab.config import CONF_DIR
    from sclip_lab.head_spec import head_spec_of

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for ds in ("voc21", "context60", "coco_object", "voc20", "cityscapes", "context59",
                   "ade20k", "coco_stuff"):
            ours = compose("run", overrides=[f"dataset={ds}", "protocol=pearl",
                                             "attention=pearl"])
            theirs = compose("run", overrides=[f"dataset={ds}", "protocol=naclip"])
            a, b = data.spec_from_config(ours.dataset), data.spec_from_config(theirs.dataset)
            assert (a.short_side, a.logit_scale, a.prob_thd, a.area_thd, a.classes) == (
                b.short_side, b.logit_scale, b.prob_thd, b.area_thd, b.classes), ds
            assert ours.preprocess.window == theirs.preprocess.window
            spec = head_spec_of(ours)
            assert spec.postprocess == "tlp"
            assert spec.refine.grid == (224 if ds == "cityscapes" else 80)
            assert dict(spec.given)["alpha_kk"] == (0.3 if ds in ("ade20k", "cityscapes")
                                                    else 0.08)
