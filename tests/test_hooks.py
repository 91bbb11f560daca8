"""The hooks other methods use: trunk hidden states, tokens-output (multi-block) variants,
readout hooks, and that they reach the segmenter's shared-trunk pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sclip_lab import attention as attn
from sclip_lab.attention import attention_qkv
from sclip_lab.errors import ConfigError
from sclip_lab.knobs import Knob
from sclip_lab.model import patch_logits
from sclip_lab.pipeline import build_last_block


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 96, 112, generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def registered():
    """Register test variants for one test, then remove them."""
    names = []

    def add(name, **kwargs):
        names.append(name)
        return attn.register_attention(name, **kwargs)

    yield add
    for name in names:
        attn.ATTENTIONS.pop(name, None)


def test_trunk_keeps_the_hidden_states_it_is_asked_for(enc, images):
    with torch.no_grad():
        plain = enc.trunk(images)
        kept = enc.trunk(images, (), (0, 1, 3))
        x, _ = enc.embed(images)
        blocks = enc.visual.transformer.resblocks
        h1 = blocks[0](x)
        h3 = blocks[2](blocks[1](h1))
    assert set(kept.hidden) == {0, 1, 3} and not plain.hidden
    torch.testing.assert_close(kept.hidden[0], x)
    torch.testing.assert_close(kept.hidden[1], h1)
    torch.testing.assert_close(kept.hidden[3], h3)
    torch.testing.assert_close(kept.x, plain.x)  # keeping changes nothing else
    half = kept.select(1, 2)
    assert half.hidden[1].shape[0] == 1 and torch.equal(half.hidden[1], kept.hidden[1][1:])


def test_a_tokens_variant_computes_its_own_block_output_from_hidden_states(enc, images,
                                                                         registered):
    @registered("test_two_block", output="tokens",
                hidden=lambda knobs, depth: (depth - 2,))
    def two_block(x):
        """h_{D−2} + the last two blocks' vanilla attention outputs (no MLP)."""
        D = len(x.blocks)
        out = x.hidden[D - 2]
        for block, h in ((x.blocks[D - 2], x.hidden[D - 2]), (x.blocks[D - 1], x.x)):
            q, k, v = attention_qkv(block, block.ln_1(h))
            out = out + block.attn.out_proj(attn.merge_heads(attn.softmax_attention(q, k) @ v))
        return out

    last = build_last_block({"name": "test_two_block"}, None, enc)
    assert last.hidden_layers == (enc.depth - 2,)
    with torch.no_grad():
        trunk = enc.trunk(images, (), last.hidden_layers)
        got = enc.last_block(trunk, last)
        blocks = enc.visual.transformer.resblocks
        h = trunk.hidden[enc.depth - 2]
        want = h + blocks[-2].attn(blocks[-2].ln_1(h), blocks[-2].ln_1(h),
                                   blocks[-2].ln_1(h), need_weights=False)[0]
        z = blocks[-1].ln_1(trunk.x)
        want = want + blocks[-1].attn(z, z, z, need_weights=False)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="draws no single attention map"):
        enc.last_attention(trunk, last)


def test_a_readout_hook_replaces_the_patch_cosine(enc, images, registered):
    def minus_cls(feats, queries, weight=1.0):
        scores = feats @ queries.T  # (B, N, Q)
        return scores[:, 1:] - weight * scores[:, :1]

    registered("test_minus_cls", knobs=[Knob("weight", "float", 1.0, "", low=0)],
               readout=minus_cls)(attn.vanilla)
    queries = F.normalize(torch.randn(5, enc.visual.proj.shape[1]), dim=-1)
    last = build_last_block({"name": "test_minus_cls", "weight": 0.5}, None, enc)
    plain = build_last_block({"name": "vanilla"}, None, enc)
    with torch.no_grad():
        trunk = enc.trunk(images)
        got = enc.logits(trunk, last, queries)
        tokens = enc.last_block(trunk, plain)
        feats = F.normalize(enc.visual.ln_post(tokens) @ enc.visual.proj, dim=-1)
        cls = (feats[:, 0] @ queries.T)[:, :, None, None]  # (B, Q, 1, 1)
        want = patch_logits(feats[:, 1:], queries, trunk.grid) - 0.5 * cls
        torch.testing.assert_close(enc.logits(trunk, plain, queries),
                                   patch_logits(feats[:, 1:], queries, trunk.grid))
    assert got.shape == (2, 5, *trunk.grid)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_segmenter_keeps_what_its_heads_declare(enc):
    from sclip_lab import segment
    from sclip_lab.pipeline import Head, Preprocess, Segmenter

    early = build_last_block({"name": "early", "layer": 2}, None, enc)
    attn.register_attention("test_reads_h1", hidden=lambda knobs, depth: (1,))(attn.vanilla)
    try:
        reads = build_last_block({"name": "test_reads_h1"}, None, enc)
        queries = F.normalize(torch.randn(3, enc.visual.proj.shape[1]), dim=-1)
        post = segment.PostProcess(torch.arange(3), 3, 40.0, 0.0, None)
        seg = Segmenter(enc, [Head(early), Head(reads)], queries, post, Preprocess(64, 64, 32))
        assert seg.early_layers(seg.heads) == (2,) and seg.hidden_layers(seg.heads) == (1,)
        groups = seg.encode([torch.randn(3, 64, 96)], (2,), (1,))
        assert all(set(g.trunk.hidden) == {1} and set(g.trunk.early) == {2} for g in groups)
    finally:
        attn.ATTENTIONS.pop("test_reads_h1")
