"""CLIP Surgery and GEM against independent transcriptions of the official code (fp32, tiny
random 4-block ViT, a non-square 6×7 grid, two images run one at a time as the official
code does), plus their structural identities and knob validation.

Transcribed (the computation, rewritten here in plain torch head by head, not copied):

* CLIP Surgery — github.com/xmed-lab/CLIP_Surgery @ d4696d4, ``clip/clip_surgery_model.py``:
  ``VisionTransformer.forward`` (L318–327 the last n blocks get ``Attention``; L349 the CLS of
  the new path is the original path's), ``Attention.forward`` (L71–103: q = k = v on the
  new path, scale d_h^-1/2, both paths through the same qkv/proj), and
  ``ResidualAttentionBlock.forward`` (L253–280: both attentions read ``ln_1(x_ori)``; the
  original path adds its MLP, the new one does not). ``clip/clip.py``
  ``clip_feature_surgery`` (L287–308), run per window (its reshape of w assumes B = 1).
* GEM — github.com/WalBouss/GEM @ 5fa677c, ``gem/gem_utils.py``:
  ``SelfSelfAttention.forward`` (L60–123) and ``GEMResidualBlock.forward`` (L131–149);
  ``gem/gem_wrapper.py`` ``apply_gem`` (L22–42, ``range(1, depth)``).
* GEM as ClearCLIP vendors it — github.com/mc-lan/ClearCLIP @ ad68a40,
  ``gem/gem_utils.py`` ``GEMResidualBlock.forward`` with ``ignore_residual`` (L149–150).

Each official forward runs here from the embedding ``h_0`` through every block (the plain
blocks by open_clip's own ``forward``), and is compared with ``enc.last_block`` on the lab's
trunk, and the feature surgery with ``enc.logits``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import with_random_layernorms
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab import records
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import head_spec
from sclip_lab.pipeline import build_last_block
from sclip_lab.pos_embed import DEFAULT_POS_EMBED
from sclip_lab.text import get_templates

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 96, 112, generator=gen)  # 6×7 patches
    x[1] = 0.4 * x[1] + 0.3  # another scale: GEM's adaptive τ differs per image
    return x


@pytest.fixture(scope="module")
def enc(enc):
    """The tiny encoder with random LayerNorm gains and biases: with open_clip's init (1, 0)
    every LN1 row has norm √D and GEM's adaptive τ would be one constant."""
    return with_random_layernorms(enc)


@pytest.fixture(scope="module")
def h0(enc, images):
    with torch.no_grad():
        return enc.embed(images)[0]


def lab(enc, images, section, queries=None, query_class=None):
    """The lab's last-block output (or logits) for ``section``, on a trunk that keeps the
    hidden states the built variant declares. The transcriptions here start from ``h0``,
    the default rule's embedding, so the trunk does too (each method's own resize of the
    position table is tested in test_pos_embed_rules.py)."""
    last = build_last_block({"pos_embed": DEFAULT_POS_EMBED, **section}, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images, last.early_layers, last.hidden_layers, last.pos_embed)
        assert trunk.grid == (6, 7)
        if queries is not None:
            return enc.logits(trunk, last, queries, query_class=query_class)
        return enc.last_block(trunk, last)


# ------------------------------------------------------------ official transcriptions


def heads(attn_layer, z):
    """One image's LN1 output (N, D) -> per-head q, k, v lists (N, d_h) and d_h."""
    H, D = attn_layer.num_heads, z.shape[-1]
    dh = D // H
    qkv = z @ attn_layer.in_proj_weight.T + attn_layer.in_proj_bias
    q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
    cut = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    return [q[:, s] for s in cut], [k[:, s] for s in cut], [v[:, s] for s in cut], dh


def proj(attn_layer, outs):
    return torch.cat(outs, dim=-1) @ attn_layer.out_proj.weight.T + attn_layer.out_proj.bias


def surgery_attention(attn_layer, z):
    """CLIP Surgery ``Attention.forward`` on one image -> [x (new path), x_ori]."""
    qs, ks, vs, dh = heads(attn_layer, z)
    scale = dh ** -0.5
    ori, new = [], []
    for q, k, v in zip(qs, ks, vs):
        ori.append(torch.softmax((q @ k.T) * scale, dim=-1) @ v)
        k = v
        q = k
        new.append(torch.softmax((q @ k.T) * scale, dim=-1) @ v)
    return proj(attn_layer, new), proj(attn_layer, ori)


