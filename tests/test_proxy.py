"""Proxy backbones (sclip_lab.proxy): official checkpoint formats in, official features out.

Every architecture gets a random state dict written in its ORIGINAL official format (DINO's
plain dict, DINOv2's with ``register_tokens``/``mask_token`` and the CLS row in
``pos_embed``, MAE's ``{"model": ...}``, SAM's ``image_encoder.``/``mlp.lin1`` names) and
loaded through ``load_proxy``. Its features are compared with an independent functional
transcription of the official forward (``ref_vit``, ``ref_sam``: official key names,
official pos-embed rules, explicit attention, no timm): bitwise for the ViTs, whose
attention runs explicitly as the official code's (timm's fused kernel is not bitwise).
Full ViT-B sizes are used with small windows (DINO B/16 with 4 of its blocks: its path is
B/8's); SAM's exact path runs a reduced encoder (3 blocks, width 96, 64-px input, 3-token
windows, same key names) through ``load_proxy(arch_kwargs=...)``, since ViT-B at 1024²
takes minutes on a CPU; the full SAM ViT-B file is loaded and run for one block at 1024².
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sclip_lab import proxy as P
from sclip_lab.errors import MAX_LINE, ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
IMNET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMNET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
SAM_SMALL = dict(img_size=64, depth=3, embed_dim=96, num_heads=4, global_attn_indexes=[1],
                 window_size=3)
# DINO B/16 shares DINO B/8's path: four of its blocks keep the files and the tests light.
B16 = {"depth": 4}


# ------------------------------------------------------------------ official checkpoints


def _random_like(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Non-degenerate random weights: norms near 1, layer scales near 0.5, the rest small.
    Slices of one seeded normal pool at random offsets (drawing 86M numbers takes a second)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 20, generator=g)
    out = {}
    for k, shape in shapes.items():
        numel = math.prod(shape)
        start = int(torch.randint(0, pool.numel(), (1,), generator=g))
        reps = -(-(start + numel) // pool.numel())
        v = (pool.repeat(reps) if reps > 1 else pool)[start:start + numel].reshape(shape)
        is_norm_weight = k.endswith("weight") and len(shape) == 1 and "norm" in k
        if is_norm_weight or k.startswith("neck.1.") or k.startswith("neck.3."):
            v = 1 + 0.1 * v if k.endswith("weight") else 0.05 * v
        elif k.endswith("gamma"):
            v = 0.5 + 0.1 * v
        elif k in ("pos_embed", "cls_token", "reg_token") or "rel_pos" in k:
            v = 0.5 * v
        else:
            v = 0.05 * v
        out[k] = v
    return out


def _timm_shapes(arch: str, **kwargs) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return {k: v.shape for k, v in model.state_dict().items()}


def official_state(name: str, seed: int = 0, **kwargs) -> dict:
    """A random checkpoint of proxy ``name`` in its official repository's format."""
    arch = P.FAMILIES[name].arch
    sd = _random_like(_timm_shapes(arch, **kwargs), seed)
    if name.startswith("dino_"):  # facebookresearch/dino: the same names as timm's ViT
        return sd
    if name == "mae_vitb16":  # MAE: the encoder under "model"
        return {"model": sd}
    if name == "dinov2_vitb14_reg":
        g = torch.Generator().manual_seed(seed + 1)
        dim = sd["cls_token"].shape[-1]
        cls_pos = 0.5 * torch.randn(1, 1, dim, generator=g)
        out = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
        out["register_tokens"] = sd["reg_token"]
        out["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)  # CLS row first
        out["mask_token"] = torch.zeros(1, dim)
        return out
    if name == "sam_vitb":  # the whole SAM: encoder keys prefixed, decoders beside
        out = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in sd.items()}
        out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 128)
        out["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
        return out
    raise KeyError(name)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One official-format file per architecture (+ the reduced SAM)."""
    root = tmp_path_factory.mktemp("proxy")
    paths = {}
    for i, (key, name, kwargs) in enumerate([
            ("dino_vitb8", "dino_vitb8", {}), ("dino_vitb16", "dino_vitb16", B16),
            ("dinov2_vitb14_reg", "dinov2_vitb14_reg", {}), ("mae_vitb16", "mae_vitb16", {}),
            ("sam_vitb", "sam_vitb", {}), ("sam_small", "sam_vitb", SAM_SMALL)]):
        paths[key] = root / f"{key}.pth"
        torch.save(official_state(name, seed=i, **kwargs), paths[key])
    return paths


@pytest.fixture(scope="module")
def loaded(files) -> dict[str, P.ProxyBackbone]:
    """The full-size ViTs loaded once each (their features are compared per window)."""
    return {n: P.load_proxy({"name": n, "pretrained": str(files[n])},
                            arch_kwargs=B16 if n == "dino_vitb16" else None)
            for n in ("dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg", "mae_vitb16")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    raw = torch.load(path, weights_only=True)
    return raw.get("model", raw)


# --------------------------------------------- independent transcriptions of the officials


def _ln(x, sd, p, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps)


def ref_pos(pos: torch.Tensor, rows: int, cols: int, square: bool, rule: str) -> torch.Tensor:
    """``(1, 1 + N, D)`` official table -> for (rows, cols), per each repository's code."""
    n = pos.shape[1] - 1
    g = int(math.sqrt(n))
    if rule in ("dino", "dinov2_reg") and rows * cols == n and square:
        return pos
    if rule == "mae" and (rows, cols) == (g, g):
        return pos
    grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if rule == "dino":  # dino vision_transformer.py interpolate_pos_encoding
        grid = F.interpolate(grid, mode="bicubic", scale_factor=(
            (rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n)))
    elif rule == "dinov2_reg":  # offset 0 -> size, antialias on (hub/backbones.py)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True)
    else:  # mae/pos_embed.py interpolate_pos_embed
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], 1)


