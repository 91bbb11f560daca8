"""Figures: attention-map extraction against the attention functions, point -> token mapping,
entry parsing, and the attention / segmentation figures through the API and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, TINY
from hydra import compose, initialize_config_dir

from sclip_lab import attention as attn
from sclip_lab import segment, viz
from sclip_lab import visualize as vis
from sclip_lab.attention import AttentionInputs, attention_qkv, merge_heads
from sclip_lab.config import CONF_DIR
from sclip_lab.pipeline import ConfigError, build_last_block

MIN_BYTES = 5_000  # a real figure, not an empty canvas


@pytest.fixture(scope="module")
def image_tensor():
    torch.manual_seed(0)
    return torch.randn(3, 64, 96)  # grid (4, 6)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A synthetic 120×160 photo: two flat regions and a disc, as a PNG."""
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :80] = (40, 160, 40)
    img[:, 80:] = (200, 200, 230)
    cv2.circle(img, (110, 60), 25, (30, 30, 200), -1)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    cv2.imwrite(str(path), img)
    return path


def tiny_overrides(tiny_config_file, tiny_checkpoint, tmp_path) -> list[str]:
    return [f"model.arch={TINY}", f"model.config_file={tiny_config_file}",
            f"model.pretrained={tiny_checkpoint}", "device=cpu", "precision=fp32",
            f"cache_dir={tmp_path / 'cache'}"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="visualize", overrides=overrides)


def composer(base: list[str]):
    """What Hydra does for an attention entry inside the app: the job's overrides + its own."""
    return lambda overrides: compose_cfg(base + overrides)


def reference_inputs(enc, image, early_layers=()):
    trunk = enc.trunk(image[None], early_layers)
    block = enc.visual.transformer.resblocks[-1]
    z = block.ln_1(trunk.x)
    q, k, v = attention_qkv(block, z)
    return trunk, block, AttentionInputs(z, q, k, v, trunk.grid, trunk.early)


# ------------------------------------------------------------------ points and entries


def test_point_token_hand_computed():
    # 100×50 image, short side 32 -> scale 0.64 -> 64×32 -> grid 2×4 of 16-pixel patches.
    size = (50, 100)
    resized = segment.resized_shape(*size, 32)
    assert resized == (32, 64)
    # centre (60.5, 30.5) × 0.64 = (38.72, 19.52) -> row 1, col 2 -> 1 + 1·4 + 2.
    assert vis.point_token((60, 30), size, resized, (2, 4), 16) == 7
    assert vis.point_token((0, 0), size, resized, (2, 4), 16) == 1
    assert vis.point_token((99, 49), size, resized, (2, 4), 16) == 8


def test_point_in_the_strip_the_patch_conv_drops_maps_to_the_last_patch():
    # 110×50 -> 70×32: the grid is 2×4 (64 px), x = 109 lands at 69.7 -> last column.
    assert vis.point_token((109, 0), (50, 110), (32, 70), (2, 4), 16) == 4


@pytest.mark.parametrize("point", [(100, 10), (-1, 10), (10, 50)])
def test_point_outside_the_image_is_a_config_error(point):
    with pytest.raises(ConfigError, match="outside the 100×50 image"):
        vis.point_token(point, (50, 100), (32, 64), (2, 4), 16)


def test_parse_points():
    assert vis.parse_points([[1, 2], [3.5, 4]]) == [(1.0, 2.0), (3.5, 4.0)]
    with pytest.raises(ConfigError, match="needs source points"):
        vis.parse_points([])
    with pytest.raises(ConfigError, match="not an \\[x, y\\] pair"):
        vis.parse_points([[1, 2, 3]])


def test_attention_entries_compose_like_run_variants():
    base = ["image=x.png", "attentions=[vanilla]"]
    cfg = compose_cfg(base)
    entries = ["vanilla", "sharpen temperature=2", "attention=local",
               "csa projection=random n=4 trial=1"]
    cfg.attentions = entries
    out = vis.attention_entries(cfg, composer(base))
    assert [label for label, _ in out] == entries
    def knobs(v):  # the block knobs left at null: the variant's own block
        return {k: x for k, x in v.attention.items() if x is not None}

    assert knobs(out[1][1]) == {"name": "sharpen", "temperature": 2.0}
    assert knobs(out[2][1]) == {"name": "local", "kernel": 3}
    v = out[3][1]
    assert v.attention.name == "csa" and v.projection.n == 4 and v.projection.trial == 1
    cfg.attentions = ["nope"]
    with pytest.raises(ConfigError, match="variant 'nope'"):
        vis.attention_entries(cfg, composer(base))
    cfg.attentions = ["csa", "csa"]
    with pytest.raises(ConfigError, match="repeats"):
        vis.attention_entries(cfg, composer(base))


# ------------------------------------------------------------------ attention maps


