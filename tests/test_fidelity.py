"""The last-block presets against independent transcriptions of the official ClearCLIP and
NACLIP code (fp32, tiny random ViT, a non-square 6×7 patch grid, two images).

Transcribed (the computation, rewritten here in plain torch head by head, not copied):

* ClearCLIP — github.com/mc-lan/ClearCLIP @ ad68a404d55d48d27330b93554eb64a234ff717f,
  ``open_clip/transformer.py``: ``VisionTransformer.custom_attn`` (``model_type`` vanilla,
  MaskCLIP, SCLIP, ClearCLIP; scale = d_h^-1/2) and the last-block loop of
  ``VisionTransformer.forward`` with ``last_n_layers=1``: ``ignore_residual=True`` outputs
  ``custom_attn(ln_1(x))`` alone; ``False`` outputs ``x' + mlp(ln_2(x'))``, x' = x + attn.
  Note its ``configs/base_config.py`` sets ``model_type='vanilla'`` with
  ``ignore_residual=True``: softmax(q kᵀ/8) with neither residual nor FFN (the "trap").
* NACLIP — github.com/sinahmr/NACLIP @ 0cac3a651f753b11315ea799cfbfabf79da1bd76,
  ``clip/model.py``: ``VisionTransformer.forward`` (``arch`` reduced: ``custom_attn(ln_1(x))``
  alone; vanilla: CLIP's residual + MLP), ``custom_attn`` (``attn_strategy`` naclip, nonly,
  kk, csa, vanilla), ``gaussian_window`` (linspace axes of a (2h−1)×(2w−1) window scaled by
  1/(σ√2), exp(−Σ²), peak 1) and ``get_attention_addition`` (one-hot patch images correlated
  with that window by ``conv2d(padding='same')``, zero CLS row/column). ``nonly`` is
  softmax(ω·c), c = d_h^-1/2 · mean over heads and token pairs (CLS included) of ‖q_p‖·‖k_P‖,
  taken with ``.item()``; NACLIP runs one crop at a time (``forward_slide``; its ``nonly``
  zeros tensor is ``(num_heads, N, N)``, so batch 1 only), hence c per image here.
* The ClearCLIP paper's ablation rows (no residual but FFN: X = o, X + FFN(LN2(X)); scaled
  attention x + α·o) are written from the block algebra, not from code.

Every comparison is ``enc.last_block`` (the last block's output before ln_post), plus one
end-to-end ``enc.head`` check per repository from the pixels (patch embedding, the official
bicubic position-embedding interpolation, ln_post, proj, L2 norm).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sclip_lab.pipeline import build_last_block

ATOL, RTOL = 1e-5, 1e-4
SIGMAS = (5.0, 2.5)


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 96, 112, generator=gen)  # 6×7 patches: rows ≠ columns
    x[1] = 0.3 * x[1] + 0.5  # a second, differently scaled image: per-image constants differ
    return x


@pytest.fixture(scope="module")
def trunk(enc, images):
    with torch.no_grad():
        t = enc.trunk(images, early_layers=())
    assert t.grid == (6, 7)
    return t


@pytest.fixture(scope="module")
def block(enc):
    return enc.visual.transformer.resblocks[-1]


def lab_last_block(enc, trunk, section):
    last = build_last_block(section, None, enc)
    with torch.no_grad():
        return enc.last_block(trunk, last)


def recipe(*scores, temperature=8.0, combine="sum", sigma=None, residual=True, ffn=True,
           alpha=1.0):
    """A full ``{"name": "recipe", ...}`` attention section."""
    return {"name": "recipe", "scores": list(scores), "temperature": temperature,
            "combine": combine, "sigma": sigma, "residual": residual, "ffn": ffn,
            "alpha": alpha}


# ------------------------------------------------- shared pieces of both official files


def heads_qkv(attn_layer, z):
    """One image's LN1 output ``z`` (N, D) -> per-head lists of q, k, v (N, d_h), as the
    official code splits ``F.linear(z, in_proj).chunk(3)`` into ``num_heads`` slices."""
    H = attn_layer.num_heads
    D = z.shape[-1]
    dh = D // H
    q, k, v = F.linear(z, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    split = [slice(h * dh, (h + 1) * dh) for h in range(H)]
    return [q[:, s] for s in split], [k[:, s] for s in split], [v[:, s] for s in split], dh


def attend(attn_layer, maps, vs):
    """``out_proj(concat_h(A_h v_h))`` (out_proj bias included)."""
    out = torch.cat([a @ v for a, v in zip(maps, vs)], dim=-1)
    return out @ attn_layer.out_proj.weight.T + attn_layer.out_proj.bias


def per_image(fn, x):
    """Apply ``fn`` (N, D) -> (N, D) to each image of the batch (the official bsz = 1)."""
    return torch.stack([fn(xb) for xb in x])


# ----------------------------------------------------------------------- ClearCLIP


def clearclip_custom_attn(attn_layer, z, model_type):
    """ClearCLIP ``custom_attn`` on one image."""
    qs, ks, vs, dh = heads_qkv(attn_layer, z)
    scale = dh**-0.5
    n = z.shape[0]
    maps = []
    for q, k in zip(qs, ks):
        if model_type == "vanilla":
            a = torch.softmax((q @ k.T) * scale, dim=-1)
        elif model_type == "MaskCLIP":  # softmax of a 0-diagonal / −inf mask
            mask = torch.full((n, n), float("-inf"))
            mask.fill_diagonal_(0.0)
            a = torch.softmax(mask, dim=-1)
        elif model_type == "SCLIP":
            a = torch.softmax((q @ q.T) * scale, dim=-1) + torch.softmax((k @ k.T) * scale, -1)
        elif model_type == "ClearCLIP":
            a = torch.softmax((q @ q.T) * scale, dim=-1)
        else:
            raise AssertionError(model_type)
        maps.append(a)
    return attend(attn_layer, maps, vs)


def clearclip_last_block(block, x, model_type, ignore_residual):
    """ClearCLIP ``VisionTransformer.forward``'s last block (``last_n_layers=1``)."""

    def one(xb):
        o = clearclip_custom_attn(block.attn, block.ln_1(xb), model_type)
        if ignore_residual:
            return o
        x_out = xb + o
        return x_out + block.mlp(block.ln_2(x_out))

    return per_image(one, x)