def ref_vit(sd: dict, image: torch.Tensor, *, patch: int, rule: str, heads: int = 12,
            layer: int | None = None, input_size: int | None = None) -> torch.Tensor:
    """Official DINO / DINOv2 / MAE features of ``image`` in [0, 1], from official keys."""
    x = (image - IMNET_MEAN) / IMNET_STD
    if input_size is not None:  # MAE: the crop resized to slide_crop²
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear",
                          align_corners=False)
    b, _, h, w = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    rows, cols = t.shape[-2:]
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    t = t + ref_pos(sd["pos_embed"], rows, cols, h == w, rule)
    n_reg = 0
    if "register_tokens" in sd:  # DINOv2: registers after CLS, without position
        n_reg = sd["register_tokens"].shape[1]
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth if layer is None else layer):
        p = f"blocks.{i}."
        y = _ln(t, sd, p + "norm1.")
        n, d = y.shape[1], y.shape[2]
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        y = F.linear((a @ v).transpose(1, 2).reshape(b, n, d), sd[p + "attn.proj.weight"],
                     sd[p + "attn.proj.bias"])
        t = t + (y * sd[p + "ls1.gamma"] if p + "ls1.gamma" in sd else y)
        y = _ln(t, sd, p + "norm2.")
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + (y * sd[p + "ls2.gamma"] if p + "ls2.gamma" in sd else y)
    t = _ln(t, sd, "norm.")[:, 1 + n_reg:]
    return t.reshape(b, rows, cols, -1).permute(0, 3, 1, 2)


