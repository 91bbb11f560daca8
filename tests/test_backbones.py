"""Backbone presets read from open_clip's registry, the ``preprocess=native`` window rule,
the methods table per backbone, and runs on random-init towers of the open_clip
``VisionTransformer`` families (LAION GELU, MetaCLIP QuickGELU, a patch-14 H/14-like)."""

from __future__ import annotations

import json
import logging

import numpy as np
import open_clip
import pytest
import torch
import yaml
from conftest import TINY_CONFIG, evaluate_in_process
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from synthetic import write_benchmark

from sclip_lab import backbones, tables
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError

# preset -> (arch, tag, native size, patch, context length, tokenizer, QuickGELU, tower)
EXPECTED = {
    "vit_b16_openai": ("ViT-B-16-quickgelu", "openai", 224, 16, 77, "clip", True, "open_clip"),
    "vit_b32_openai": ("ViT-B-32-quickgelu", "openai", 224, 32, 77, "clip", True, "open_clip"),
    "vit_l14_openai": ("ViT-L-14-quickgelu", "openai", 224, 14, 77, "clip", True, "open_clip"),
    "vit_l14_336_openai": ("ViT-L-14-336-quickgelu", "openai", 336, 14, 77, "clip", True,
                           "open_clip"),
    "vit_b16_laion2b": ("ViT-B-16", "laion2b_s34b_b88k", 224, 16, 77, "clip", False,
                        "open_clip"),
    "vit_l14_laion2b": ("ViT-L-14", "laion2b_s32b_b82k", 224, 14, 77, "clip", False,
                        "open_clip"),
    "vit_h14_laion2b": ("ViT-H-14", "laion2b_s32b_b79k", 224, 14, 77, "clip", False,
                        "open_clip"),
    "vit_b16_metaclip": ("ViT-B-16-quickgelu", "metaclip_fullcc", 224, 16, 77, "clip", True,
                         "open_clip"),
    "vit_l14_metaclip": ("ViT-L-14-quickgelu", "metaclip_fullcc", 224, 14, 77, "clip", True,
                         "open_clip"),
    "vit_h14_metaclip": ("ViT-H-14-quickgelu", "metaclip_fullcc", 224, 14, 77, "clip", True,
                         "open_clip"),
    "vit_h14_dfn": ("ViT-H-14-quickgelu", "dfn5b", 224, 14, 77, "clip", True, "open_clip"),
    "eva02_b16": ("EVA02-B-16", "merged2b_s8b_b131k", 224, 16, 77, "clip", False, "timm"),
    "eva02_l14": ("EVA02-L-14", "merged2b_s4b_b131k", 224, 14, 77, "clip", False, "timm"),
    "siglip_b16": ("ViT-B-16-SigLIP", "webli", 224, 16, 64, "timm/ViT-B-16-SigLIP", False,
                   "timm"),
    "siglip2_b16_256": ("ViT-B-16-SigLIP2-256", "webli", 256, 16, 64,
                        "timm/ViT-B-16-SigLIP2-256", False, "timm"),
    "siglip2_b16_384": ("ViT-B-16-SigLIP2-384", "webli", 384, 16, 64,
                        "timm/ViT-B-16-SigLIP2-384", False, "timm"),
    "siglip2_l16_256": ("ViT-L-16-SigLIP2-256", "webli", 256, 16, 64,
                        "timm/ViT-L-16-SigLIP2-256", False, "timm"),
    "pe_core_b16": ("PE-Core-B-16", "meta", 224, 16, 32, "clip", False, "timm"),
    "pe_core_l14_336": ("PE-Core-L-14-336", "meta", 336, 14, 32, "clip", False, "timm"),
}


