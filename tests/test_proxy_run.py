"""attention=proxy through the lab: runs, variants sharing one pass, the trunk cache,
records, figures and the CLI (a random-init DINO ViT-B/8 file in its official layout and
the tiny CLIP; small windows keep the proxy cheap)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import cli, evaluate_in_process
from synthetic import write_benchmark

from sclip_lab import proxy as proxy_mod
from sclip_lab.files import file_digest
from sclip_lab.pipeline import Preprocess
from sclip_lab.records import result_key
from sclip_lab.segment import resized_shape

SMALL = ["preprocess.short_side=64", "preprocess.window=48", "preprocess.stride=32"]
CLIP_SELF = ["attention=proxy", "proxy=clip_self", "proxy.layer=2"]


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory) -> Path:
    """DINO ViT-B/8 with seeded random weights, saved as the official state dict."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch8_224.dino", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("dino") / "dino_vitbase8_pretrain.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture()
def voc(tmp_path) -> Path:
    root = tmp_path / "data"
    write_benchmark(root, "voc20", num_images=2, size=(50, 70))
    return root


def dino(dino_file: Path) -> list[str]:
    return ["attention=proxy", "proxy=dino_vitb8", f"proxy.pretrained={dino_file}"]


def test_clip_self_runs_and_records_its_proxy(tiny_inproc, voc, tmp_path):
    (rec,) = evaluate_in_process([*tiny_inproc, "dataset=voc20", f"data_root={voc}", *SMALL,
                                  *CLIP_SELF], tmp_path / "out")
    assert rec["summary"]["attention"] == "proxy" and rec["summary"]["proxy"] == "clip_self"
    assert rec["model"]["proxy"] == {"proxy": "clip_self", "arch": None, "layer": 2}
    assert rec["config"]["proxy"]["layer"] == 2 and 0 <= rec["metrics"]["mIoU"] <= 100


def test_variants_share_the_proxy_pass_and_match_single_runs(tiny_inproc, voc, dino_file,
                                                             tmp_path, monkeypatch):
    """One data pass: two proxy variants of one DINO (each window through DINO once), a
    clip_self variant and csa; each record equals its single run, keys differ by proxy."""
    calls = []
    forward = proxy_mod.ProxyBackbone.forward
    monkeypatch.setattr(proxy_mod.ProxyBackbone, "forward",
                        lambda self, x: calls.append(x.shape[0]) or forward(self, x))
    base = [*tiny_inproc, "dataset=voc20", f"data_root={voc}", *SMALL]
    variants = (f"variants=['attention=proxy proxy=dino_vitb8 proxy.pretrained={dino_file}',"
                f"'attention=proxy proxy=dino_vitb8 proxy.pretrained={dino_file} "
                "attention.gamma=5',"
                "'attention=proxy proxy=clip_self proxy.layer=2','attention=csa']")
    recs = evaluate_in_process([*base, variants], tmp_path / "multi")
    assert [r["summary"]["proxy"] for r in recs] == ["dino_vitb8", "dino_vitb8", "clip_self",
                                                     None]
    height, width = resized_shape(50, 70, 64)
    assert sum(calls) == 2 * len(Preprocess(64, 48, 32).boxes(height, width))
    dino_id = recs[0]["model"]["proxy"]
    assert dino_id["proxy"] == "dino_vitb8" and dino_id["layer"] == 12
    assert dino_id["weights"] == file_digest(dino_file)
    assert len({r["key"] for r in recs}) == 4
    single = evaluate_in_process([*base, *dino(dino_file), "attention.gamma=5"],
                                 tmp_path / "single")[0]
    assert single["key"] == recs[1]["key"] and single["metrics"] == recs[1]["metrics"]
    csa = evaluate_in_process([*base, "attention=csa", f"proxy.pretrained={dino_file}"],
                              tmp_path / "csa")[0]
    assert csa["key"] == recs[3]["key"]  # a proxy setting leaves csa's key alone


def test_result_key_follows_the_proxy_only_where_it_is_read(dino_file):
    from hydra import compose, initialize_config_dir

    from sclip_lab.config import CONF_DIR

    def key(*overrides):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return result_key(compose("run", overrides=list(overrides)))

    assert key("attention=csa") == key("attention=csa", "proxy=clip_self")
    assert key(*CLIP_SELF) != key("attention=proxy", "proxy=clip_self", "proxy.layer=3")
    assert key(*CLIP_SELF) != key(*dino(dino_file))
    assert key(*dino(dino_file)) != key(*dino(dino_file), "attention.beta=1.0")


def test_trunk_cache_keeps_proxy_results(tiny_inproc, voc, dino_file, tmp_path):
    base = [*tiny_inproc, "dataset=voc20", f"data_root={voc}", *SMALL, *dino(dino_file)]
    plain = evaluate_in_process(base, tmp_path / "plain")[0]
    cache = [f"trunk_cache={tmp_path / 'trunks'}"]
    cold = evaluate_in_process([*base, *cache], tmp_path / "cold")[0]
    warm = evaluate_in_process([*base, *cache], tmp_path / "warm")[0]
    assert warm["timings"]["trunk_cache_hits"] == 2
    assert plain["metrics"] == cold["metrics"] == warm["metrics"]


def test_non_square_whole_image_window_keeps_rows_and_columns(tiny_inproc, dino_file,
                                                              tmp_path):
    """One whole-image window of 56×96 px: DINO's grid is 7×12 (rows, cols), and the
    logits come back at the image size."""
    from hydra import compose, initialize_config_dir

    from sclip_lab.build import segmenter_from_config
    from sclip_lab.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[*tiny_inproc, *dino(dino_file),
                                        "preprocess.short_side=56", "preprocess.window=null"])
    seg, _ = segmenter_from_config(cfg, ["cat", "dog", "grass"], 40.0, 0.0, None)
    image = torch.randint(0, 255, (56, 96, 3), dtype=torch.uint8).numpy()
    groups = seg.encode_heads([seg.prep(image)], seg.heads)
    (feats,) = (g.trunk.proxy[seg.heads[0].last.proxy] for g in groups)
    assert feats.shape == (1, 768, 7, 12)
    assert seg.logits(image).shape == (3, 56, 96)


def test_visualize_draws_proxy_maps_beside_clip(tiny, dino_file, tmp_path):
    import numpy as np
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)).save(photo)
    proc = cli("visualize", *tiny, f"image={photo}", "size=48", f"output={tmp_path / 'fig'}",
               "points=[[10,10],[80,50]]",
               "attentions=['attention=csa',"
               f"'attention=proxy proxy=dino_vitb8 proxy.pretrained={dino_file}',"
               "'attention=proxy proxy=clip_self proxy.layer=2']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fig" / "attention.png").stat().st_size > 0


@pytest.mark.e2e
def test_cli_runs_proxyclip_from_a_random_init_file(tiny, voc, dino_file, tmp_path):
    """The README's command: attention=proxy proxy=dino_vitb8 proxy.pretrained=FILE, under
    its own protocol."""
    out = tmp_path / "run"
    proc = cli("run", *tiny, "dataset=voc20", f"data_root={voc}", "logger=none",
               *dino(dino_file), "protocol=proxyclip", "preprocess.short_side=112",
               f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "proxy       dino_vitb8 (vit_base_patch8_224.dino)" in proc.stdout + proc.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["summary"]["protocol"] == "proxyclip"
    assert record["summary"]["crop"] == 336 and record["summary"]["stride"] == 112