def _rel(size: int, table: torch.Tensor) -> torch.Tensor:
    """SAM get_rel_pos for equal query/key sizes: (size, size, C)."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()
    idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
    return table[idx]


def ref_sam(sd: dict, image: torch.Tensor, *, heads: int, window: int, global_idx,
            input_size: int, layer: int | None = None) -> torch.Tensor:
    """segment_anything ImageEncoderViT on ``image`` in [0, 1], as ProxyCLIP feeds it."""
    e = {k.removeprefix("image_encoder."): v for k, v in sd.items()
         if k.startswith("image_encoder.")}
    x = F.interpolate((image - IMNET_MEAN) / IMNET_STD, size=(input_size, input_size),
                      mode="bilinear", align_corners=False)
    t = F.conv2d(x, e["patch_embed.proj.weight"], e["patch_embed.proj.bias"], stride=16)
    t = t.permute(0, 2, 3, 1) + e["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in e if k.startswith("blocks."))
    for i in range(depth if layer is None else layer):
        p = f"blocks.{i}."
        shortcut, y = t, _ln(t, e, p + "norm1.")
        b, h, w, c = y.shape
        ws = 0 if i in global_idx else window
        if ws:
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
            y = y.reshape(-1, ws, ws, c)
        bw, hh, ww, _ = y.shape
        qkv = F.linear(y, e[p + "attn.qkv.weight"], e[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(bw, hh * ww, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(
            3, bw * heads, hh * ww, -1)
        a = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
        rq = q.reshape(bw * heads, hh, ww, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, _rel(hh, e[p + "attn.rel_pos_h"]))
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, _rel(ww, e[p + "attn.rel_pos_w"]))
        a = (a.view(-1, hh, ww, hh, ww) + rel_h[..., None] + rel_w[:, :, :, None, :]).view(
            -1, hh * ww, hh * ww).softmax(-1)
        y = (a @ v).view(bw, heads, hh, ww, -1).permute(0, 2, 3, 1, 4).reshape(bw, hh, ww, -1)
        y = F.linear(y, e[p + "attn.proj.weight"], e[p + "attn.proj.bias"])
        if ws:
            y = y.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
            y = y.reshape(b, hp, wp, -1)[:, :h, :w]
        t = shortcut + y
        y = _ln(t, e, p + "norm2.")
        t = t + F.linear(F.gelu(F.linear(y, e[p + "mlp.lin1.weight"], e[p + "mlp.lin1.bias"])),
                         e[p + "mlp.lin2.weight"], e[p + "mlp.lin2.bias"])

    def ln2d(z, name):
        u = z.mean(1, keepdim=True)
        s = (z - u).pow(2).mean(1, keepdim=True)
        return e[name + ".weight"][:, None, None] * (z - u) / torch.sqrt(s + 1e-6) + e[
            name + ".bias"][:, None, None]

    y = ln2d(F.conv2d(t.permute(0, 3, 1, 2), e["neck.0.weight"]), "neck.1")
    return ln2d(F.conv2d(y, e["neck.2.weight"], padding=1), "neck.3")


def _images(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image in [0, 1], the same CLIP-normalised: what the pipeline feeds CLIP). The image
    is the one the official code recovers from the CLIP-normalised crop (ProxyCLIP L79:
    un-normalised with CLIP's statistics), so both paths start from the same numbers."""
    raw = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))
    windows = (raw - CLIP_MEAN) / CLIP_STD
    return windows * CLIP_STD + CLIP_MEAN, windows


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal: explicit attention in the official order of operations leaves nothing
    to round differently (the fused kernel is ~1e-6 off here, ~2e-4 on a photo)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(a, b), (a - b).abs().max()


# ------------------------------------------------------------------------ official paths


