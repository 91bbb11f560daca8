"""open_clip's timm towers (SigLIP-style MAP ViT): the dense encoder, its MAP readout and the
methods a CLS-less backbone refuses (sclip_lab.timm_tower; docs/protocol.md "Dense features
of MAP towers")."""

from __future__ import annotations

import json
from dataclasses import asdict

import open_clip
import pytest
import torch
import torch.nn.functional as F
from towers import SIGLIP_TIMM as TIMM_NAME
from towers import SIGLIP_WIDTH as WIDTH

from sclip_lab import segment
from sclip_lab.errors import ConfigError
from sclip_lab.model import DenseEncoder, load_clip
from sclip_lab.pipeline import Preprocess, Segmenter, build_head, build_last_block
from sclip_lab.timm_tower import TimmDenseEncoder, dense_encoder
from sclip_lab.trunk_cache import open_cache

ARCH = "sclip-tiny-siglip"


CONFIG = {
    "embed_dim": WIDTH, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": {"image_size": 224, "timm_model_name": TIMM_NAME,
                   "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 64, "heads": 2,
                 "layers": 1, "no_causal_mask": True, "proj_bias": True, "pool_type": "last"},
}


@pytest.fixture(scope="module")
def enc(tmp_path_factory) -> TimmDenseEncoder:
    path = tmp_path_factory.mktemp("configs") / f"{ARCH}.json"
    path.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model, _ = load_clip(ARCH, "none", "fp32", "cpu")
    with torch.no_grad():  # random-init: give the zero-initialised latent and biases values
        for p in model.visual.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    encoder = dense_encoder(model.visual)
    assert isinstance(encoder, TimmDenseEncoder) and encoder.prefix == 0
    return encoder


IMAGES = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))


def test_the_dispatch_keeps_open_clip_towers_on_dense_encoder(tiny_model):
    assert type(dense_encoder(tiny_model.visual)) is DenseEncoder


def test_the_pooled_path_is_the_towers_own_output(enc):
    """Blocks, position table and last block transcribed: vanilla's pooled output through
    the MAP head equals open_clip's encode_image at the native size."""
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    last = build_last_block({"name": "vanilla"}, None, enc)
    torch.testing.assert_close(enc.pooled(images, last), enc.visual(images),
                               rtol=1e-5, atol=1e-5)


def test_off_grid_position_table_is_timms_own_resize(enc):
    """On a 4×6 grid the embedding equals timm's tower with dynamic_img_size."""
    from timm.layers import resample_abs_pos_embed

    vit = enc.vit
    x, grid = enc.embed(IMAGES)
    assert grid == (4, 6) and x.shape == (2, 24, WIDTH)
    patches = vit.patch_embed.proj(IMAGES).flatten(2).transpose(1, 2)
    pos = resample_abs_pos_embed(vit.pos_embed, [4, 6], [14, 14], num_prefix_tokens=0)
    torch.testing.assert_close(x, patches + pos)


def textregion_value_readout(vit, head, tokens):
    """An independent transcription of TextRegion's SigLIP 2 region readout
    (TextRegionSegmenter.py ``siglip_value_with_sam2_attn``, L294–318) with one region per
    token: the latent query against a constant key, masked to that token, over v."""
    x_in = vit.norm(tokens)[:1]  # (1, N, C), its forward_intermediates output
    pool = vit.attn_pool
    _, N, C = x_in.shape
    q = pool.q(pool.latent.expand(N, -1, -1)).reshape(N, 1, pool.num_heads, pool.head_dim)
    q = q.transpose(1, 2)
    kv = pool.kv(x_in.expand(N, -1, -1)).reshape(N, N, 2, pool.num_heads, pool.head_dim)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    mask = torch.eye(N, dtype=torch.bool)[:, None, None, :].expand(N, pool.num_heads, 1, N)
    k = pool.k_norm(k.mean(dim=-2, keepdim=True).mean(dim=-1, keepdim=True))
    k = k.repeat(1, 1, v.shape[-2], v.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = pool.proj_drop(pool.proj(out.transpose(1, 2).reshape(N, 1, C)))
    out = vit.head_drop(vit.fc_norm(out))[:, 0]  # (N, C)
    return F.normalize(head(out), dim=-1)


def test_each_token_is_read_out_through_the_map_value_path(enc):
    trunk = enc.trunk(IMAGES)
    tokens = enc.last_block(trunk, build_last_block({"name": "vanilla"}, None, enc))
    torch.testing.assert_close(enc.features(tokens)[0],
                               textregion_value_readout(enc.vit, enc.visual.head, tokens),
                               rtol=1e-5, atol=1e-5)


def segmenter(enc, heads, batch_size=2):
    queries = F.normalize(torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(1)),
                          dim=-1)  # random unit queries: the text side is not this test's
    post = segment.PostProcess(torch.arange(4), 4, 40.0, 0.0, None)
    return Segmenter(enc, heads, queries, post, Preprocess(64, 64, 32), batch_size)


