"""Every timm tower family end to end through the entry points' code (run with variants=,
predict, the sigmoid text head), from a local weights file in open_clip's hub layout
(``open_clip_model.safetensors``), with a test tokenizer where the family's is a hub one."""

from __future__ import annotations

import json

import cv2
import numpy as np
import open_clip
import pytest
import torch
from conftest import cli, evaluate_in_process
from PIL import Image
from safetensors.torch import save_file
from synthetic import write_benchmark
from towers import SIGLIP_TIMM, SIGLIP_WIDTH, TinyTokenizer

from sclip_lab import text
from sclip_lab.errors import ConfigError
from sclip_lab.model import ModelError, load_clip

SMALL_TEXT = {"width": 64, "heads": 2, "layers": 1}
FAMILIES = {  # arch -> (open_clip model config, the tokenizer a test provides or None)
    "sclip-tiny-siglip2-timm": ({
        "embed_dim": SIGLIP_WIDTH, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": SIGLIP_TIMM,
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 100, **SMALL_TEXT,
                     "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2", "no_causal_mask": True,
                     "proj_bias": True, "pool_type": "last"}}, TinyTokenizer()),
    "sclip-tiny-pe-timm": ({  # PE-Core: CLS + MAP head, rotary; open_clip's CLIP tokenizer
        "embed_dim": 64, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": "sclip_test_pe_tiny",
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, **SMALL_TEXT}}, None),
    "sclip-tiny-eva02-timm": ({  # EVA-02: CLS token readout, rotary, SwiGLU
        "embed_dim": 128, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": "sclip_test_eva02_tiny",
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "none"},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, **SMALL_TEXT}}, None),
}
SIGLIP, PE, EVA = FAMILIES


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """arch -> (config file, weights file): random towers saved as the hub's open_clip file."""
    root = tmp_path_factory.mktemp("timm-families")
    made = {}
    for arch, (config, tokenizer) in FAMILIES.items():
        folder = root / arch
        folder.mkdir()
        path = folder / f"{arch}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
        text.register_tokenizer(arch, tokenizer)
        torch.manual_seed(0)
        model = open_clip.create_model(arch)
        with torch.no_grad():  # zero-initialised latents, biases, layer scales: give values
            for p in model.visual.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, folder / "open_clip_model.safetensors")
        made[arch] = (path, folder / "open_clip_model.safetensors")
    yield made
    for arch in FAMILIES:
        text.register_tokenizer(arch, None)


def model_overrides(weights, arch, tmp_path) -> list[str]:
    config, ckpt = weights[arch]
    return [f"model.arch={arch}", f"model.config_file={config}", f"model.pretrained={ckpt}",
            f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "logger=none"]


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_each_timm_family_runs_variants_from_a_local_file(arch, weights, tmp_path):
    data = tmp_path / "data"
    write_benchmark(data, "voc21", num_images=1, size=(48, 64))
    variants = ["attention=vanilla", "attention=csa", "attention=naclip postprocess=pamr"]
    records = evaluate_in_process([*model_overrides(weights, arch, tmp_path), "dataset=voc21",
                                   f"data_root={data}", f"variants={json.dumps(variants)}"],
                                  tmp_path / "r")
    assert [r["summary"]["attention"] for r in records] == ["vanilla", "csa", "naclip"]
    for rec in records:
        assert 0.0 <= rec["metrics"]["mIoU"] <= 100.0
        back = rec["model"]["backbone"]
        assert back["tower"].startswith("timm ") and back["patch"] == 16
        assert back["native_size"] == 224 and back["text_scores"] == "softmax"
        assert rec["model"]["weights_sha256"]  # the local file's identity
    first = records[0]["model"]["backbone"]
    assert first["prefix_tokens"] == (0 if arch == SIGLIP else 1)
    assert ("cls" in first["provides"]) == (arch != SIGLIP)
    assert first["tokenizer"] == ("test/tiny-sentencepiece" if arch == SIGLIP
                                  else "SimpleTokenizer")