@pytest.mark.parametrize("name,patch,rule,size", [
    ("dino_vitb8", 8, "dino", (32, 32)), ("dino_vitb8", 8, "dino", (32, 48)),
    ("dino_vitb16", 16, "dino", (48, 32)), ("dino_vitb16", 16, "dino", (64, 64)),
    ("dinov2_vitb14_reg", 14, "dinov2_reg", (42, 42)),
    ("dinov2_vitb14_reg", 14, "dinov2_reg", (28, 70)),
    ("mae_vitb16", 16, "mae", (48, 48)), ("mae_vitb16", 16, "mae", (32, 64)),
])
def test_vit_features_equal_the_official_path(loaded, files, name, patch, rule, size):
    img, windows = _images(2, *size)
    out = loaded[name](windows)
    assert out.shape == (2, 768, size[0] // patch, size[1] // patch)  # (rows, cols), not swapped
    _exact(out, ref_vit(_weights(files[name]), img, patch=patch, rule=rule))


def test_native_square_grid_keeps_the_table(loaded, files):
    """At the checkpoint's own grid DINO adds its table untouched (224 px for B/16)."""
    img, windows = _images(1, 224, 224)
    b16 = P.load_proxy({"name": "dino_vitb16", "pretrained": str(files["dino_vitb16"]),
                        "layer": 1}, arch_kwargs=B16)
    _exact(b16(windows), ref_vit(_weights(files["dino_vitb16"]), img, patch=16, rule="dino",
                                 layer=1))


def test_non_square_shape_b8(files):
    """224×336 windows -> 28 rows × 42 columns on ViT-B/8 (one block keeps it fast)."""
    b8 = P.load_proxy({"name": "dino_vitb8", "pretrained": str(files["dino_vitb8"]),
                       "layer": 1})
    img, windows = _images(1, 224, 336)
    out = b8(windows)
    assert out.shape == (1, 768, 28, 42)
    _exact(out, ref_vit(_weights(files["dino_vitb8"]), img, patch=8, rule="dino", layer=1))


def test_earlier_layer_is_that_blocks_output_after_the_final_norm(files):
    b = P.load_proxy({"name": "dinov2_vitb14_reg", "pretrained": str(files["dinov2_vitb14_reg"]),
                      "layer": 3})
    assert b.layer == 3 and b.identity["layer"] == 3
    img, windows = _images(1, 28, 42)
    _exact(b(windows), ref_vit(_weights(files["dinov2_vitb14_reg"]), img, patch=14,
                               rule="dinov2_reg", layer=3))


def test_mae_official_square_resize(files):
    """input_size=64: every window resized to 64² first, as ProxyCLIP's slide_crop."""
    b = P.load_proxy({"name": "mae_vitb16", "pretrained": str(files["mae_vitb16"]),
                      "input_size": 64})
    img, windows = _images(2, 32, 48)
    out = b(windows)
    assert out.shape == (2, 768, 4, 4) and b.grid(32, 48) == (4, 4)
    _exact(out, ref_vit(_weights(files["mae_vitb16"]), img, patch=16, rule="mae",
                        input_size=64))


@pytest.mark.parametrize("size", [(64, 64), (32, 48)])
def test_sam_encoder_official_path(files, size):
    """Reduced SAM (same key names) at its own input size: pos-embed and relative positions
    as stored, windowed blocks padded, neck output; any window is resized to input_size²."""
    b = P.load_proxy({"name": "sam_vitb", "pretrained": str(files["sam_small"]),
                      "input_size": 64}, arch_kwargs=SAM_SMALL)
    img, windows = _images(2, *size)
    out = b(windows)
    assert out.shape == (2, 256, 4, 4) and b.out_channels == 256
    ref = ref_sam(torch.load(files["sam_small"], weights_only=True), img, heads=4, window=3,
                  global_idx=[1], input_size=64)
    _close(out, ref)


def test_sam_full_vitb_file_at_1024(files):
    """The full SAM ViT-B checkpoint layout (decoders dropped), one block at the official
    1024² input: the 64×64 grid of the official code."""
    b = P.load_proxy({"name": "sam_vitb", "pretrained": str(files["sam_vitb"]), "layer": 1})
    assert b.spec.input_size == 1024 and len(b.model.blocks) == 12
    img, windows = _images(1, 32, 48)
    out = b(windows)
    assert out.shape == (1, 256, 64, 64)
    _close(out, ref_sam(torch.load(files["sam_vitb"], weights_only=True), img, heads=12,
                        window=14, global_idx=[2, 5, 8, 11], input_size=1024, layer=1))


def test_attention_is_explicit_and_the_fused_kernel_would_differ(loaded, files):
    """Every timm attention of every proxy (SAM's too) computes softmax(q kᵀ·s) v itself, as
    the official code; with timm's fused kernel back on, the features are no longer the
    official ones: the exact comparisons above are what catch it."""
    sam = P.load_proxy({"name": "sam_vitb", "pretrained": str(files["sam_small"]),
                        "input_size": 64}, arch_kwargs=SAM_SMALL)
    for b in [*loaded.values(), sam]:
        switches = [m for m in b.modules() if hasattr(m, "fused_attn")]
        assert len(switches) == len(b.model.blocks) and not any(m.fused_attn for m in switches)
    b = loaded["dino_vitb8"]
    img, windows = _images(2, 32, 48)
    ref = ref_vit(_weights(files["dino_vitb8"]), img, patch=8, rule="dino")
    _exact(b(windows), ref)
    try:
        for m in b.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
        fused = b(windows)
    finally:
        assert P.explicit_attention(b.model) == 12
    assert not torch.equal(fused, ref) and (fused - ref).abs().max() < 1e-4
    with pytest.raises(AssertionError, match="no timm attention"):
        P.explicit_attention(torch.nn.Linear(2, 2))  # a renamed switch is a loud bug


def test_renormalisation(loaded):
    """CLIP statistics undone at full precision, the proxy's applied."""
    img, windows = _images(2, 16, 24)
    x = loaded["dino_vitb8"].prepare(windows)
    assert torch.allclose(x, (img - IMNET_MEAN) / IMNET_STD, atol=1e-5)
    assert x.dtype == torch.float32


def test_timm_state_dict_and_safetensors(tmp_path):
    """timm-format files load too (DINOv2 without the CLS row, safetensors)."""
    from safetensors.torch import save_file

    sd = _random_like(_timm_shapes("vit_base_patch14_reg4_dinov2.lvd142m"), seed=7)
    path = tmp_path / "dinov2_timm.safetensors"
    save_file(sd, str(path))
    b = P.load_proxy({"name": "dinov2_vitb14_reg", "pretrained": str(path)})
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch14_reg4_dinov2.lvd142m", num_classes=0,
                                  dynamic_img_size=True).eval()
    model.load_state_dict(sd, assign=True)
    img, windows = _images(1, 42, 28)
    with torch.no_grad():
        # this rule is timm's own dynamic resize (size, bicubic, antialias)
        want = model.forward_features(b.prepare(windows))[:, 5:]
    _close(b(windows), want.transpose(1, 2).reshape(1, 768, 3, 2))