CLEARCLIP_CASES = [
    # (model_type, ignore_residual, lab section)
    pytest.param("ClearCLIP", True, {"name": "clearclip"}, id="ClearCLIP-preset"),
    pytest.param("ClearCLIP", True, recipe("qq", residual=False, ffn=False),
                 id="ClearCLIP-recipe"),
    pytest.param("ClearCLIP", False, {"name": "clearclip", "residual": True, "ffn": True},
                 id="ClearCLIP-keep-residual"),
    pytest.param("vanilla", True, recipe("qk", residual=False, ffn=False),
                 id="base-config-trap-recipe"),
    pytest.param("vanilla", True, {"name": "vanilla", "residual": False, "ffn": False},
                 id="base-config-trap-preset"),
    pytest.param("vanilla", False, {"name": "vanilla"}, id="vanilla-keep-residual"),
    pytest.param("MaskCLIP", True, {"name": "maskclip", "residual": False, "ffn": False},
                 id="MaskCLIP-preset"),
    pytest.param("MaskCLIP", True, recipe("id", residual=False, ffn=False),
                 id="MaskCLIP-recipe"),
    pytest.param("MaskCLIP", False, {"name": "maskclip"}, id="MaskCLIP-keep-residual"),
    pytest.param("SCLIP", True, {"name": "csa", "temperature": 8.0, "combine": None,
                                 "residual": False, "ffn": False}, id="SCLIP-preset"),
    pytest.param("SCLIP", True, recipe("qq", "kk", combine="sum", residual=False, ffn=False),
                 id="SCLIP-recipe"),
    pytest.param("SCLIP", False, {"name": "csa", "temperature": 8.0, "combine": None},
                 id="SCLIP-keep-residual"),
]