def surgery_forward(blocks, x, n):
    """``transformer(x)`` with the last ``n`` blocks modified, then ``x[0] = x_ori[0]``."""
    D = len(blocks)
    state = x
    for i, block in enumerate(blocks):
        if i < D - n:
            state = block(state[None])[0]
            continue
        if isinstance(state, list):
            x, x_ori = state
        else:
            x, x_ori = state, state
        x_res, x_ori_res = surgery_attention(block.attn, block.ln_1(x_ori))
        x_ori = x_ori + x_ori_res
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        state = [x + x_res, x_ori]
    x, x_ori = state
    return torch.cat([x_ori[:1], x[1:]])


def feature_surgery(image_features, text_features):
    """``clip_feature_surgery`` (no redundant_feats) on one window (1, N, C)."""
    prob = image_features[:, :1, :] @ text_features.t()
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n_t, n_i, c = (image_features.shape[0], text_features.shape[0],
                      image_features.shape[1], image_features.shape[2])
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats = feats * w.reshape(1, 1, n_t, 1)
    feats = feats - feats.mean(2, keepdim=True)
    return feats.sum(-1)


def gem_attention(attn_layer, z, ss_attn_iter, ss_attn_temp):
    """GEM ``SelfSelfAttention.forward`` on one image -> [x (GEM path), x_ori]."""
    qs, ks, vs, dh = heads(attn_layer, z)
    scale = dh ** -0.5
    inv_temp = z.norm(dim=-1).mean() * scale if ss_attn_temp is None else ss_attn_temp
    ori, new = [], []
    for q, k, v in zip(qs, ks, vs):
        ori.append(torch.softmax((q @ k.T) * scale, dim=-1) @ v)
        xs = [v, k, q]
        for _ in range(ss_attn_iter):
            xs = [F.normalize(s, dim=-1) for s in xs]
            xs = [torch.softmax((s @ s.T) * inv_temp, dim=-1) @ s for s in xs]
        xs = [F.normalize(s, dim=-1) for s in xs]
        outs = [torch.softmax((s @ s.T) * inv_temp, dim=-1) @ v for s in xs]
        new.append((outs[0] + outs[1] + outs[2]) / 3)
    return proj(attn_layer, new), proj(attn_layer, ori)


def gem_forward(blocks, x, depth, ss_attn_iter=1, ss_attn_temp=None, ignore_residual=False):
    """``transformer(x)`` with ``resblocks[-i]`` wrapped for i in range(1, depth)."""
    D = len(blocks)
    state = x
    for i, block in enumerate(blocks):
        if i < D - (depth - 1):
            state = block(state[None])[0]
            continue
        x_gem, q_x = state if isinstance(state, list) else (state, state)
        x_gem_res, x_ori_res = gem_attention(block.attn, block.ln_1(q_x), ss_attn_iter,
                                             ss_attn_temp)
        x_ori = q_x + x_ori_res
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        x_gem = x_gem_res if ignore_residual else x_gem + x_gem_res
        state = [x_gem, x_ori]
    return state[0]


def official(fn, enc, h0):
    blocks = list(enc.visual.transformer.resblocks)
    with torch.no_grad():
        return torch.stack([fn(blocks, x) for x in h0])


# ------------------------------------------------------------------ CLIP Surgery


