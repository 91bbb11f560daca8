"""SC-CLIP against an independent transcription of the official code (fp32, the tiny random
4-block ViT, a non-square 6×7 patch grid, two windows).

Transcribed (rewritten here in plain torch, one window and one head at a time, loops where
the official uses them) from github.com/SuleBai/SC-CLIP @ 0417ba9, ``clip/model.py``:

* ``lof_pytorch`` (L208–227): squared Euclidean distances, the k nearest others, reach =
  max(d_ij, the point's own k-distance), LRD = k / mean reach, LOF = mean of the neighbours'
  LRD over the point's, outliers LOF > quantile(LOF, 1 − contamination). Written here as a
  literal double loop over the tokens.
* ``mean_interpolation`` (L348–373): each outlier cell := mean of its in-grid non-outlier
  8-neighbours, kept when there are none. The cell of token i is (i // feat_w, i % feat_w)
  with feat_w = the number of rows (L275): the transcription takes it literally on a square
  grid and as (i // w, i % w) on the non-square one (where the literal rule is wrong).
* ``VisionTransformer.forward`` (L254–316), ``custom_attn`` (L318–341) and
  ``adaptively_aggregate`` (L343–346), the segmentor's ``forward_feature`` (unit features,
  cosine with the text).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab import attention as attn
from sclip_lab import records
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError
from sclip_lab.pipeline import build_last_block

ATOL, RTOL = 1e-5, 1e-4
# The official layers (h_9, h_4, h_4..h_10 of 12 blocks) moved into the tiny model's trunk
# (h_1..h_3; the knobs are 1-indexed blocks).
BASE = {"name": "scclip", "pre_layer": 2, "post_layer": 1, "multi_start": 1, "multi_end": 3}


def lab(enc, images, section, queries=None):
    """``(block output, logits or None, main attention map, trunk)`` of the lab."""
    last = build_last_block(section, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images, last.early_layers, last.hidden_layers)
        logits = None if queries is None else enc.logits(trunk, last, queries)
        return enc.last_block(trunk, last), logits, enc.last_attention(trunk, last), trunk


# --------------------------------------------------------- official transcription


def official_lof(p, k, contamination, own_reach=True):
    """The outlier indices of the rows of ``p`` (n, C), literally."""
    n = p.shape[0]
    d = [[float(((p[i] - p[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    knn = [sorted((j for j in range(n) if j != i), key=lambda j: d[i][j])[:k] for i in range(n)]
    kdist = [d[i][knn[i][-1]] for i in range(n)]
    lrd = [k / (sum(max(d[i][j], kdist[i] if own_reach else kdist[j]) for j in knn[i]) / k)
           for i in range(n)]
    lof = torch.tensor([sum(lrd[j] / lrd[i] for j in knn[i]) / k for i in range(n)])
    threshold = torch.quantile(lof, 1 - contamination)
    return [i for i in range(n) if lof[i] > threshold]


def official_repair(p, outliers, rows, cols, feat_w):
    """``mean_interpolation`` of the (hw, C) patches at the outlier cells."""
    cells = {(i // feat_w, i % feat_w) for i in outliers}
    grid = p.reshape(rows, cols, -1)
    out = grid.clone()
    for r, c in cells:
        ring = [grid[r + dr, c + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                if (dr or dc) and 0 <= r + dr < rows and 0 <= c + dc < cols
                and (r + dr, c + dc) not in cells]
        if ring:
            out[r, c] = torch.stack(ring).mean(0)
    return out.reshape(rows * cols, -1)


def rownorm_agg(sim, t, beta):
    s = sim.clone()
    s[s < beta] = 0.0
    return (s / (s.sum(-1, keepdim=True) + 1e-6)) @ t


def custom_attn(block, z, mid, scale_m):
    """``custom_attn`` on one window's LN1 output ``z`` (hw, D): per head, q unused."""
    mha = block.attn
    D, H = z.shape[-1], mha.num_heads
    d = D // H
    _, k, v = F.linear(z, mha.in_proj_weight, mha.in_proj_bias).split(D, dim=-1)
    m = (mid - mid.mean()) * scale_m
    m[m < 0.0] = float("-inf")
    heads = []
    for h in range(H):
        kh, vh = k[:, h * d:(h + 1) * d], v[:, h * d:(h + 1) * d]
        a = (torch.softmax(m, -1) + torch.softmax(kh @ kh.T * d ** -0.5, -1)) / 2
        heads.append(a @ vh)
    return mha.out_proj(torch.cat(heads, dim=-1)), a