def test_sigmoid_scores_run_on_siglip_and_change_only_what_reads_probabilities(weights,
                                                                              tmp_path):
    """text.scores=sigmoid uses the model's scale and bias: a new result key and the head in
    the record; without a probability threshold (VOC-20) the class map is the softmax's,
    with one (VOC-21's prob_thd 0.1 on absolute sigmoid probabilities) it is not."""
    data = tmp_path / "data"
    write_benchmark(data, "voc20", num_images=1, size=(48, 64))
    write_benchmark(data, "voc21", num_images=1, size=(48, 64))
    base = [*model_overrides(weights, SIGLIP, tmp_path), f"data_root={data}"]
    runs = {}
    for ds in ("voc20", "voc21"):
        for scores in ("softmax", "sigmoid"):
            (runs[ds, scores],) = evaluate_in_process(
                [*base, f"dataset={ds}", f"text.scores={scores}"], tmp_path / f"{ds}-{scores}")
    soft, sig = runs["voc20", "softmax"], runs["voc20", "sigmoid"]
    assert soft["key"] != sig["key"]
    head = sig["model"]["backbone"]["sigmoid_head"]
    assert head["bias"] == -10.0 and head["scale"] == pytest.approx(1 / 0.07)  # open_clip init
    assert soft["model"]["backbone"]["sigmoid_head"] is None
    assert sig["metrics"] == soft["metrics"]
    # random towers: sigmoid(cos/0.07 − 10) < 0.1 everywhere, so VOC-21 becomes all background
    assert runs["voc21", "sigmoid"]["per_class_iou"] != runs["voc21", "softmax"]["per_class_iou"]


def test_sigmoid_scores_on_a_softmax_backbone_are_one_line(weights, tmp_path):
    data = tmp_path / "data"
    write_benchmark(data, "voc20", num_images=1, size=(48, 64))
    with pytest.raises(ConfigError, match=r"text.scores=sigmoid needs a sigmoid backbone"):
        evaluate_in_process([*model_overrides(weights, PE, tmp_path), "dataset=voc20",
                             f"data_root={data}", "text.scores=sigmoid"], tmp_path / "r")
    with pytest.raises(ConfigError, match=r"unknown text.scores='tanh'"):
        evaluate_in_process([*model_overrides(weights, PE, tmp_path), "dataset=voc20",
                             f"data_root={data}", "text.scores=tanh"], tmp_path / "r2")


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_predict_on_each_timm_family(arch, weights, tmp_path):
    from hydra import compose, initialize_config_dir

    from sclip_lab.config import CONF_DIR
    from sclip_lab.predict import predict

    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))
    out = tmp_path / "pred.png"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("predict", overrides=[*model_overrides(weights, arch, tmp_path),
                                            f"image={image}", f"output={out}",
                                            "classes=[cat, dog, sky]", "attention=naclip"])
        pred = predict(cfg)
    assert pred.shape == (40, 56) and set(np.unique(pred)) <= {0, 1, 2}
    np.testing.assert_array_equal(np.array(Image.open(out)), pred)  # the index PNG


def test_a_method_a_family_cannot_host_is_refused_by_run(weights, tmp_path):
    data = tmp_path / "data"
    write_benchmark(data, "voc20", num_images=1, size=(48, 64))
    with pytest.raises(ConfigError) as e:
        evaluate_in_process([*model_overrides(weights, SIGLIP, tmp_path), "dataset=voc20",
                             f"data_root={data}", "attention=scclip_attention"], tmp_path / "r")
    assert "CLS" in str(e.value) and "\n" not in str(e.value)


def test_a_weights_file_of_another_family_is_named(weights):
    config, siglip_file = weights[SIGLIP]
    with pytest.raises(ModelError) as e:
        load_clip(PE, str(siglip_file), "fp32", "cpu")
    assert str(e.value) == (
        f"{siglip_file} does not fit model.arch={PE}: it looks like a SigLIP-style timm tower "
        "of width 128, 3 blocks, 16-pixel patches at 224 px; set model.arch (and "
        "model.config_file) to its architecture")