@pytest.mark.parametrize("model_type,ignore_residual,section", CLEARCLIP_CASES)
def test_clearclip_official_last_block(enc, trunk, block, model_type, ignore_residual,
                                       section):
    with torch.no_grad():
        ref = clearclip_last_block(block, trunk.x, model_type, ignore_residual)
    got = lab_last_block(enc, trunk, section)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------- ClearCLIP paper's ablation rows


def ablation_block(block, x, model_type, residual, ffn, alpha):
    """X = x + α·o (residual) or α·o; then X + FFN(LN2(X)) when ffn; o from ClearCLIP's
    ``custom_attn``."""

    def one(xb):
        o = clearclip_custom_attn(block.attn, block.ln_1(xb), model_type)
        y = xb + alpha * o if residual else alpha * o
        return y + block.mlp(block.ln_2(y)) if ffn else y

    return per_image(one, x)


ABLATION_CASES = [
    # (model_type, residual, ffn, alpha, lab section)
    pytest.param("ClearCLIP", False, True, 1.0, {"name": "clearclip", "ffn": True},
                 id="wo-residual-qq-preset"),
    pytest.param("ClearCLIP", False, True, 1.0, recipe("qq", residual=False, ffn=True),
                 id="wo-residual-qq-recipe"),
    pytest.param("vanilla", False, True, 1.0, {"name": "vanilla", "residual": False},
                 id="wo-residual-qk-preset"),
    pytest.param("vanilla", True, True, 0.5, {"name": "vanilla", "alpha": 0.5},
                 id="alpha-0.5-vanilla"),
    pytest.param("vanilla", True, True, 2.0, recipe("qk", alpha=2.0), id="alpha-2-recipe"),
    pytest.param("ClearCLIP", False, False, 2.0, {"name": "clearclip", "alpha": 2.0},
                 id="alpha-2-clearclip"),
    pytest.param("ClearCLIP", True, False, 0.25,
                 {"name": "clearclip", "residual": True, "alpha": 0.25},
                 id="alpha-0.25-clearclip-residual-no-ffn"),
    pytest.param("SCLIP", True, True, 0.5, {"name": "csa", "temperature": 8.0,
                                            "combine": None, "alpha": 0.5},
                 id="alpha-0.5-csa"),
]


@pytest.mark.parametrize("model_type,residual,ffn,alpha,section", ABLATION_CASES)
def test_clearclip_paper_ablation_rows(enc, trunk, block, model_type, residual, ffn, alpha,
                                       section):
    with torch.no_grad():
        ref = ablation_block(block, trunk.x, model_type, residual, ffn, alpha)
    got = lab_last_block(enc, trunk, section)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


# -------------------------------------------------------------------------- NACLIP


def naclip_gaussian_window(rows, cols, std):
    """NACLIP ``gaussian_window``: axes linspace(−(d−1)/2, (d−1)/2)·1/(σ√2), exp(−(a²+b²))."""
    c = 1.0 / (std * math.sqrt(2.0))
    axes = [torch.linspace(-(d - 1) / 2.0 * c, (d - 1) / 2.0 * c, d) for d in (rows, cols)]
    a, b = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-(a**2 + b**2))


def naclip_attention_addition(grid, std):
    """NACLIP ``get_attention_addition``: row i = the (2h−1)×(2w−1) window correlated
    (conv2d, padding='same') with the one-hot image of patch i; CLS row/column zero."""
    h, w = grid
    window = naclip_gaussian_window(2 * h - 1, 2 * w - 1, std)
    onehots = torch.eye(h * w).view(h * w, 1, h, w)  # patch i lit, row-major
    placed = F.conv2d(onehots, window[None, None], padding="same").view(h * w, h * w)
    out = torch.zeros(1 + h * w, 1 + h * w)
    out[1:, 1:] = placed
    return out