def test_dino_training_checkpoint(tmp_path, files):
    """DINO's full checkpoint: the teacher's backbone. weights, args Namespace beside."""
    import argparse

    sd = torch.load(files["dino_vitb16"], weights_only=True)
    full = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                        "head.last_layer.weight_g": torch.ones(3, 1)},
            "args": argparse.Namespace(arch="vit_base", patch_size=16), "epoch": 100}
    path = tmp_path / "checkpoint.pth"
    torch.save(full, path)
    b = P.load_proxy({"name": "dino_vitb16", "pretrained": str(path), "layer": 1},
                     arch_kwargs=B16)
    img, windows = _images(1, 32, 32)
    _exact(b(windows), ref_vit(sd, img, patch=16, rule="dino", layer=1))


def test_identity_and_precision(files):
    from sclip_lab.files import file_digest

    b = P.load_proxy({"name": "dino_vitb16", "pretrained": str(files["dino_vitb16"]),
                      "layer": 2}, precision="bf16", arch_kwargs=B16)
    assert b.identity == {"proxy": "dino_vitb16", "arch": "vit_base_patch16_224.dino",
                          "weights": file_digest(files["dino_vitb16"]), "layer": 2,
                          "input_size": None}
    assert not any(p.requires_grad for p in b.parameters()) and not b.training
    out = b(_images(1, 32, 32)[1])
    assert out.dtype == torch.bfloat16 and out.shape == (1, 768, 2, 2)
    b = P.load_proxy(b.spec, precision=torch.float16, arch_kwargs=B16)
    assert b.dtype == torch.float16
    assert P.load_proxy(b.spec, precision="auto", arch_kwargs=B16).dtype == torch.float32