@pytest.mark.parametrize("n", [1, 2, 3])
def test_surgery_matches_the_official_dual_path(enc, images, h0, n):
    ref = official(lambda b, x: surgery_forward(b, x, n), enc, h0)
    got = lab(enc, images, {"name": "surgery", "depth": n})
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_feature_surgery_matches_the_official_readout(enc, images, h0):
    queries = F.normalize(torch.randn(5, enc.visual.proj.shape[1],
                                      generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():
        tokens = official(lambda b, x: surgery_forward(b, x, 3), enc, h0)
        feats = F.normalize(enc.visual.ln_post(tokens) @ enc.visual.proj, dim=-1)
        sim = torch.cat([feature_surgery(f[None], queries) for f in feats])  # (B, N, Q)
    want = sim[:, 1:].transpose(1, 2).reshape(2, 5, 6, 7)
    got = lab(enc, images, {"name": "surgery", "depth": 3}, queries)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # one query per class, said explicitly: the same official computation
    torch.testing.assert_close(lab(enc, images, {"name": "surgery", "depth": 3}, queries,
                                   torch.arange(5)), want, atol=ATOL, rtol=RTOL)
    plain = lab(enc, images, {"name": "surgery", "depth": 3, "feature_surgery": False}, queries)
    cos = (feats[:, 1:] @ queries.T).transpose(1, 2).reshape(2, 5, 6, 7)
    torch.testing.assert_close(plain, cos, atol=ATOL, rtol=RTOL)
    # the subtracted term is constant per pixel (zero class mean): the argmax is w_t·cos's
    p = (2 * feats[:, 0] @ queries.T).softmax(-1)  # (B, Q)
    weighted = cos * (p / p.mean(-1, keepdim=True))[:, :, None, None]
    assert torch.equal(got.argmax(1), weighted.argmax(1))
    torch.testing.assert_close(got.mean(1), torch.zeros(2, 6, 7), atol=1e-6, rtol=0)


SYNONYMS = [0, 1, 1, 1, 2, 3, 3, 4]  # query i+1 ... copies: class 1 three times, 3 twice


def with_synonyms(queries):
    """Five class queries -> eight, class 1's and class 3's repeated as synonyms, and the
    query -> class map (ordered by class, as the vocabularies are)."""
    return queries[SYNONYMS], torch.tensor(SYNONYMS)


def test_feature_surgery_runs_over_classes_not_queries(enc, images):
    """Repeating a class's query (a synonym that says the same) changes no class's logits:
    the softmax and the class means count each query for its share of its class. Counted
    over queries (the official rule, which has no synonyms), class 1's weight would triple
    and every class's logits would move."""
    queries = F.normalize(torch.randn(5, enc.visual.proj.shape[1],
                                      generator=torch.Generator().manual_seed(2)), dim=-1)
    section = {"name": "surgery", "depth": 3}
    one = lab(enc, images, section, queries, torch.arange(5))  # (B, 5, 6, 7)
    many, owner = with_synonyms(queries)
    got = lab(enc, images, section, many, owner)  # (B, 8, 6, 7)
    torch.testing.assert_close(got, one[:, SYNONYMS], atol=1e-6, rtol=1e-5)
    counted = lab(enc, images, section, many)  # no map: every query its own class
    assert (counted - one[:, SYNONYMS]).abs().max() > 1e-2
    plain = {**section, "feature_surgery": False}  # the cosine never depended on it
    torch.testing.assert_close(lab(enc, images, plain, many, owner),
                               lab(enc, images, plain, queries)[:, SYNONYMS])


def test_the_segmenter_gives_the_readout_its_query_classes(enc):
    """Through the pipeline: a vocabulary with repeated synonyms gives the class logits
    and the class map of the one without."""
    from sclip_lab import segment
    from sclip_lab.pipeline import Head, Preprocess, Segmenter

    queries = F.normalize(torch.randn(5, enc.visual.proj.shape[1],
                                      generator=torch.Generator().manual_seed(3)), dim=-1)
    many, owner = with_synonyms(queries)
    head = Head(build_last_block({"name": "surgery", "depth": 2}, None, enc))
    image = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(4))
    out = []
    for q, classes in ((queries, torch.arange(5)), (many, owner)):
        post = segment.PostProcess(classes, 5, 40.0, 0.0, None)
        seg = Segmenter(enc, [head], q, post, Preprocess(64, 64, 32))
        logits = seg.logits_many([image], [(64, 96)])[0][0]  # (Q, 64, 96)
        out.append((segment.synonym_max(logits, classes, 5), segment.predict_classes(
            logits, post)))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-6, rtol=1e-5)
    assert torch.equal(out[1][1], out[0][1])


def test_surgery_depth_one_is_the_last_block_approximation(enc, images):
    one = lab(enc, images, {"name": "surgery", "depth": 1, "feature_surgery": False})
    approx = lab(enc, images, {"name": "surgery_last"})
    torch.testing.assert_close(one[:, 1:], approx[:, 1:], atol=1e-6, rtol=1e-6)
    vanilla = lab(enc, images, {"name": "vanilla"})
    torch.testing.assert_close(one[:, :1], vanilla[:, :1], atol=1e-6, rtol=1e-6)  # its CLS
    for block in ({"residual": False}, {"ffn": True}, {"alpha": 0.5}):  # the same block
        torch.testing.assert_close(
            lab(enc, images, {"name": "surgery", "depth": 1, **block})[:, 1:],
            lab(enc, images, {"name": "surgery_last", **block})[:, 1:], atol=1e-6, rtol=1e-6)