def test_every_preset_is_in_open_clips_registry_and_its_facts_read():
    assert backbones.presets().keys() == EXPECTED.keys()
    for name, (arch, tag, size, patch, context, tokenizer, quick, tower) in EXPECTED.items():
        assert backbones.presets()[name] == (arch, tag)
        assert tag in open_clip.list_pretrained_tags_by_model(arch), name
        facts = backbones.backbone_facts(arch, tag)
        got = (facts.image_size, facts.patch_size, facts.context_length, facts.tokenizer,
               facts.quick_gelu, facts.tower)
        assert got == (size, patch, context, tokenizer, quick, tower), name
        pcfg = open_clip.get_pretrained_cfg(arch, tag)
        assert facts.mean == tuple(pcfg["mean"]) and facts.std == tuple(pcfg["std"]), name
        assert facts.sigmoid == name.startswith("siglip"), name
        assert (facts.pool == "map") == (name.startswith(("siglip", "pe_"))), name
    assert backbones.backbone_facts("ViT-L-14-336-quickgelu", "openai").grid == 24


def test_the_three_original_presets_keep_their_keys_exactly():
    """Result keys hash the ``model`` section: these files must not gain or change keys."""
    for name, arch in (("vit_b16_openai", "ViT-B-16-quickgelu"),
                       ("vit_b32_openai", "ViT-B-32-quickgelu"),
                       ("vit_l14_openai", "ViT-L-14-quickgelu")):
        section = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
        assert section == {"arch": arch, "pretrained": "openai", "quick_gelu": None,
                           "config_file": None}


def test_unknown_arch_names_the_presets():
    with pytest.raises(ConfigError, match="vit_h14_laion2b") as info:
        backbones.backbone_facts("ViT-Nope-99", "")
    assert len(str(info.value)) <= 300 and "\n" not in str(info.value)


def _compose(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("run", overrides=list(overrides))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(MissingConfigException) as info:
        _compose("model=vit_nope")
    assert "vit_l14_336_openai" in str(info.value) and "pe_core_b16" in str(info.value)


@pytest.mark.parametrize("preset, window, stride", [
    ("vit_b16_openai", 224, 112), ("vit_l14_336_openai", 336, 168),
    ("siglip2_b16_384", 384, 192), ("vit_h14_laion2b", 224, 112)])
def test_native_windows_follow_the_backbone(preset, window, stride):
    cfg = _compose(f"model={preset}", "preprocess=native")
    assert (cfg.preprocess.window, cfg.preprocess.stride) == (window, stride)
    default = _compose(f"model={preset}")  # SCLIP's protocol: 224 / 112 on every backbone
    assert (default.preprocess.window, default.preprocess.stride) == (224, 112)


def test_native_windows_keep_whole_image_benchmarks_whole():
    cfg = _compose("model=vit_l14_336_openai", "preprocess=native", "protocol=naclip",
                   "dataset=voc21")
    assert cfg.preprocess.window == _compose("protocol=naclip", "dataset=voc21"
                                             ).preprocess.window


def test_arch_without_preset_warns_once_and_falls_back(caplog):
    backbones._WARNED.discard("sclip-no-preset")
    with caplog.at_level(logging.WARNING):
        cfg = _compose("model.arch=sclip-no-preset", "preprocess=native")
        assert (cfg.preprocess.window, cfg.preprocess.stride) == (224, 112)
        assert _compose("model.arch=sclip-no-preset", "preprocess=native").preprocess.stride == 112
    assert caplog.text.count("matches no preset") == 1
    assert "falls back to the default sizes" in caplog.text


@pytest.mark.parametrize("preset, folder", [
    ("vit_b16_openai", "methods/ViT-B-16-quickgelu"),  # the layout sweeps always had
    ("vit_b16_metaclip", "methods/ViT-B-16-quickgelu-metaclip_fullcc"),
    ("vit_h14_laion2b", "methods/ViT-H-14-laion2b_s32b_b79k")])
def test_methods_sweep_takes_a_model_axis_one_folder_per_backbone(preset, folder):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["+sweep=methods", f"model={preset}"],
                      return_hydra_config=True)
    assert str(cfg.hydra.sweep.dir).endswith(folder)
    assert cfg.sweep.group == folder.replace("/", "-")


# ---------------------------------------------------------------- methods table per backbone