def test_official_pos_embed_rules():
    """The three rules differ from each other (and DINO's from timm's dynamic resize), and
    the table is kept where the official code keeps it."""
    from timm.layers import resample_abs_pos_embed

    table = torch.randn(1, 28 * 28, 8, generator=torch.Generator().manual_seed(0))
    dino = P.official_pos_embed(table, (42, 42), "dino")
    v2 = P.official_pos_embed(table, (42, 42), "dinov2_reg")
    mae = P.official_pos_embed(table, (42, 42), "mae")
    timm_dyn = resample_abs_pos_embed(table, (42, 42), (28, 28), num_prefix_tokens=0)
    assert torch.equal(v2, timm_dyn)
    for other in (v2, mae):
        assert (dino - other).abs().max() > 1e-3
    assert P.official_pos_embed(table, (28, 28), "dino") is table
    assert P.official_pos_embed(table, (28, 28), "dinov2_reg", square_input=False) is not table
    assert P.official_pos_embed(table, (28, 28), "mae", square_input=False) is table
    assert P.official_pos_embed(table, (24, 36), "dino").shape == (1, 24 * 36, 8)


def test_every_family_resizes_by_the_pos_embed_rules_clip_uses(loaded, files, monkeypatch):
    """One position-embedding interpolation: each family's official resize is a rule of
    ``sclip_lab.pos_embed`` (DINO's is SCLIP's default, DINOv2's GEM's, MAE's plain bicubic);
    SAM at another input size too, bitwise the timm rule it used to call."""
    from timm.layers import resample_abs_pos_embed_nhwc

    from sclip_lab import pos_embed

    used = []
    for rule, fn in list(pos_embed.RULES.items()):
        monkeypatch.setitem(pos_embed.RULES, rule,
                            lambda p, g, rule=rule, fn=fn: used.append(rule) or fn(p, g))
    _, windows = _images(1, 32, 48)
    for name, rule in [("dino_vitb8", "bicubic_scale"), ("dinov2_vitb14_reg", "bicubic_antialias"),
                       ("mae_vitb16", "bicubic")]:
        used.clear()
        loaded[name](windows)
        assert used == [rule], name
    sam = P.load_proxy({"name": "sam_vitb", "pretrained": str(files["sam_small"]),
                        "input_size": 48}, arch_kwargs=SAM_SMALL)  # grid 3×3, the file's 4×4
    used.clear()
    out = sam(windows)
    assert used == ["bicubic_antialias"] and out.shape == (1, 256, 3, 3)
    m = sam.model
    t = m.patch_embed.proj(sam.prepare(windows)).permute(0, 2, 3, 1)
    t = m.norm_pre(t + resample_abs_pos_embed_nhwc(m.pos_embed, list(t.shape[1:3])))
    for blk in m.blocks:
        t = blk(t)
    _exact(out, m.neck(t.permute(0, 3, 1, 2)))