QKV_METHODS = [{"name": "vanilla"}, {"name": "csa"}, {"name": "naclip"},
               {"name": "clearclip"}, {"name": "local", "kernel": 3},
               {"name": "early", "layer": 1}, {"name": "maskclip"}, {"name": "gem_last"},
               {"name": "surgery_last"}, {"name": "cliptrase_block"},
               {"name": "recipe", "scores": ["qk", "kk"], "sigma": 3.0, "kernel": 3}]


def test_qkv_methods_run_through_the_segmenter_and_the_trunk_cache(enc, tmp_path):
    heads = [build_head(s, None, None, enc) for s in QKV_METHODS]
    resized = [torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(2))]
    want = segmenter(enc, heads).logits_many(resized, [(64, 128)])
    assert all(out[0].shape == (4, 64, 128) and out[0].isfinite().all() for out in want)
    assert not torch.equal(want[0][0], want[2][0])  # the methods differ on this tower
    info = {"arch": ARCH, "pretrained": "none", "weights_sha256": None, "precision": "fp32",
            "device": "cpu"}
    seg = segmenter(enc, heads)
    seg.trunk_cache = open_cache(tmp_path, "fp32", enc, info, asdict(seg.prep))
    for hits in (0, 1):  # cold, then read back: the same logits bit for bit
        got = seg.logits_many(resized, [(64, 128)])
        assert seg.trunk_cache.hits == 3 * hits  # one entry per position rule: default,
        # gem_last's bicubic_antialias, surgery_last's bilinear
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want))


def test_naclip_keeps_its_gaussian_on_the_patch_grid_without_a_cls(enc):
    trunk = enc.trunk(IMAGES)
    attn = enc.last_attention(trunk, build_last_block({"name": "naclip"}, None, enc))
    assert attn.shape == (2, 2, 24, 24)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 24))


@pytest.mark.parametrize("section, why", [
    ({"name": "surgery", "depth": 2}, "reads the CLS token"),
    ({"name": "segearth_block"}, "reads the CLS token"),
    ({"name": "scclip_attention", "pre_layer": 1}, "reads the CLS token"),
    ({"name": "gem", "depth": 2}, "residual blocks"),
    ({"name": "resclip", "rcs_start": 1, "rcs_end": 2}, "reads the CLS token")])
def test_methods_a_map_tower_cannot_host_are_refused_in_one_line(enc, section, why):
    with pytest.raises(ConfigError) as e:
        build_last_block(section, None, enc)
    msg = str(e.value)
    assert why in msg and "model=vit_b16_openai" in msg and "\n" not in msg
    assert len(msg) <= 300



def eva_encoder(name: str, pool: str):
    from open_clip.timm_model import TimmModel

    torch.manual_seed(0)
    visual = TimmModel(name, 64, pool=pool, proj="none").eval()
    with torch.no_grad():  # zero-initialised latents, biases and layer scales get values
        for p in visual.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return dense_encoder(visual)


@pytest.mark.parametrize("name, pool, prefix", [("sclip_test_pe_tiny", "map", 1),
                                                ("sclip_test_eva02_tiny", "token", 1)])
def test_eva_towers_match_their_own_forward_and_run_qkv_methods(name, pool, prefix):
    """PE-Core (MAP head, CLS, rope) and EVA-02 (CLS token pool, rope, SwiGLU): the pooled
    path equals the tower's own output, and q/k/v methods run on a non-native grid."""
    from sclip_lab.timm_tower import EvaDenseEncoder

    enc = eva_encoder(name, pool)
    assert isinstance(enc, EvaDenseEncoder) and enc.prefix == prefix and "cls" in enc.provides
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    last = build_last_block({"name": "vanilla"}, None, enc)
    torch.testing.assert_close(enc.pooled(images, last), enc.visual(images),
                               rtol=1e-4, atol=1e-5)
    for section in ({"name": "csa"}, {"name": "naclip"}, {"name": "clearclip"}):
        last = build_last_block(section, None, enc)
        feats = enc.head(enc.trunk_for(IMAGES, last), last)
        assert feats.shape[:2] == (2, 24) and feats.isfinite().all()
    with pytest.raises(ConfigError, match="residual blocks"):
        build_last_block({"name": "gem", "depth": 1}, None, enc)


def test_off_grid_rotary_table_is_timms_dynamic_size_rule():
    """On a 4×6 grid the PE-Core tokens equal timm's own tower built with dynamic_img_size
    (rope rebuilt for the grid, position table resampled), same weights."""
    import timm

    enc = eva_encoder("sclip_test_pe_tiny", "map")
    twin = timm.create_model("vit_pe_core_base_patch16_224", depth=2, embed_dim=64,
                             num_heads=1, num_classes=0, dynamic_img_size=True).eval()
    twin.load_state_dict(enc.vit.state_dict(), strict=False)
    last = build_last_block({"name": "vanilla"}, None, enc)
    tokens = enc.last_block(enc.trunk_for(IMAGES, last), last)
    torch.testing.assert_close(enc.vit.norm(tokens), twin.forward_features(IMAGES),
                               rtol=1e-4, atol=1e-5)