def _record(root, n, model, pretrained, dataset, miou, attention="csa"):
    run = root / f"{n:03d}"
    run.mkdir(parents=True)
    summary = {"model": model, "pretrained": pretrained, "attention": attention,
               "projection": "qk" if attention == "csa" else None, "n": None, "trial": None,
               "combine": "sum" if attention == "csa" else None,
               "temperature": 8.0 if attention == "csa" else None, "window": None,
               "layer": None, "postprocess": "none", "crop": 224, "stride": 112,
               "precision": "fp32", "dataset": dataset, "short_side": 336, "mIoU": miou,
               "aAcc": 90.0, "mAcc": 70.0, "num_images": 1, "limit": None}
    (run / "result.json").write_text(json.dumps(
        {"status": "finished", "key": f"{n:08x}", "summary": summary,
         "sweep": {"table": "methods"}}))


def test_methods_table_gets_a_backbone_column_when_several_backbones(tmp_path):
    root = tmp_path / "runs"
    _record(root, 1, "ViT-B-16-quickgelu", "openai", "voc21", 59.0)
    _record(root, 2, "ViT-B-16-quickgelu", "openai", "voc20", 80.0)
    _record(root, 3, "ViT-H-14", "laion2b_s32b_b79k", "voc21", 41.0)
    records = tables.load_local_records(root)
    groups = tables.backbone_groups(records)
    assert [name for name, _ in groups] == ["ViT-B-16-quickgelu/openai",
                                            "ViT-H-14/laion2b_s32b_b79k"]
    path = tables.write_backbones("methods", records, tmp_path)
    import pandas as pd

    frame = pd.read_csv(path, index_col=0)
    assert path.name == "methods-backbones.csv" and frame.columns[0] == tables.BACKBONE
    sclip = frame.loc["SCLIP"]
    assert sclip[tables.BACKBONE].tolist() == ["ViT-B-16-quickgelu/openai",
                                               "ViT-H-14/laion2b_s32b_b79k"]
    assert sclip["voc21_mean"].tolist() == [59.0, 41.0]
    assert np.isnan(sclip["voc20_mean"].iloc[1])
    one = tables.load_local_records(root)[:2]  # one backbone: nothing more is written
    assert tables.write_backbones("methods", one, tmp_path / "none") is None


# ------------------------------------------------- random-init towers of each ViT family

FAMILIES = {  # name -> config changes of the tiny OpenAI-style ViT (conftest.TINY_CONFIG)
    "sclip-tiny-laion": {"quick_gelu": False},                       # LAION: GELU, /16
    "sclip-tiny-metaclip-quickgelu": {"quick_gelu": True},           # MetaCLIP: QuickGELU
    "sclip-tiny-h14": {"quick_gelu": False, "patch_size": 14},       # H/14-like: patch 14
}


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    made = {}
    for name, change in FAMILIES.items():
        config = json.loads(json.dumps(TINY_CONFIG))
        config["quick_gelu"] = change["quick_gelu"]
        config["vision_cfg"].update(layers=2, width=64, head_width=32,
                                    patch_size=change.get("patch_size", 16))
        path = folder / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
        torch.manual_seed(0)
        ckpt = folder / f"{name}.pt"
        torch.save(open_clip.create_model(name).state_dict(), ckpt)
        made[name] = (path, ckpt)
    return made


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_runs_variants_on_a_random_tower(family, family_checkpoints, tmp_path):
    config, ckpt = family_checkpoints[family]
    data = tmp_path / "data"
    write_benchmark(data, "voc20", num_images=1, size=(48, 64))
    window = ["preprocess.window=336", "preprocess.stride=168"] if "h14" in family else []
    records = evaluate_in_process(
        [f"model.arch={family}", f"model.config_file={config}", f"model.pretrained={ckpt}",
         f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "logger=none", "dataset=voc20",
         f"data_root={data}", *window,
         "variants=['attention=vanilla', 'attention=csa', 'attention=naclip']"], tmp_path / "r")
    assert len(records) == 3
    for rec in records:
        assert rec["summary"]["model"] == family
        assert 0.0 <= rec["metrics"]["mIoU"] <= 100.0