@pytest.mark.parametrize("section,reference,row_sum", [
    ({"name": "vanilla"}, attn.vanilla, 1.0),
    ({"name": "csa"}, None, 2.0),  # default {W_q, W_k} summed: rows sum to 2
    ({"name": "sharpen", "temperature": 2.0},
     lambda x: attn.sharpen(x, temperature=2.0), 1.0),
    ({"name": "early", "layer": 2}, lambda x: attn.early(x, layer=2), 1.0),
])
def test_point_maps_equal_rows_of_the_attention_function(enc, image_tensor, section, reference,
                                                        row_sum):
    last = build_last_block(section, None, enc)
    tokens = [1, 8, 24]
    maps = vis.attention_maps(enc, image_tensor, tokens, {"x": last})["x"]
    assert maps.shape == (3, 4, 6) and maps.dtype == np.float32

    with torch.no_grad():
        trunk, block, inputs = reference_inputs(enc, image_tensor, last.early_layers)
        if reference is None:
            A = attn.csa(inputs, projections=attn.csa_projections("qk", block.attn))
        else:
            A = reference(inputs)
        full = enc.last_attention(trunk, last)
    expected = A.mean(1)[0, tokens, 1:].reshape(3, 4, 6)
    torch.testing.assert_close(torch.from_numpy(maps), expected, rtol=1e-5, atol=1e-6)
    assert full.shape == (1, enc.visual.transformer.resblocks[-1].attn.num_heads, 25, 25)
    torch.testing.assert_close(full.sum(-1), torch.full(full.shape[:-1], row_sum))


@pytest.mark.parametrize("name", ["vanilla", "csa", "clearclip", "naclip"])
def test_last_attention_is_what_the_last_block_applies(enc, image_tensor, name):
    last = build_last_block({"name": name}, None, enc)
    with torch.no_grad():
        trunk, block, inputs = reference_inputs(enc, image_tensor)
        A = enc.last_attention(trunk, last)
        out = block.attn.out_proj(merge_heads(A @ inputs.v))
        if last.variant.residual:
            x = trunk.x + block.ls_1(out)
            out = x + block.ls_2(block.mlp(block.ln_2(x)))
        torch.testing.assert_close(out, enc.last_block(trunk, last))


# ------------------------------------------------------------------------- figures


def test_attention_figure_writes_png_and_pdf(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)
    maps = {"vanilla": rng.random((2, 4, 6), dtype=np.float32),
            "csa": rng.random((2, 4, 6), dtype=np.float32)}
    paths = vis.attention_figure(image, maps, [(10.5, 20.5), (90.2, 60.1)], ["a", "b"], 16,
                                 tmp_path / "attention")
    assert [p.name for p in paths] == ["attention.png", "attention.pdf"]
    assert all(p.stat().st_size > MIN_BYTES for p in paths)


def test_segmentation_figure_writes_png_and_pdf_with_dotted_stem(tmp_path):
    image = np.full((60, 80, 3), 128, np.uint8)
    pred = np.zeros((60, 80), np.int64)
    pred[20:40, 30:60] = 2
    preds = {"vanilla": pred, "csa": np.where(pred == 2, 3, 0)}
    assert viz.present_classes(preds.values()) == [0, 2, 3]
    paths = viz.segmentation_figure(image, preds, ["background", "cat", "dog"],
                                    tmp_path / "overlay_000_img.01")
    assert [p.name for p in paths] == ["overlay_000_img.01.png", "overlay_000_img.01.pdf"]
    assert all(p.stat().st_size > MIN_BYTES for p in paths)


def test_attention_mode_on_the_tiny_model(photo, tiny_config_file, tiny_checkpoint, tmp_path):
    base = [f"image={photo}", "points=[[20, 30], [110, 60]]",
            "attentions=[vanilla, 'sharpen temperature=2', csa]", "size=64",
            *tiny_overrides(tiny_config_file, tiny_checkpoint, tmp_path)]
    paths = vis.visualize(compose_cfg(base), tmp_path / "out", composer(base))
    assert [p.name for p in paths] == ["attention.png", "attention.pdf"]
    assert all(p.stat().st_size > MIN_BYTES for p in paths)


def test_segment_mode_on_the_tiny_model(photo, tiny_config_file, tiny_checkpoint, tmp_path):
    base = [f"image={photo}", "mode=segment", "classes=[grass, sky, ball]",
            "attentions=[vanilla, maskclip, csa]", "preprocess.short_side=112",
            *tiny_overrides(tiny_config_file, tiny_checkpoint, tmp_path)]
    paths = vis.visualize(compose_cfg(base), tmp_path / "out", composer(base))
    assert [p.name for p in paths] == ["segmentation.png", "segmentation.pdf"]
    assert all(p.stat().st_size > MIN_BYTES for p in paths)


# ------------------------------------------------------------------------------ CLI


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "sclip_lab.visualize", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_writes_the_attention_figure(photo, tiny_config_file, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    res = run_cli([f"image={photo}", "points=[[20, 30], [110, 60]]", "size=64",
                   f"hydra.run.dir={out}",
                   *tiny_overrides(tiny_config_file, tiny_checkpoint, tmp_path)])
    assert res.returncode == 0, res.stderr
    assert (out / "attention.png").stat().st_size > MIN_BYTES
    assert (out / "attention.pdf").stat().st_size > MIN_BYTES


def test_cli_unreadable_image_exits_2(tiny_config_file, tiny_checkpoint, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    res = run_cli([f"image={bad}", "points=[[1, 1]]", f"hydra.run.dir={tmp_path / 'run'}",
                   *tiny_overrides(tiny_config_file, tiny_checkpoint, tmp_path)])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "broken.png" in res.stderr


def test_display_names_label_a_background_class():
    lines = ["sky, wall, tree", "cat", "person, man"]
    assert viz.class_names(lines, has_background=True) == ["background", "cat", "person"]
    assert viz.class_names(lines, has_background=False) == ["sky", "cat", "person"]
