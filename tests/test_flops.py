"""Analytic encoder FLOPs (Table 4's FLOPs column)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sclip_lab.flops import (
    VIT_B16,
    open_clip_vit,
    protocol_flops,
    vit_encoder_flops,
    vit_flops_breakdown,
)

B16 = {k: v for k, v in VIT_B16.items() if k != "output_dim"}
# Table 4's modes (short side, window, stride) and the paper's rough relative FLOPs.
MODES = [(224, 224, 112), (336, 224, 112), (336, 336, 112), (448, 224, 112), (448, 448, 224)]
PAPER_RATIOS = [1.0, 4.0, 3.0, 9.0, 4.0]
VOC_HW = (375, 500)  # a typical PASCAL VOC image, W × H = 500 × 375


def test_vit_b16_224_matches_the_quoted_17_56_gmac():
    # The usual figure counts the transformer and patch embedding, not the output projection.
    body = vit_encoder_flops(**B16, height=224, width_px=224, output_dim=0)
    assert body == 35_126_120_448
    assert body / 2 / 1e9 == pytest.approx(17.56, abs=0.005)
    dense = vit_encoder_flops(**B16, height=224, width_px=224)  # + ln_post/proj on 197 tokens
    assert dense == body + 2 * 197 * 768 * 512
    assert dense / 1e9 == pytest.approx(35.1, rel=0.01)


def test_breakdown_by_hand_for_a_small_grid():
    # d = 64, 2 blocks, patch 16 on 32 × 48 -> 2 × 3 patches, T = 7 tokens.
    parts = vit_flops_breakdown(width=64, layers=2, heads=2, patch=16, height=32, width_px=48,
                                output_dim=8)
    T, d = 7, 64
    assert parts == {
        "patch_embed": 2 * 6 * 768 * d,
        "qkv": 2 * 2 * T * d * 3 * d,
        "attn_scores": 2 * 2 * T * T * d,
        "attn_values": 2 * 2 * T * T * d,
        "out_proj": 2 * 2 * T * d * d,
        "mlp": 2 * 2 * T * d * 4 * d * 2,
        "proj": 2 * T * d * 8,
    }
    # Heads split d: the count does not depend on them.
    assert vit_encoder_flops(64, 2, 4, 16, 32, 48) == vit_encoder_flops(64, 2, 1, 16, 32, 48)


def test_matches_torch_flop_counter_plus_explicit_attention(tiny_config_file):
    """FlopCounterMode sees the convolution and linear layers; attention is ours to add."""
    model = open_clip.create_model(tiny_config_file.stem).visual
    vit = open_clip_vit(tiny_config_file.stem)
    parts = vit_flops_breakdown(**vit, height=224, width_px=224)
    counter = FlopCounterMode(display=False)
    # With grad enabled nn.MultiheadAttention takes its unfused path, whose projections the
    # counter sees; the score and value products still go unseen.
    with torch.enable_grad(), counter:
        model(torch.randn(1, 3, 224, 224))
    cls_proj = 2 * vit["width"] * vit["output_dim"]  # open_clip projects the pooled token only
    linear = parts["patch_embed"] + parts["qkv"] + parts["out_proj"] + parts["mlp"]
    assert counter.get_total_flops() == linear + cls_proj


def test_open_clip_vit_reads_the_model_config():
    assert open_clip_vit("ViT-B-16-quickgelu") == {**VIT_B16, "mlp_ratio": 4.0}
    with pytest.raises(ValueError, match="not an open_clip ViT"):
        open_clip_vit("no-such-model")


def test_protocol_flops_hand_computed_mode1():
    # 375 × 500 -> short side 224 gives 224 × 299: one row, two 224 × 224 windows.
    per_window = vit_encoder_flops(**B16, height=224, width_px=224)
    assert protocol_flops(VOC_HW, 224, 224, 112) == 2 * per_window
    # Mode #2: 336 × 448 -> 2 × 3 windows of 224.
    assert protocol_flops(VOC_HW, 336, 224, 112) == 6 * per_window


def test_window_larger_than_image_costs_its_own_size():
    # Window 448 on a 224 × 299 image: one window of the full extent (14 × 18 patches).
    assert protocol_flops(VOC_HW, 224, 448, 224) == vit_encoder_flops(**B16, height=224,
                                                                      width_px=299)


def test_table4_ratios_near_the_papers_approximations():
    flops = [protocol_flops(VOC_HW, *mode) for mode in MODES]
    ratios = [f / flops[0] for f in flops]
    assert ratios[1] == 3.0 and ratios[3] == 7.5  # window counts 6 and 15 against 2
    assert ratios[2] == pytest.approx(2.36, abs=0.01)
    assert ratios[4] == pytest.approx(4.47, abs=0.01)
    # Same ordering as the paper's column: #4 costliest, #1 cheapest, #3 below #2.
    assert max(ratios) == ratios[3] and min(ratios) == ratios[0] and ratios[2] < ratios[1]
    for ours, paper in zip(ratios[1:], PAPER_RATIOS[1:], strict=True):
        assert paper / 1.5 < ours < paper * 1.5


def test_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        vit_encoder_flops(width=100, layers=1, heads=3, patch=16, height=32, width_px=32)
    with pytest.raises(ValueError, match="no 16×16 patch"):
        vit_encoder_flops(width=64, layers=1, heads=1, patch=16, height=8, width_px=32)