@pytest.mark.e2e
def test_every_leaderboard_method_runs_on_a_patch14_gelu_tower(tmp_path_factory, tmp_path):
    """The methods sweep's variants (ProxyCLIP aside: its own test needs a DINO file) on a
    12-block LAION-style tower with patch 14 and GELU: one shared trunk pass."""
    config = json.loads(json.dumps(TINY_CONFIG))
    config["quick_gelu"] = False
    config["vision_cfg"].update(layers=12, width=64, head_width=32, patch_size=14)
    path = tmp_path_factory.mktemp("deep14") / "sclip-deep-h14.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    ckpt = path.with_suffix(".pt")
    torch.save(open_clip.create_model("sclip-deep-h14").state_dict(), ckpt)
    sweep = yaml.safe_load((CONF_DIR / "sweep" / "methods.yaml").read_text())
    entries = [v for v in sweep["variants"] if "proxy" not in v]
    data = tmp_path / "data"
    write_benchmark(data, "voc20", num_images=1, size=(48, 64))
    records = evaluate_in_process(
        ["model.arch=sclip-deep-h14", f"model.config_file={path}", f"model.pretrained={ckpt}",
         f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "logger=none", "dataset=voc20",
         f"data_root={data}", f"variants={json.dumps(entries)}"], tmp_path / "r")
    assert len(records) == len(entries) == 18
    assert all(0.0 <= rec["metrics"]["mIoU"] <= 100.0 for rec in records)


def test_patch14_windows_stitch_to_the_full_image(family_checkpoints):
    """A patch-14 tower on 336 windows (24×24 patches, position table resized from 16×16)
    with stride 168: the stitched logits cover every pixel of the resized image."""
    from sclip_lab.api import Segmenter, load_config

    config, ckpt = family_checkpoints["sclip-tiny-h14"]
    cfg = load_config("naclip", model="sclip-tiny-h14", pretrained=ckpt,
                      classes=["a", "b", "c"], device="cpu", config_file=str(config))
    cfg.preprocess.window, cfg.preprocess.stride = 336, 168
    seg = Segmenter.from_config(cfg)
    assert (seg.prep.window, seg.prep.stride) == (336, 168)
    assert seg.prep.boxes(336, 528)[-1] == (0, 336, 192, 528)  # last window ends at the edge
    image = (np.random.default_rng(0).random((70, 110, 3)) * 255).astype(np.uint8)
    labels = seg.segment(image)
    assert labels.shape == (70, 110) and set(np.unique(labels)) <= {0, 1, 2}


@pytest.mark.e2e
def test_each_presets_signature_is_its_built_models_and_names_it():
    """What ``looks_like`` matches a weights file against (derived from open_clip's config)
    equals what the built tower's own state dict shows, for every preset; the meta device
    builds each without memory."""
    seen = {}
    for name, (arch, _) in backbones.presets().items():
        seen.setdefault(arch, []).append(name)
    for arch, names in seen.items():
        state = open_clip.create_model(arch, device="meta").state_dict()
        got, want = backbones.weights_signature(state), backbones.config_signature(arch)
        assert {k: v for k, v in want.items() if v is not None} == {
            k: got[k] for k, v in want.items() if v is not None}, arch
        words, fits = backbones.looks_like(state)
        assert set(names) <= set(fits), (arch, fits)
    words, fits = backbones.looks_like(
        open_clip.create_model("ViT-B-16-SigLIP2-256", device="meta").state_dict())
    assert (words, fits) == ("a SigLIP 2 B/16 tower at 256 px", ["siglip2_b16_256"])


def test_looks_like_reads_a_few_tensors_of_a_file():
    """The signature needs only the patch embedding, position table, block indices and
    text side: a file of those alone is recognised (and nothing else is read)."""
    state = {"visual.trunk.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
             "visual.trunk.pos_embed": torch.zeros(1, 576, 768),
             "text.positional_embedding": torch.zeros(64, 768),
             "text.token_embedding.weight": torch.zeros(256000, 1),
             "logit_bias": torch.zeros(())}
    state.update({f"visual.trunk.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
    assert backbones.looks_like(state) == ("a SigLIP 2 B/16 tower at 384 px",
                                           ["siglip2_b16_384"])
    state["visual.trunk.pos_embed"] = torch.zeros(1, 100, 768)
    assert backbones.looks_like(state) == (
        "a SigLIP-style timm tower of width 768, 12 blocks, 16-pixel patches at 160 px", [])
    assert backbones.looks_like({"fc.weight": torch.zeros(2)}) == ("no CLIP image tower", [])