def naclip_custom_attn(attn_layer, z, grid, strategy, std):
    """NACLIP ``custom_attn`` on one image (its bsz = 1)."""
    qs, ks, vs, dh = heads_qkv(attn_layer, z)
    scale = dh**-0.5
    if strategy in ("naclip", "nonly"):
        addition = naclip_attention_addition(grid, std)
    if strategy == "nonly":  # one constant over all heads and token pairs, CLS included
        products = [q.norm(dim=-1)[:, None] * k.norm(dim=-1)[None, :] for q, k in zip(qs, ks)]
        c = scale * torch.stack(products).mean().item()
    maps = []
    for q, k in zip(qs, ks):
        if strategy == "naclip":
            a = torch.softmax((k @ k.T) * scale + addition, dim=-1)
        elif strategy == "nonly":
            a = torch.softmax(torch.zeros(z.shape[0], z.shape[0]) + addition * c, dim=-1)
        elif strategy == "csa":
            a = torch.softmax((q @ q.T) * scale, dim=-1) + torch.softmax((k @ k.T) * scale, -1)
        elif strategy == "vanilla":
            a = torch.softmax((q * scale) @ k.T, dim=-1)
        elif strategy == "kk":
            a = torch.softmax((k * scale) @ k.T, dim=-1)
        else:
            raise AssertionError(strategy)
        maps.append(a)
    return attend(attn_layer, maps, vs)


def naclip_last_block(block, x, grid, strategy, arch, std):
    """NACLIP ``VisionTransformer.forward``'s last block."""

    def one(xb):
        o = naclip_custom_attn(block.attn, block.ln_1(xb), grid, strategy, std)
        if arch == "reduced":
            return o
        y = xb + o
        return y + block.mlp(block.ln_2(y))

    return per_image(one, x)


NACLIP_CASES = [
    # (attn_strategy, arch, gaussian_std, lab section)
    *[pytest.param("naclip", "reduced", s, {"name": "naclip", "sigma": s},
                   id=f"naclip-reduced-preset-s{s}") for s in SIGMAS],
    *[pytest.param("naclip", "reduced", s, recipe("kk", sigma=s, residual=False, ffn=False),
                   id=f"naclip-reduced-recipe-s{s}") for s in SIGMAS],
    *[pytest.param("nonly", "reduced", s, recipe("nonly", sigma=s, residual=False, ffn=False),
                   id=f"nonly-reduced-recipe-s{s}") for s in SIGMAS],
    pytest.param("kk", "reduced", 0.0, recipe("kk", residual=False, ffn=False),
                 id="kk-reduced-recipe"),
    pytest.param("vanilla", "reduced", 0.0, recipe("qk", residual=False, ffn=False),
                 id="vanilla-reduced-recipe"),
    *[pytest.param("naclip", "vanilla", s,
                   {"name": "naclip", "sigma": s, "residual": True, "ffn": True},
                   id=f"naclip-vanilla-arch-s{s}") for s in SIGMAS],
    pytest.param("csa", "vanilla", 0.0, {"name": "csa", "temperature": 8.0, "combine": None},
                 id="csa-vanilla-arch-preset"),
    pytest.param("csa", "vanilla", 0.0, recipe("qq", "kk", combine="sum"),
                 id="csa-vanilla-arch-recipe"),
    pytest.param("vanilla", "vanilla", 0.0, {"name": "vanilla"}, id="vanilla-vanilla-arch"),
]


@pytest.mark.parametrize("strategy,arch,std,section", NACLIP_CASES)
def test_naclip_official_last_block(enc, trunk, block, strategy, arch, std, section):
    with torch.no_grad():
        ref = naclip_last_block(block, trunk.x, trunk.grid, strategy, arch, std)
    got = lab_last_block(enc, trunk, section)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)


