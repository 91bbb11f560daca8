"""SFP against an independent transcription of the official code (fp32, the tiny random
4-block ViT, square and non-square patch grids, two windows).

Transcribed (rewritten here in plain torch, one window and one head at a time) from
github.com/Kimsure/SFP @ 2804f5b, ``SFP_ICCV/clip/model.py``:

* ``VisionTransformer.forward`` L242–356: blocks 1…D−1 with their per-head attention
  (``need_weights=True, average_attn_weights=False``), each stored map's CLS row ×
  res_cls·res_scale; on block D−1's map the SOM detector (head mean, c_j = A[0, j],
  s_j = A[j, j], candidates c_j > s_j sorted descending, the first 10); ``mean_interpolation``
  at (i // feat_w, i % feat_w), feat_w = the number of rows (literal on a square grid,
  (i // w, i % w) on the non-square one); pre_sim of the repaired h_pre, < 0.4 → 0 in place;
  ``adaptively_aggregate``; ``custom_attn`` (three softmaxes / 3) + 0.3·CLS; post_sim of
  h_post; the second pass ``sinkhorn_attn`` (the similarity term alone, v of LN1(Σ h)).
* the segmentor's ``forward_feature``: unit features, cosine with the text.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_methods_scclip import lab as scclip_lab
from test_methods_scclip import official_lof, official_logits, official_repair

from sclip_lab import attention as attn
from sclip_lab.errors import ConfigError
from sclip_lab.pipeline import build_last_block

ATOL, RTOL = 1e-5, 1e-4


def lab(enc, images, section, queries=None):
    """``(block output, logits or None, trunk)`` of the lab (SC-CLIP's test helper)."""
    out, logits, _, trunk = scclip_lab(enc, images, section, queries)
    return out, logits, trunk


# The official h_9, h_4, h_4..h_10 of 12 blocks moved into the tiny model's trunk.
BASE = {"name": "sfp", "pre_layer": 2, "post_layer": 1, "multi_start": 1, "multi_end": 3}


def block_with_weights(blk, x):
    """One official ``ResidualAttentionBlock.forward`` (L190–194): output and per-head map."""
    z = blk.ln_1(x)[None]
    out, w = blk.attn(z, z, z, need_weights=True, average_attn_weights=False)
    x = x + out[0]
    return x + blk.mlp(blk.ln_2(x)), w[0]


def som(attn_map, count=10):
    m = attn_map.mean(0)
    c, s = m[0, 1:], torch.diag(m[1:, 1:])
    locs = torch.nonzero(c > s).squeeze(1)
    order = torch.sort(c[locs], descending=True).indices
    return locs[order[:count]].tolist()


def three_term(block, z, sim):
    """``custom_attn`` on one window's LN1 patches ``z`` (hw, D), head by head."""
    mha = block.attn
    D, H = z.shape[-1], mha.num_heads
    d = D // H
    q, k, v = F.linear(z, mha.in_proj_weight, mha.in_proj_bias).split(D, dim=-1)
    s = (sim - sim.mean()) * 3.0
    s[s < 0.0] = float("-inf")
    heads, maps = [], []
    for h in range(H):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
        a = (torch.softmax(kh @ kh.T * d ** -0.5, -1) + torch.softmax(qh @ qh.T * d ** -0.5, -1)
             + torch.softmax(s, -1)) / 3
        heads.append(a @ vh)
        maps.append(a)
    return mha.out_proj(torch.cat(heads, dim=-1)), torch.stack(maps)


def similarity_only(block, z, sim):
    """``sinkhorn_attn``: softmax of the scaled, masked similarity, the same for each head."""
    mha = block.attn
    D = z.shape[-1]
    v = F.linear(z, mha.in_proj_weight[2 * D:], mha.in_proj_bias[2 * D:])
    s = (sim - sim.mean()) * 3.0
    s[s < 0.0] = float("-inf")
    return mha.out_proj(torch.softmax(s, -1) @ v)


def aggregate(t, sim):
    return (sim / (sim.sum(-1, keepdim=True) + 1e-6)) @ t


def official(enc, images, detector="som", count=10, pre=2, post=1, ms=1, me=3,
             res_cls=0.3, res_scale=5.0):
    rows, cols = images.shape[-2] // 16, images.shape[-1] // 16
    feat_w = rows if rows == cols else cols
    blocks = enc.visual.transformer.resblocks
    outs, all_maps, picked = [], [], []
    for b in range(images.shape[0]):
        x, _ = enc.embed(images[b:b + 1])
        x = x[0]
        hidden = []
        for blk in blocks[:-1]:
            x, amap = block_with_weights(blk, x)
            amap[:, 0, 1:] *= res_cls * res_scale
            hidden.append(x)
        if detector == "som":
            outliers = som(amap, count)
        elif detector == "l2":
            outliers = torch.sort(x[1:].norm(dim=1), descending=True).indices[:count].tolist()
        else:
            outliers = official_lof(x[1:], 30, 0.05)
        picked.append(sorted(outliers))
        patch = official_repair(x[1:], outliers, rows, cols, feat_w)
        ref = official_repair(hidden[pre - 1][1:], outliers, rows, cols, feat_w)
        ref = ref / ref.norm(dim=1, keepdim=True)
        pre_sim = ref @ ref.T
        pre_sim[pre_sim < 0.4] = 0.0
        patch = aggregate(patch, pre_sim)
        cls = x[:1]
        y, maps = three_term(blocks[-1], blocks[-1].ln_1(patch), pre_sim)
        y = y + res_cls * cls
        aux = hidden[post - 1][1:]
        aux = aux / aux.norm(dim=1, keepdim=True)
        post_sim = aux @ aux.T
        post_sim[post_sim < 0.4] = 0.0
        y = aggregate(y, post_sim)
        r = sum(hidden[i] for i in range(ms - 1, me))
        y2 = similarity_only(blocks[-1], blocks[-1].ln_1(r[1:]), pre_sim) + res_cls * r[:1]
        outs.append(y + aggregate(y2, post_sim))
        all_maps.append(maps)
    return torch.stack(outs), torch.stack(all_maps), picked


CASES = [({}, {}), ({"detector": "l2"}, {"detector": "l2"}),
         ({"detector": "lof"}, {"detector": "lof"}),
         ({"outliers": 3, "res_cls": 0.5, "res_scale": 2.0, "pre_layer": 3, "post_layer": 2,
           "multi_start": 2}, {"count": 3, "res_cls": 0.5, "res_scale": 2.0, "pre": 3,
                               "post": 2, "ms": 2})]


@pytest.mark.parametrize("size", [(96, 112), (96, 96)], ids=["6x7", "6x6"])
@pytest.mark.parametrize("knobs,want", CASES, ids=["som", "l2", "lof", "knobs"])
def test_sfp_matches_the_official_forward(enc, queries, size, knobs, want):
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    got, logits, trunk = lab(enc, images, {**BASE, **knobs}, queries)
    with torch.no_grad():
        tokens, maps, picked = official(enc, images, **want)
        want_logits = official_logits(enc, tokens, queries, trunk.grid)
    torch.testing.assert_close(got[:, 1:], tokens, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits, want_logits, atol=ATOL, rtol=RTOL)
    last = build_last_block({**BASE, **knobs}, None, enc)
    with torch.no_grad():
        amap = enc.last_attention(trunk, last)  # figures: the main pass, a zero CLS slot
    torch.testing.assert_close(amap[:, :, 1:, 1:], maps, atol=1e-6, rtol=1e-5)
    assert amap[..., 0, :].abs().max() == 0 and amap[..., 0].abs().max() == 0
    if want.get("detector", "som") == "som":
        from sclip_lab.attention.sfp import block_map, som_outliers

        x = enc.last_inputs(trunk, last)
        found = som_outliers(block_map(x, 3), knobs.get("outliers", 10),
                             knobs.get("res_cls", 0.3) * knobs.get("res_scale", 5.0))
        assert [torch.where(f)[0].tolist() for f in found] == picked
        assert 0 < found.sum() <= 2 * knobs.get("outliers", 10)


def test_block_maps_are_the_trunks_own_and_the_cls_slot_is_vanillas(enc, images):
    got, _, trunk = lab(enc, images, BASE)
    vanilla, _, _ = lab(enc, images, {"name": "vanilla"})
    torch.testing.assert_close(got[:, 0], vanilla[:, 0], atol=1e-6, rtol=1e-5)
    last = build_last_block({"name": "vanilla"}, None, enc)
    with torch.no_grad():
        borrowed = enc.trunk(images, (3,), (2,)).early[3]
        from sclip_lab.attention.sfp import block_map

        x = enc.last_inputs(enc.trunk(images, (), (2,)), last)
        assert torch.equal(block_map(x, 3), borrowed)  # recomputed bit for bit
    one, _, _ = lab(enc, images[1:], BASE)  # per-window statistics: batching is neutral
    torch.testing.assert_close(one, got[1:], atol=1e-5, rtol=1e-5)


def test_declared_inputs_and_defaults():
    variant = attn.get_variant("sfp")
    knobs, block = variant.bind({"name": "sfp"}, 12)
    assert variant.hidden(knobs, 12) == (4, 5, 6, 7, 8, 9, 10)  # h_10 = h_{D−2} for SOM
    assert variant.hidden({**knobs, "detector": "l2"}, 24) == (4, 5, 6, 7, 8, 9, 10)
    assert variant.hidden(knobs, 24) == (4, 5, 6, 7, 8, 9, 10, 22)
    assert block == {"residual": False, "ffn": False, "alpha": 1.0}
    assert (knobs["detector"], knobs["outliers"], knobs["res_cls"], knobs["res_scale"],
            knobs["beta"], knobs["sim_scale"]) == ("som", 10, 0.3, 5.0, 0.4, 3.0)
    assert variant.requires == {"cls", "blocks", "hidden"}


@pytest.mark.parametrize("section,match", [
    ({**BASE, "detector": "norm"}, "detector='norm'"),
    ({**BASE, "outliers": -1}, "outliers=-1 is out of range"),
    ({**BASE, "multi_start": 3, "multi_end": 2}, "attention=sfp: multi_start=3 > multi_end=2"),
    ({**BASE, "pre_layer": 4}, "pre_layer=4 is out of range"),
    ({**BASE, "sim_scale": 0.0}, "sim_scale=0.0 is out of range"),
])
def test_bad_knobs_are_one_line(enc, section, match):
    with pytest.raises(ConfigError, match=match):
        build_last_block(section, None, enc)


def test_protocol_sfp_is_scclips_with_ade_384_and_people():
    from hydra import compose, initialize_config_dir

    from sclip_lab import data
    from sclip_lab.config import CONF_DIR

    def spec(ds, *extra):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("run", overrides=[f"dataset={ds}", *extra])
        return data.spec_from_config(cfg.dataset), cfg

    for ds in ("voc21", "context60", "coco_object", "voc20", "cityscapes", "context59",
               "ade20k", "coco_stuff"):
        ours, cfg = spec(ds, "protocol=sfp", "attention=sfp")
        theirs, _ = spec(ds, "protocol=scclip")
        assert (ours.logit_scale, ours.prob_thd, ours.area_thd) == (
            theirs.logit_scale, theirs.prob_thd, theirs.area_thd), ds
        assert ours.short_side == (384 if ds == "ade20k" else theirs.short_side), ds
        assert (cfg.preprocess.window, cfg.preprocess.stride) == (224, 112)
        assert cfg.postprocess.name == "none"
        changed = {i: c for i, (c, o) in enumerate(zip(ours.classes, theirs.classes)) if c != o}
        assert all(c.split(", ")[0] == "people" for c in changed.values())
        assert set(changed) == {"voc21": {15}, "voc20": {14}, "cityscapes": {11}}.get(ds, set())


def test_som_takes_only_patches_whose_cls_attention_exceeds_their_own():
    """A map where the patches of largest CLS attention attend more to themselves: SOM
    skips them, and finds fewer than 10 where fewer qualify (official ``som`` above)."""
    from sclip_lab.attention.sfp import som_outliers

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 2, 26, 26, generator=g)
    logits[:, :, 0, 1:6] += 4.0  # the CLS row's favourites: patches 0..4
    idx = torch.arange(1, 6)
    logits[:, :, idx, idx] += 9.0  # ... which attend mostly to themselves
    logits[:, :, 0, 6:9] += 2.0  # three more that do not
    a = logits.softmax(-1)
    got = torch.where(som_outliers(a, 10, 1.0)[0])[0].tolist()
    assert got == sorted(som(a[0], 10)) and not set(got) & {0, 1, 2, 3, 4}
    assert 0 < len(got) < 10  # fewer qualify than are asked for
    assert torch.where(som_outliers(a, 2, 1.0)[0])[0].tolist() == sorted(som(a[0], 2))
    assert not som_outliers(a, 0, 1.0).any()