# -------------------------------------------------------------------------------- errors


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("section,words", [
    ({"name": "dino_vitb32", "pretrained": "timm"}, "unknown proxy='dino_vitb32'"),
    ({"name": "dino_vitb8", "pretrained": "timm", "layer": 0}, "proxy.layer=0"),
    ({"name": "dino_vitb8", "pretrained": "timm", "layer": 13}, "proxy.layer=13"),
    ({"name": "dino_vitb8", "pretrained": "timm", "layer": "last"}, "proxy.layer=last"),
    ({"name": "dino_vitb8"}, "proxy.pretrained=/path/dino_vitbase8_pretrain.pth"),
    ({"name": "dino_vitb8", "pretrained": None}, "needs weights"),
    ({"name": "sam_vitb", "pretrained": "/nowhere/sam_vit_b_01ec64.pth"},
     "proxy.pretrained=/nowhere/sam_vit_b_01ec64.pth does not exist"),
    ({"name": "dino_vitb8", "pretrained": "timm", "pretrain": "x"}, "proxy.pretrain is not"),
    ({"name": "dino_vitb8", "pretrained": "timm", "std": [0, 1, 1]}, "proxy.std"),
    ({"name": "dino_vitb8", "pretrained": "timm", "mean": [0.5]}, "three numbers"),
    ({"name": "dino_vitb8", "pretrained": "timm", "arch": "no_such_net"}, "not a timm model"),
    ({"name": "clip_self"}, "proxy=clip_self needs proxy.layer"),
    ({"name": "clip_self", "layer": 9, "pretrained": "x.pth"}, "drop proxy.pretrained"),
    ({"name": "none"}, "proxy=none has no backbone"),
])
def test_spec_errors(section, words):
    with pytest.raises(ConfigError) as e:
        P.ProxySpec.from_section(section)
    assert words in _one_line(e)


def test_bad_layer_for_a_deeper_arch_is_checked_at_load(files):
    spec = P.ProxySpec("dino_vitb8", "vit_base_patch8_224.dino", str(files["dino_vitb8"]), 14, 8)
    with pytest.raises(ConfigError) as e:
        P.load_proxy(spec)
    assert "proxy.layer=14" in _one_line(e) and "1…12" in _one_line(e)


def test_missing_file_at_load(tmp_path):
    spec = P.ProxySpec("dino_vitb8", "vit_base_patch8_224.dino", str(tmp_path / "gone.pth"),
                       None, 8)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy(spec)
    assert "proxy.pretrained=" in _one_line(e)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "dino.pth"
    path.write_bytes(content)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": "dino_vitb8", "pretrained": str(path)})
    assert "is not a readable checkpoint" in _one_line(e)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": "dino_vitb8", "pretrained": str(path)})
    assert "no state dict of tensors" in _one_line(e)


@pytest.mark.parametrize("name,file,guess", [
    ("dino_vitb8", "dino_vitb16", "use proxy=dino_vitb16"),
    ("dino_vitb16", "dino_vitb8", "use proxy=dino_vitb8"),
    ("dino_vitb8", "dinov2_vitb14_reg", "use proxy=dinov2_vitb14_reg"),
    ("dinov2_vitb14_reg", "mae_vitb16", "use proxy=mae_vitb16"),
    ("mae_vitb16", "sam_small", "a SAM encoder"),
    ("sam_vitb", "dino_vitb16", "use proxy=dino_vitb16"),
])
def test_wrong_architecture_names_the_right_proxy(files, name, file, guess):
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": name, "pretrained": str(files[file])})
    text = _one_line(e)
    assert f"does not fit proxy={name}" in text and guess in text


