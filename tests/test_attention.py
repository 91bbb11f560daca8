"""Attention variants of the last block (docs/protocol.md §2–3) against direct transcriptions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sclip_lab import attention as attn
from sclip_lab.model import TrunkOutput
from sclip_lab.pipeline import ConfigError, build_last_block


@pytest.fixture(scope="module")
def trunk(enc):
    torch.manual_seed(0)
    with torch.no_grad():
        return enc.trunk(torch.randn(2, 3, 160, 192), early_layers=(1, 2, 3))


def reference_block(block, x, maps_fn, residual=True):
    """Last block written out head by head: maps_fn(z, Wq, bq, Wk, bk, h) -> (B, N, N)."""
    D = x.shape[-1]
    H = block.attn.num_heads
    dh = D // H
    W, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    z = F.layer_norm(x, (D,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    v = z @ W[2 * D:].T + b[2 * D:]
    heads = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        A = maps_fn(z, W, b, h, sl)
        heads.append(A @ v[..., sl])
    out = torch.cat(heads, -1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    if not residual:
        return out
    y = x + out
    y2 = F.layer_norm(y, (D,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    hidden = y2 @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)  # QuickGELU
    return y + hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def corr(r, sl, tau=8.0):
    rh = r[..., sl]
    return torch.softmax(rh @ rh.transpose(-1, -2) / tau, -1)


def qkv(z, W, b, sl):
    D = z.shape[-1]
    return [(z @ W[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D])[..., sl] for i in range(3)]


CSA_MODES = {
    "qk": lambda z, W, b, h, sl: corr(z @ W[:W.shape[1]].T + b[:W.shape[1]], sl)
    + corr(z @ W[W.shape[1]:2 * W.shape[1]].T + b[W.shape[1]:2 * W.shape[1]], sl),
    "q": lambda z, W, b, h, sl: corr(z @ W[:W.shape[1]].T + b[:W.shape[1]], sl),
    "k": lambda z, W, b, h, sl: corr(z @ W[W.shape[1]:2 * W.shape[1]].T
                                     + b[W.shape[1]:2 * W.shape[1]], sl),
    "identity": lambda z, W, b, h, sl: corr(z, sl),
}


def run_block(enc, trunk, attention, projection=None):
    last = build_last_block(attention, projection, enc)
    with torch.no_grad():
        return enc.last_block(trunk, last)


@pytest.mark.parametrize("mode", sorted(CSA_MODES))
def test_csa_projection_modes_block_output(enc, trunk, mode):
    block = enc.visual.transformer.resblocks[-1]
    combine = "sum" if mode == "qk" else None
    ours = run_block(enc, trunk, {"name": "csa", "temperature": 8.0},
                     {"name": mode, "combine": combine})
    with torch.no_grad():
        ref = reference_block(block, trunk.x, CSA_MODES[mode])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_csa_random_mean_of_seeded_gaussians(enc, trunk):
    block = enc.visual.transformer.resblocks[-1]
    D = trunk.x.shape[-1]
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(D, D, generator=gen) / D**0.5 for _ in range(4)]
    ours = run_block(enc, trunk, {"name": "csa", "temperature": 8.0},
                     {"name": "random", "n": 4, "trial": 3, "combine": "mean"})
    with torch.no_grad():
        ref = reference_block(block, trunk.x,
                              lambda z, W, b, h, sl: sum(corr(z @ m.T, sl) for m in mats) / 4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_random_trials_reproducible_and_distinct():
    a = attn.random_projections(2, 16, trial=0)
    b = attn.random_projections(2, 16, trial=0)
    c = attn.random_projections(2, 16, trial=1)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0])
    assert not torch.equal(a[0][0], c[0][0])
    w = attn.random_projections(64, 64, trial=5)
    entries = torch.stack([m for m, _ in w])
    assert abs(entries.var().item() * 64 - 1) < 0.05  # N(0, 1/d)


def test_csa_identity_equals_random_with_identity_matrix(enc, trunk):
    block = enc.visual.transformer.resblocks[-1]
    D = trunk.x.shape[-1]
    ident = run_block(enc, trunk, {"name": "csa", "temperature": 8.0}, {"name": "identity"})
    last = build_last_block({"name": "csa"}, {"name": "random", "n": 1}, enc)
    last.params["projections"][:] = [(torch.eye(D), None)]
    assert block is enc.visual.transformer.resblocks[-1]
    with torch.no_grad():
        torch.testing.assert_close(enc.last_block(trunk, last), ident, rtol=0, atol=0)


def test_vanilla_matches_reference(enc, trunk):
    block = enc.visual.transformer.resblocks[-1]

    def maps(z, W, b, h, sl):
        q, k, _ = qkv(z, W, b, sl)
        return torch.softmax(q @ k.transpose(-1, -2) / 8, -1)

    ours = run_block(enc, trunk, {"name": "vanilla"})
    torch.testing.assert_close(ours, reference_block(block, trunk.x, maps), rtol=1e-4,
                               atol=1e-5)


def test_sharpen_tau8_is_vanilla_and_other_tau(enc, trunk):
    vanilla = run_block(enc, trunk, {"name": "vanilla"})
    torch.testing.assert_close(run_block(enc, trunk, {"name": "sharpen", "temperature": 8.0}),
                               vanilla, rtol=0, atol=0)
    block = enc.visual.transformer.resblocks[-1]

    def maps(z, W, b, h, sl):
        q, k, _ = qkv(z, W, b, sl)
        return torch.softmax(q @ k.transpose(-1, -2) / 2, -1)

    torch.testing.assert_close(run_block(enc, trunk, {"name": "sharpen", "temperature": 2.0}),
                               reference_block(block, trunk.x, maps), rtol=1e-4, atol=1e-5)


def test_hard_max_rows_are_one_hot():
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    inputs = attn.AttentionInputs(torch.randn(2, 10, 24), q, k, q, (3, 3))
    A = attn.sharpen(inputs, temperature=0)
    assert torch.equal(A.sum(-1), torch.ones(2, 3, 10))
    assert set(A.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(A.argmax(-1), (q @ k.transpose(-1, -2)).argmax(-1))


def test_local_k1_is_maskclip(enc, trunk):
    # Equal on every patch token (the dense output); local's CLS row stays unrestricted.
    local = run_block(enc, trunk, {"name": "local", "window": 1})
    mask = run_block(enc, trunk, {"name": "maskclip"})
    torch.testing.assert_close(local[:, 1:], mask[:, 1:], rtol=0, atol=1e-6)


def test_local_window_mask_against_definition():
    h, w, k = 4, 5, 3
    N = 1 + h * w
    q, kk = torch.randn(1, 2, N, 8), torch.randn(1, 2, N, 8)
    A = attn.local(attn.AttentionInputs(torch.randn(1, N, 16), q, kk, q, (h, w)), kernel=k)
    scores = torch.softmax(q @ kk.transpose(-1, -2) / 8, -1)
    torch.testing.assert_close(A[:, :, 0], scores[:, :, 0])  # CLS row unrestricted
    for i in range(h * w):
        yi, xi = divmod(i, w)
        allowed = [1 + j for j in range(h * w)
                   if max(abs(j // w - yi), abs(j % w - xi)) <= (k - 1) // 2]
        logits = q[:, :, 1 + i:2 + i] @ kk[:, :, allowed].transpose(-1, -2) / 8
        expect = torch.zeros(1, 2, N)
        expect[:, :, allowed] = torch.softmax(logits.squeeze(-2), -1)
        torch.testing.assert_close(A[:, :, 1 + i], expect, rtol=1e-5, atol=1e-6)


def test_early_last_layer_is_vanilla_and_layer_map_is_used(enc, trunk):
    depth = enc.depth
    torch.testing.assert_close(run_block(enc, trunk, {"name": "early", "layer": depth}),
                               run_block(enc, trunk, {"name": "vanilla"}), rtol=0, atol=0)
    # layer 2: the map block 2 computed on its own input, as recomputed here by hand.
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x, grid = enc.embed(images)
        blocks = enc.visual.transformer.resblocks
        x1 = blocks[0](x)
        z = blocks[1].ln_1(x1)
        D = z.shape[-1]
        W, b = blocks[1].attn.in_proj_weight, blocks[1].attn.in_proj_bias
        q, k = z @ W[:D].T + b[:D], z @ W[D:2 * D].T + b[D:2 * D]
        ref = torch.stack([torch.softmax(q[..., s:s + 64] @ k[..., s:s + 64].transpose(-1, -2)
                                         / 8, -1) for s in range(0, D, 64)], 1)
        got = enc.trunk(images, early_layers=(2,))
    torch.testing.assert_close(got.early[2], ref, rtol=1e-4, atol=1e-6)
    assert set(got.early) == {2}


def test_clearclip_and_naclip_have_no_residual_or_mlp(enc, trunk):
    block = enc.visual.transformer.resblocks[-1]

    def qq(z, W, b, h, sl):
        q, _, _ = qkv(z, W, b, sl)
        return torch.softmax(q @ q.transpose(-1, -2) / 8, -1)

    torch.testing.assert_close(run_block(enc, trunk, {"name": "clearclip"}),
                               reference_block(block, trunk.x, qq, residual=False),
                               rtol=1e-4, atol=1e-5)
    h, w = trunk.grid
    sigma = 5.0
    G = torch.zeros(1 + h * w, 1 + h * w)
    for i in range(h * w):
        for j in range(h * w):
            d2 = (i // w - j // w) ** 2 + (i % w - j % w) ** 2
            G[1 + i, 1 + j] = torch.exp(torch.tensor(-d2 / (2 * sigma**2)))

    def kk(z, W, b, hd, sl):
        _, k, _ = qkv(z, W, b, sl)
        return torch.softmax(k @ k.transpose(-1, -2) / 8 + G, -1)

    torch.testing.assert_close(run_block(enc, trunk, {"name": "naclip", "sigma": sigma}),
                               reference_block(block, trunk.x, kk, residual=False),
                               rtol=1e-4, atol=1e-5)
    assert not attn.get_variant("clearclip").residual and not attn.get_variant("naclip").residual


@pytest.mark.parametrize("name,params,row_sum", [
    ("vanilla", {}, 1.0), ("maskclip", {}, 1.0), ("clearclip", {}, 1.0),
    ("naclip", {"sigma": 5.0}, 1.0), ("local", {"window": 3}, 1.0),
    ("sharpen", {"temperature": 0.5}, 1.0), ("early", {"layer": 2}, 1.0),
])
def test_rows_sum_to_one(enc, trunk, name, params, row_sum):
    last = build_last_block({"name": name, **params}, None, enc)
    A = _attention_of(enc, trunk, last)
    torch.testing.assert_close(A.sum(-1), torch.full(A.shape[:-1], row_sum), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("projection,row_sum", [
    (None, 2.0), ({"name": "q"}, 1.0), ({"name": "random", "n": 4, "combine": "mean"}, 1.0),
    ({"name": "random", "n": 4, "combine": "sum"}, 4.0),
])
def test_csa_rows_sum(enc, trunk, projection, row_sum):
    last = build_last_block({"name": "csa", "temperature": 8.0}, projection, enc)
    A = _attention_of(enc, trunk, last)
    torch.testing.assert_close(A.sum(-1), torch.full(A.shape[:-1], row_sum), rtol=0,
                               atol=1e-5)


def _attention_of(enc, trunk: TrunkOutput, last):
    from sclip_lab.attention import attention_qkv

    block = enc.visual.transformer.resblocks[-1]
    z = block.ln_1(trunk.x)
    q, k, v = attention_qkv(block, z)
    with torch.no_grad():
        return last.attention(attn.AttentionInputs(z, q, k, v, trunk.grid, trunk.early))


@pytest.mark.parametrize("attention,projection,match", [
    ({"name": "nope"}, None, "unknown attention"),
    ({"name": "local", "window": 4}, None, "odd"),
    ({"name": "local", "window": 0}, None, "window=0"),
    ({"name": "early", "layer": 0}, None, "layer=0"),
    ({"name": "early", "layer": 5}, None, "layer=5"),
    ({"name": "sharpen", "temperature": -1.0}, None, "temperature"),
    ({"name": "csa", "temperature": 0.0}, None, "temperature"),
    ({"name": "vanilla"}, {"name": "random", "n": 2}, "has no projection"),
    ({"name": "csa"}, {"name": "random", "n": 0}, "n=0"),
    ({"name": "csa"}, {"name": "random", "n": 1, "trial": -1}, "trial=-1"),
    ({"name": "csa"}, {"name": "diagonal"}, "unknown projection"),
    ({"name": "csa", "combine": "max"}, {"name": "q"}, "combine"),
    ({"name": "naclip", "sigma": 0.0}, None, "sigma"),
])
def test_impossible_values_are_refused(enc, attention, projection, match):
    with pytest.raises(ConfigError, match=match):
        build_last_block(attention, projection, enc)


def test_registry_refuses_duplicates_and_lists_names():
    with pytest.raises(KeyError):
        attn.register_attention("csa")(lambda x: x)
    with pytest.raises(ValueError, match="registered"):
        attn.get_variant("unknown")


def test_every_registered_variant_has_a_config_file():
    from sclip_lab.config import CONF_DIR

    files = {p.stem for p in (CONF_DIR / "attention").glob("*.yaml")}
    assert files == set(attn.ATTENTIONS)