def official(enc, images, k=30, c=0.05, pre=2, post=1, ms=1, me=3, beta=0.4, scale_m=3.0,
             res_cls=0.3, own_reach=True, pre_agg=True, post_agg=True, multi=True):
    """SC-CLIP's patch tokens ``(B, hw, D)`` and each window's last-head attention."""
    rows, cols = images.shape[-2] // 16, images.shape[-1] // 16
    feat_w = rows if rows == cols else cols  # L275 literally where it is right
    blocks = enc.visual.transformer.resblocks
    outs, maps = [], []
    for b in range(images.shape[0]):
        x, _ = enc.embed(images[b:b + 1])
        x = x[0]
        feats = []
        for blk in blocks[:-1]:
            x = blk(x[None])[0]
            feats.append(x)
        cls = x[:1]
        outliers = official_lof(x[1:], k, c, own_reach)
        xp = official_repair(x[1:], outliers, rows, cols, feat_w)
        f = official_repair(feats[pre - 1][1:], outliers, rows, cols, feat_w)
        f = f / f.norm(dim=-1, keepdim=True)
        mid = f @ f.T
        if pre_agg:
            xp = rownorm_agg(mid, xp, beta)
        y, a = custom_attn(blocks[-1], blocks[-1].ln_1(xp), mid, scale_m)
        y = y + res_cls * cls
        g = feats[post - 1][1:]
        g = g / g.norm(dim=-1, keepdim=True)
        after = g @ g.T
        if post_agg:
            y = rownorm_agg(after, y, beta)
        if multi:
            r = sum(feats[i] for i in range(ms - 1, me))
            y2, _ = custom_attn(blocks[-1], blocks[-1].ln_1(r[1:]), mid, scale_m)
            y2 = y2 + res_cls * r[:1]
            y = y + (rownorm_agg(after, y2, beta) if post_agg else y2)
        outs.append(y)
        maps.append(a)
    return torch.stack(outs), torch.stack(maps)


def official_logits(enc, tokens, queries, grid):
    feats = enc.visual.ln_post(tokens) @ enc.visual.proj
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return (feats @ queries.T).permute(0, 2, 1).reshape(tokens.shape[0], -1, *grid)


# ------------------------------------------------------------------------- the method

CASES = [
    ({}, {}),
    ({"beta": 0.7, "lof_k": 8, "contamination": 0.1, "pre_layer": 3, "post_layer": 2,
      "multi_start": 2, "multi_end": 3}, {"beta": 0.7, "k": 8, "c": 0.1, "pre": 3, "post": 2,
                                          "ms": 2, "me": 3}),
    ({"lof_reach": "neighbour", "lof_k": 5, "sim_scale": 1.5, "res_cls": -0.2},
     {"own_reach": False, "k": 5, "scale_m": 1.5, "res_cls": -0.2}),
    ({"pre_aggregate": False, "multi_level": False, "contamination": 0.0},
     {"pre_agg": False, "multi": False, "c": 0.0}),
    ({"post_aggregate": False}, {"post_agg": False}),
]


@pytest.mark.parametrize("knobs,want", CASES, ids=lambda c: ",".join(c) or "default")
def test_scclip_matches_the_official_forward_on_a_non_square_grid(enc, images, queries,
                                                                  knobs, want):
    got, logits, amap, trunk = lab(enc, images, {**BASE, **knobs}, queries)
    assert trunk.grid == (6, 7)
    with torch.no_grad():
        tokens, maps = official(enc, images, **want)
        want_logits = official_logits(enc, tokens, queries, trunk.grid)
    torch.testing.assert_close(got[:, 1:], tokens, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=RTOL)
    # the main pass's map (last head): the official hw×hw patch attention, CLS key masked
    torch.testing.assert_close(amap[:, -1, 1:, 1:], maps, atol=1e-6, rtol=1e-5)
    assert amap[..., 0].abs().max() == 0
    torch.testing.assert_close(amap.sum(-1), torch.ones_like(amap.sum(-1)))