def test_incomplete_or_misshapen_file(tmp_path):
    """(Two-block models keep the files small; the key names are ViT-B's.)"""
    sd = official_state("dino_vitb16", depth=2)
    del sd["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "cut.pth"
    torch.save(sd, path)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": "dino_vitb16", "pretrained": str(path)}, arch_kwargs={"depth": 2})
    assert "1 missing keys" in _one_line(e) and "blocks.1.mlp.fc2.weight" in _one_line(e)
    assert len(_one_line(e)) - len(str(path)) <= MAX_LINE and "blocks.1.mlp.fc2.weight" in (
        e.value.detail)
    sd = _random_like(_timm_shapes("vit_small_patch16_224.dino", depth=2), seed=3)
    torch.save(sd, path)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": "dino_vitb16", "pretrained": str(path)}, arch_kwargs={"depth": 2})
    assert "a ViT-S/16" in _one_line(e)
    torch.save({"visual.conv1.weight": torch.zeros(768, 3, 16, 16)}, path)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": "dino_vitb16", "pretrained": str(path)})
    assert "a CLIP image tower" in _one_line(e)


@pytest.mark.parametrize("tag,called", [
    ("timm", "vit_base_patch8_224.dino"),
    ("hf-hub:timm/vit_base_patch8_224.dino", "hf-hub:timm/vit_base_patch8_224.dino"),
])
def test_hub_tag_goes_through_timm(monkeypatch, tag, called):
    calls = []

    def offline(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": "dino_vitb8", "pretrained": tag})
    assert "proxy.pretrained=/path/dino_vitbase8_pretrain.pth" in _one_line(e)
    assert calls == [(called, {"pretrained": True, "num_classes": 0})]


def test_hub_model_of_another_family(monkeypatch):
    with torch.device("meta"):
        other = timm.create_model("vit_base_patch16_224.dino", num_classes=0)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: other)
    with pytest.raises(P.ProxyError) as e:
        P.load_proxy({"name": "dino_vitb8", "pretrained": "hf-hub:someone/vit16"})
    assert "16-pixel patches" in _one_line(e)


def test_bad_precision(files):
    with pytest.raises(ConfigError) as e:
        P.load_proxy({"name": "dino_vitb8", "pretrained": str(files["dino_vitb8"])},
                     precision="fp8")
    assert "precision='fp8'" in _one_line(e)
    with pytest.raises(ConfigError) as e:  # CLIP's table (sclip_lab.precision), no other dtype
        P.load_proxy({"name": "dino_vitb8", "pretrained": str(files["dino_vitb8"])},
                     precision=torch.float64)
    assert "precision=torch.float64 is not one of" in _one_line(e)


def test_errors_are_user_errors():
    assert issubclass(P.ProxyError, UserError)


# -------------------------------------------------------------------- config and specs


@pytest.mark.parametrize("option", ["dino_vitb8", "dino_vitb16", "dinov2_vitb14_reg",
                                    "mae_vitb16", "sam_vitb", "clip_self"])
def test_conf_options_make_specs(option):
    section = OmegaConf.load(REPO / "conf" / "proxy" / f"{option}.yaml")
    assert section.name == option and section.get("pretrained") is None
    if option != "clip_self":
        section.pretrained = "timm"
    spec = P.ProxySpec.from_section(section)
    assert hash(spec) == hash(P.ProxySpec.from_section(section))  # a dict key
    fam = P.FAMILIES[option]
    assert (spec.arch, spec.patch, spec.input_size) == (fam.arch, fam.patch, fam.input_size)
    if option != "clip_self":
        assert timm.is_model_pretrained(spec.arch)
        assert (spec.mean, spec.std) == (P.IMAGENET_MEAN, P.IMAGENET_STD)


def test_none_option_and_proxy_spec():
    none = OmegaConf.load(REPO / "conf" / "proxy" / "none.yaml")
    reads = SimpleNamespace(name="proxy", proxy=True)
    plain = SimpleNamespace(name="vanilla", proxy=False)
    assert P.proxy_spec(plain, none) is None and P.proxy_spec(plain, None) is None
    assert P.load_proxy(none) is None
    with pytest.raises(ConfigError) as e:
        P.proxy_spec(reads, none)
    assert "needs a proxy backbone" in _one_line(e)
    clip_self = {"name": "clip_self", "layer": 9}
    spec = P.proxy_spec(reads, clip_self, depth=12)
    assert spec.arch is None and spec.layer == 9 and P.load_proxy(spec) is None
    with pytest.raises(ConfigError) as e:
        P.proxy_spec(reads, {"name": "clip_self", "layer": 12}, depth=12)
    assert "1…11" in _one_line(e)
    assert P.proxy_spec(plain, clip_self) is None  # validated, not read
    with pytest.raises(ConfigError):
        P.proxy_spec(plain, {"name": "dino_vitb8"})  # a typo fails in any run