def test_surgery_declares_its_hidden_states_and_draws_its_last_map(enc, images):
    last = build_last_block({"name": "surgery", "depth": 3}, None, enc)
    assert last.hidden_layers == (1, 2) and last.params == {"depth": 3,
                                                             "feature_surgery": True}
    assert build_last_block({"name": "surgery", "depth": 1}, None, enc).hidden_layers == ()
    with torch.no_grad():
        trunk = enc.trunk(images, (), last.hidden_layers, last.pos_embed)
        a = enc.last_attention(trunk, last)
        inputs = enc.last_inputs(trunk, last)
    torch.testing.assert_close(a, torch.softmax(inputs.v @ inputs.v.transpose(-2, -1) / 8, -1))


# --------------------------------------------------------------------------- GEM


GEM_CASES = [
    # (lab section, ss_attn_iter, ss_attn_temp)
    pytest.param({"name": "gem", "depth": 3}, 1, None, id="default"),
    pytest.param({"name": "gem", "depth": 1}, 1, None, id="depth1"),
    pytest.param({"name": "gem", "depth": 2, "iterations": 2}, 2, None, id="iter2"),
    pytest.param({"name": "gem", "depth": 3, "iterations": 0}, 0, None, id="iter0"),
    pytest.param({"name": "gem", "depth": 2, "temperature": 0.25}, 1, 4.0, id="fixed-tau"),
]


@pytest.mark.parametrize("section,iters,temp", GEM_CASES)
def test_gem_matches_the_official_dual_path(enc, images, h0, section, iters, temp):
    ref = official(lambda b, x: gem_forward(b, x, section["depth"] + 1, iters, temp), enc, h0)
    got = lab(enc, images, section)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("depth", [1, 3])
def test_gem_last_matches_clearclips_ignore_residual(enc, images, h0, depth):
    ref = official(lambda b, x: gem_forward(b, x, depth + 1, ignore_residual=True), enc, h0)
    torch.testing.assert_close(lab(enc, images, {"name": "gem_last"}), ref, atol=ATOL,
                               rtol=RTOL)
    # the path without residual keeps only the last block's term: gem_last
    torch.testing.assert_close(lab(enc, images, {"name": "gem", "depth": depth,
                                                 "residual": False}), ref, atol=ATOL,
                               rtol=RTOL)


@pytest.mark.parametrize("section", [{"name": "gem", "depth": 3}, {"name": "gem_last"},
                                     {"name": "surgery", "depth": 3}])
def test_each_window_is_its_own(enc, images, section):
    """Adaptive τ and the feature-surgery weights are per window: batching changes nothing."""
    queries = F.normalize(torch.randn(4, enc.visual.proj.shape[1]), dim=-1)
    both = lab(enc, images, section, queries)
    for i in range(2):
        torch.testing.assert_close(lab(enc, images[i:i + 1], section, queries), both[i:i + 1],
                                   atol=1e-6, rtol=1e-5)