def test_square_grid_follows_the_official_index_literally(enc, queries):
    images = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    got, logits, _, trunk = lab(enc, images, BASE, queries)
    with torch.no_grad():
        tokens, _ = official(enc, images)
    torch.testing.assert_close(got[:, 1:], tokens, atol=ATOL, rtol=RTOL)
    # the literal rule on the 6×7 grid: token 41 (row 5, column 6) would be "row 6"
    assert (41 // 6, 41 % 6) != (41 // 7, 41 % 7) and 41 // 6 == 6


def test_the_anomaly_tokens_are_found_and_repaired(enc, images):
    from sclip_lab.attention.scclip import lof_outliers, repair

    with torch.no_grad():
        trunk = enc.trunk(images)
        p = trunk.x[:, 1:]
        outliers = lof_outliers(p, 30, 0.05)
        fixed = repair(p, outliers, trunk.grid)
    for b in range(2):
        assert torch.where(outliers[b])[0].tolist() == official_lof(p[b], 30, 0.05)
    assert outliers.sum() > 0
    assert torch.equal(fixed[~outliers], p[~outliers]) and not torch.equal(fixed, p)
    assert not lof_outliers(p, 30, 0.0).any()  # contamination 0: nothing to repair


def test_structure_cls_slot_batches_and_hidden_states(enc, images):
    got, _, _, trunk = lab(enc, images, BASE)
    assert got.shape == (2, 43, enc.visual.transformer.width)
    vanilla, _, _, _ = lab(enc, images, {"name": "vanilla"})
    torch.testing.assert_close(got[:, 0], vanilla[:, 0], atol=1e-6, rtol=1e-5)
    one, _, _, _ = lab(enc, images[1:], BASE)  # per-window statistics: batching is neutral
    torch.testing.assert_close(one, got[1:], atol=1e-5, rtol=1e-5)
    last = build_last_block(BASE, None, enc)
    assert last.hidden_layers == (1, 2) and set(trunk.hidden) == {1, 2}  # h_3 is the input
    variant = attn.get_variant("scclip")
    knobs, block = variant.bind({"name": "scclip"}, 12)
    assert variant.hidden(knobs, 12) == (4, 5, 6, 7, 8, 9, 10)
    assert block == {"residual": False, "ffn": False, "alpha": 1.0}
    assert (knobs["lof_k"], knobs["contamination"], knobs["beta"], knobs["res_cls"],
            knobs["sim_scale"]) == (30, 0.05, 0.4, 0.3, 3.0)


def test_attention_only_variant_is_the_official_term_on_the_usual_block(enc, images):
    section = {"name": "scclip_attention", "pre_layer": 2}
    got, _, amap, trunk = lab(enc, images, section)
    block = enc.visual.transformer.resblocks[-1]
    with torch.no_grad():
        for b in range(2):
            p = trunk.x[b, 1:]
            cells = official_lof(p, 30, 0.05)
            f = official_repair(trunk.hidden[2][b, 1:], cells, 6, 7, 7)
            f = f / f.norm(dim=-1, keepdim=True)
            _, a = custom_attn(block, block.ln_1(trunk.x[b])[1:], f @ f.T, 3.0)
            torch.testing.assert_close(amap[b, -1, 1:, 1:], a, atol=1e-6, rtol=1e-5)
        D = trunk.x.shape[-1]
        v = F.linear(block.ln_1(trunk.x), block.attn.in_proj_weight[2 * D:],
                     block.attn.in_proj_bias[2 * D:])
        o = block.attn.out_proj(attn.merge_heads(amap @ attn.split_heads(v, 2)))
    torch.testing.assert_close(got, o, atol=ATOL, rtol=RTOL)  # no residual, no MLP


def test_segmenter_runs_it_in_the_shared_trunk_pass(enc, queries):
    from sclip_lab import segment
    from sclip_lab.pipeline import Head, Preprocess, Segmenter

    heads = [Head(build_last_block({**BASE, "lof_k": 5}, None, enc)),
             Head(build_last_block({"name": "csa"}, None, enc))]
    post = segment.PostProcess(torch.arange(5), 5, 40.0, 0.0, None)
    seg = Segmenter(enc, heads, queries, post, Preprocess(64, 64, 32))
    out = seg.logits_many([torch.randn(3, 64, 96)], [(64, 96)])
    assert [tuple(h[0].shape) for h in out] == [(5, 64, 96)] * 2
    assert all(torch.isfinite(h[0]).all() for h in out)


@pytest.mark.parametrize("section,match", [
    ({**BASE, "lof_k": 0}, "lof_k=0 is out of range"),
    ({**BASE, "lof_k": 2.5}, "lof_k=2.5 is not an integer"),
    ({**BASE, "contamination": 1.5}, "contamination=1.5 is out of range"),
    ({**BASE, "contamination": float("nan")}, "contamination=nan must be a finite number"),
    ({**BASE, "beta": float("inf")}, "beta=inf must be a finite number"),
    ({**BASE, "res_cls": float("nan")}, "res_cls=nan must be a finite number"),
    ({**BASE, "sim_scale": 0.0}, "sim_scale=0.0 is out of range"),
    ({**BASE, "pre_layer": 4}, "pre_layer=4 is out of range"),  # the last block: no
    ({**BASE, "post_layer": 0}, "post_layer=0 is out of range"),
    ({**BASE, "multi_start": 3, "multi_end": 2}, "multi_start=3 > multi_end=2"),
    ({**BASE, "lof_reach": "mean"}, "lof_reach='mean'; choose one of"),
    ({"name": "scclip"}, "pre_layer=9 is out of range"),  # defaults need a 12-block model
    ({"name": "scclip_attention", "pre_layer": 2, "post_layer": 1}, "no knob 'post_layer'"),
])
def test_scclip_refuses_impossible_knobs_in_one_line(enc, section, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_last_block(section, None, enc)
    assert "\n" not in str(err.value)


def test_too_few_patches_for_the_lof_is_one_line(enc, images):
    with pytest.raises(ConfigError, match="lof_k=42 needs more than 42 patches") as err:
        lab(enc, images, {**BASE, "lof_k": 42})  # 6×7 = 42 patches
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------- configs


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run", overrides=list(overrides)), resolve=True)


def test_configs_carry_the_official_values_and_are_keyed():
    a = resolved("attention=scclip")["attention"]
    assert {k: a[k] for k in ("lof_k", "contamination", "lof_reach", "pre_layer", "post_layer",
                              "multi_start", "multi_end", "beta", "sim_scale", "res_cls")} == {
        "lof_k": 30, "contamination": 0.05, "lof_reach": "own", "pre_layer": 9,
        "post_layer": 4, "multi_start": 4, "multi_end": 10, "beta": 0.4, "sim_scale": 3.0,
        "res_cls": 0.3}
    b = resolved("attention=scclip_attention")["attention"]
    assert (b["name"], b["pre_layer"], b["lof_k"]) == ("scclip_attention", 9, 30)
    keys = {records.result_key(resolved(*o)) for o in (
        ["attention=scclip"], ["attention=scclip_attention"], ["attention=scclip",
                                                               "attention.beta=0.5"])}
    assert len(keys) == 3
    summary = records.summary_of(resolved("attention=scclip", "attention.lof_k=20"), {})
    assert (summary["lof_k"], summary["res_cls"], summary["residual"]) == (20, 0.3, False)


@pytest.mark.parametrize("dataset,want", [
    ("voc21", (336, 224, 112, 50.0, 0.15, 0.1)),
    ("context60", (336, 224, 112, 40.0, 0.15, None)),
    ("coco_object", (336, 224, 112, 55.0, 0.35, None)),
    ("voc20", (336, 224, 112, 40.0, 0.0, None)),
    ("cityscapes", (560, 224, 112, 40.0, 0.0, None)),
    ("coco_stuff", (336, 224, 112, 40.0, 0.0, None)),
])
def test_scclip_protocol(dataset, want):
    cfg = resolved("protocol=scclip", "attention=scclip", f"dataset={dataset}")
    p, d = cfg["preprocess"], cfg["dataset"]
    assert (p["short_side"], p["window"], p["stride"], d["logit_scale"], d["prob_thd"],
            d["area_thd"]) == want
    assert cfg["postprocess"]["name"] == "none" and cfg["protocol"]["name"] == "scclip"