def test_transcriptions_separate_nearby_variants(trunk, block):
    """Negative controls: the cases above would fail on a wrong σ, on q qᵀ for k kᵀ, on a
    batch-wide instead of per-image ``nonly`` constant, or on the ClearCLIP trap."""

    def gap(a, b):
        return (a - b).abs().max().item()

    x, grid = trunk.x, trunk.grid
    with torch.no_grad():
        nac5 = naclip_last_block(block, x, grid, "naclip", "reduced", 5.0)
        nac25 = naclip_last_block(block, x, grid, "naclip", "reduced", 2.5)
        kk = naclip_last_block(block, x, grid, "kk", "reduced", 0.0)
        qq = clearclip_last_block(block, x, "ClearCLIP", True)
        trap = clearclip_last_block(block, x, "vanilla", True)
        nonly = naclip_last_block(block, x, grid, "nonly", "reduced", 5.0)
        # nonly with c pooled over the batch (what NACLIP would do were bsz > 1 allowed)
        z = block.ln_1(x)
        cs = []
        for zb in z:
            qs, ks, _, dh = heads_qkv(block.attn, zb)
            cs.append(torch.stack([q.norm(dim=-1)[:, None] * k.norm(dim=-1)[None, :]
                                   for q, k in zip(qs, ks)]).mean() * dh**-0.5)
        pooled = torch.stack(cs).mean()
        add = naclip_attention_addition(grid, 5.0)
        A = torch.softmax(add * pooled, dim=-1)
        nonly_pooled = torch.stack([attend(block.attn, [A] * block.attn.num_heads,
                                           heads_qkv(block.attn, zb)[2]) for zb in z])
    for a, b in [(nac5, nac25), (nac5, kk), (kk, qq), (qq, trap), (nonly, nonly_pooled)]:
        assert gap(a, b) > 100 * ATOL


# ------------------------------------------------------------- end to end, from pixels


def official_tokens(visual, images, last_block):
    """Both repos' ``VisionTransformer.forward`` from the pixels to ``ln_post(x) @ proj`` on
    the patch tokens, L2-normalised as their segmentors do; ``last_block(x, grid)``."""
    B, _, H, W = images.shape
    p = visual.conv1.kernel_size[0]
    grid = (H // p, W // p)
    x = visual.conv1(images)
    x = x.reshape(B, x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(B, 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    n = pos.shape[0] - 1
    g = math.sqrt(n)
    if x.shape[1] != pos.shape[0]:  # interpolate_pos_encoding: bicubic, (side + 0.1)/g
        patch = pos[1:].reshape(1, int(g), int(g), -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, scale_factor=((grid[0] + 0.1) / g, (grid[1] + 0.1) / g),
                              mode="bicubic", align_corners=False)
        assert tuple(patch.shape[-2:]) == grid
        pos = torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])
    x = visual.ln_pre(x + pos)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x if blk.attn.batch_first else x.transpose(0, 1))
        x = x if blk.attn.batch_first else x.transpose(0, 1)
    x = last_block(x, grid)
    tokens = visual.ln_post(x)[:, 1:] @ visual.proj
    return tokens / tokens.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("section,official", [
    pytest.param({"name": "clearclip"},
                 lambda blk, x, grid: clearclip_last_block(blk, x, "ClearCLIP", True),
                 id="ClearCLIP"),
    pytest.param({"name": "naclip", "sigma": 5.0},
                 lambda blk, x, grid: naclip_last_block(blk, x, grid, "naclip", "reduced", 5.0),
                 id="NACLIP"),
])
def test_head_end_to_end_from_pixels(enc, images, section, official):
    visual = enc.visual
    blk = visual.transformer.resblocks[-1]
    last = build_last_block(section, None, enc)
    with torch.no_grad():
        got = enc.head(enc.trunk(images, early_layers=()), last)
        ref = official_tokens(visual, images, lambda x, grid: official(blk, x, grid))
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