@pytest.mark.e2e
def test_the_cli_runs_and_predicts_on_timms_own_siglip_and_pe_towers(tmp_path):
    """``python -m sclip_lab.run`` / ``predict`` on timm's real SigLIP B/16 and PE-Core tiny
    towers (random weights, small text towers on open_clip's bundled tokenizer)."""
    configs = {
        # (not "siglip" in the name: open_clip would pick the hub SigLIP tokenizer by it)
        "sclip-e2e-map-b16": {
            "embed_dim": 768, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224",
                           "timm_model_pretrained": False, "timm_pool": "map",
                           "timm_proj": "none"},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, **SMALL_TEXT,
                         "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}},
        "sclip-e2e-pe": {
            "embed_dim": 192, "custom_text": True,
            "vision_cfg": {"image_size": 384, "timm_model_name": "vit_pe_core_tiny_patch16_384",
                           "timm_model_pretrained": False, "timm_pool": "map",
                           "timm_proj": "none"},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, **SMALL_TEXT}},
    }
    data = tmp_path / "data"
    write_benchmark(data, "voc21", num_images=1, size=(48, 64))
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))
    for arch, config in configs.items():
        path = tmp_path / f"{arch}.json"
        path.write_text(json.dumps(config))
        common = [f"model.arch={arch}", f"model.config_file={path}", "model.pretrained=none",
                  f"cache_dir={tmp_path / 'cache'}", "num_workers=0"]
        out = tmp_path / arch
        proc = cli("run", *common, "logger=none", "dataset=voc21", f"data_root={data}",
                   "variants=['attention=csa', 'attention=naclip']", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = sorted(out.rglob("result.json"))
        assert len(results) == 2 and "mIoU" in proc.stderr + proc.stdout
        pred = tmp_path / f"{arch}.png"
        proc = cli("predict", *common, f"image={image}", f"output={pred}",
                   "classes=[cat, dog]", f"hydra.run.dir={out / 'predict'}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert np.array(Image.open(pred)).shape == (40, 56)


# README "Backbones": what each timm family refuses, and the words of its reason.
PATHS = {"surgery", "gem", "scclip", "sfp", "resclip"}  # their own path over open_clip's blocks
REFUSED = {SIGLIP: PATHS | {"segearth_block", "scclip_attention", "proxy"},
           PE: PATHS | {"proxy"}, EVA: PATHS | {"proxy"}}
SMALL_KNOBS = {"early": ["layer=1"], "proxy": ["proxy=clip_self", "proxy.layer=1"],
               "surgery": ["attention.depth=1"], "scclip_attention": ["attention.pre_layer=1"]}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_every_method_runs_on_each_timm_family_or_refuses_in_one_line(arch, weights):
    """The backbone × method matrix of the README, on the run's own builder
    (``segmenter_from_config``'s ``build_segmenter`` with keep_going, as ``variants=``)."""
    from hydra import compose, initialize_config_dir

    from sclip_lab.build import segmenter_from_config
    from sclip_lab.config import CONF_DIR
    from sclip_lab.head_spec import head_spec_of

    config, ckpt = weights[arch]
    names = sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml"))
    base = [f"model.arch={arch}", f"model.config_file={config}", f"model.pretrained={ckpt}",
            "device=cpu", "precision=fp32"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfgs = [compose("run", overrides=[*base, "dataset=voc20", f"attention={n}",
                                          *SMALL_KNOBS.get(n, [])]) for n in names]
    heads = [(head_spec_of(c), None) for c in cfgs]
    seg, _ = segmenter_from_config(cfgs[0], ["cat", "dog"], 40.0, 0.0, None, heads=heads,
                                   keep_going=True)
    refused = {names[i]: str(e) for i, e in seg.skipped.items()}
    assert set(refused) == REFUSED[arch]
    for name, why in refused.items():
        assert "\n" not in why and len(why) <= 300
        assert ("CLS" in why) if name in {"segearth_block", "scclip_attention"} or (
            arch == SIGLIP and name == "proxy") else ("blocks" in why or "CLS" in why), why
    image = np.random.default_rng(1).integers(0, 255, (40, 56, 3), np.uint8)
    out = seg.logits_many([seg.prep(image)], [(40, 56)])  # [head][image]
    assert len(out) == len(seg.heads) == len(names) - len(refused)
    assert all(lg[0].shape == (2, 40, 56) and lg[0].isfinite().all() for lg in out)