def test_gem_last_is_gems_last_term(enc, images):
    with torch.no_grad():
        last = build_last_block({"name": "gem", "depth": 2}, None, enc)
        trunk = enc.trunk(images, (), last.hidden_layers, last.pos_embed)
        g2 = enc.last_block(trunk, last)
        g1 = enc.last_block(trunk, build_last_block({"name": "gem", "depth": 1}, None, enc))
        o = enc.last_block(trunk, build_last_block({"name": "gem_last"}, None, enc))
    torch.testing.assert_close(g1, trunk.x + o, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(g2, g1)


@pytest.mark.parametrize("section", [{"name": "gem", "depth": 2}, {"name": "gem_last"},
                                     {"name": "gem_last", "iterations": 3,
                                      "temperature": 0.05}])
def test_gem_rows_sum_to_one(enc, images, section):
    last = build_last_block(section, None, enc)
    with torch.no_grad():
        a = enc.last_attention(enc.trunk(images, (), last.hidden_layers, last.pos_embed), last)
    assert a.shape == (2, 2, 43, 43) and (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 43), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ knobs, configs


@pytest.mark.parametrize("section,match", [
    ({"name": "surgery", "depth": 0}, r"attention\.depth=0 is out of range.*≥ 1 ≤ 3"),
    ({"name": "surgery", "depth": 4}, r"attention\.depth=4 is out of range.*≤ 3"),
    ({"name": "surgery", "depth": 2, "feature_surgery": "yes"},
     "feature_surgery='yes' is not true/false"),
    ({"name": "gem", "depth": 0}, r"attention\.depth=0 is out of range"),
    ({"name": "gem", "depth": 4}, r"attention\.depth=4 is out of range"),
    ({"name": "gem", "depth": 2, "iterations": -1},
     r"attention\.iterations=-1 is out of range.*≥ 0"),
    ({"name": "gem", "depth": 2, "iterations": 1.5}, "is not an integer"),
    ({"name": "gem", "depth": 2, "temperature": 0},
     r"attention\.temperature=0 is out of range.*> 0"),
    ({"name": "gem_last", "temperature": -1.0}, r"temperature=-1\.0 is out of range"),
    ({"name": "gem_last", "depth": 2}, "attention=gem_last has no knob 'depth'"),
    ({"name": "surgery_last", "depth": 2}, "attention=surgery_last has no knob 'depth'"),
])
def test_bad_knobs_are_one_clear_line(enc, section, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_last_block(section, None, enc)
    assert "\n" not in str(err.value)


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("overrides,params", [
    (["attention=surgery"], {"depth": 3, "feature_surgery": True}),
    (["attention=surgery_last"], {}),
    (["attention=gem"], {"depth": 3, "iterations": 1, "temperature": None}),
    (["attention=gem_last", "attention.temperature=0.5"], {"iterations": 1,
                                                            "temperature": 0.5}),
])
def test_run_configs_compose_and_build(enc, overrides, params):
    cfg = resolved(*overrides)
    section = cfg["attention"]
    if section.get("depth") == 6:  # the official default; the tiny model has 4 blocks
        with pytest.raises(ConfigError, match="depth=6 is out of range"):
            build_last_block(section, None, enc)
        section = {**section, "depth": 3}
    last = build_last_block(section, None, enc)
    assert dict(last.params) == params
    records.result_key({**cfg, "attention": section})  # keys and summaries accept it
    assert set(params) <= set(head_spec(section).summary())


def test_surgery_defaults_and_text_set():
    cfg = resolved("attention=surgery", "text=surgery85")
    assert cfg["attention"] == {"name": "surgery", "depth": 6, "feature_surgery": True,
                                "residual": None, "ffn": None, "alpha": None,
                                "pos_embed": None}  # null: the rule surgery declares
    assert head_spec(cfg["attention"]).pos_embed == "bilinear"
    assert resolved("attention=gem")["attention"]["depth"] == 6
    tmpl = get_templates(cfg["text"]["templates"])
    assert len(tmpl) == 85 and tmpl[:80] == get_templates("openai_imagenet")
    assert [t("{}") for t in tmpl[80:]][0] == "there is a {} in the scene."
    assert tmpl[-1]("cat") == "this is one cat in the scene."


def test_heads_share_one_trunk_pass_in_the_segmenter(enc):
    """Several surgery/GEM heads through the segmenter's shared trunk (hidden states kept
    for the deepest path) give each head's own logits."""
    from sclip_lab import segment
    from sclip_lab.pipeline import Head, Preprocess, Segmenter

    sections = [{"name": "surgery", "depth": 2}, {"name": "gem", "depth": 3},
                {"name": "gem_last"}, {"name": "surgery_last"}]
    heads = [Head(build_last_block(s, None, enc)) for s in sections]
    queries = F.normalize(torch.randn(3, enc.visual.proj.shape[1]), dim=-1)
    post = segment.PostProcess(torch.arange(3), 3, 40.0, 0.0, None)
    image = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(4))
    together = Segmenter(enc, heads, queries, post, Preprocess(64, 64, 32))
    assert together.hidden_layers(heads) == (1, 2)
    both = together.logits_many([image], [(64, 96)])
    for head, got in zip(heads, both):
        alone = Segmenter(enc, [head], queries, post, Preprocess(64, 64, 32))
        torch.testing.assert_close(got[0], alone.logits_many([image], [(64, 96)])[0][0])
