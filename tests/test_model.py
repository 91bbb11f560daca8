"""Model room: loading every checkpoint format, the dense forward, pos-embed interpolation."""

from __future__ import annotations

import logging
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, openai_state_dict

from sclip_lab import precision
from sclip_lab.errors import ConfigError
from sclip_lab.model import (
    DenseEncoder,
    ModelError,
    interpolate_pos_embed,
    load_clip,
    resolve_precision,
)
from sclip_lab.pipeline import build_last_block


def _quickgelu(model) -> bool:
    act = model.visual.transformer.resblocks[0].mlp.gelu
    return isinstance(act, open_clip.transformer.QuickGELU)


def test_vanilla_pooled_equals_open_clip_encode_image(tiny_model):
    enc = DenseEncoder(tiny_model.visual)
    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ours = enc.pooled(images, build_last_block({"name": "vanilla"}, None, enc))
        ref = tiny_model.encode_image(images)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_vitb16_openai_file_loads_with_quickgelu_and_matches_encode_image(vitb16_checkpoint):
    # A plain "ViT-B-16" request with OpenAI weights must still build QuickGELU.
    model, info = load_clip("ViT-B-16", str(vitb16_checkpoint), "fp32", "cpu")
    assert info["openai_format"] and info["quick_gelu"] and info["arch"] == "ViT-B-16-quickgelu"
    assert _quickgelu(model)
    sd = torch.load(vitb16_checkpoint, weights_only=True)
    torch.testing.assert_close(model.visual.proj, sd["visual.proj"])
    enc = DenseEncoder(model.visual)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = enc.pooled(images, build_last_block({"name": "vanilla"}, None, enc))
        ref = model.encode_image(images)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    feats = enc(torch.randn(1, 3, 224, 336), build_last_block({"name": "csa"}, None, enc))
    assert feats.shape == (1, 14 * 21, 512)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(1, 14 * 21))


def test_open_clip_format_keeps_the_architecture_activation(tiny_config_file, tmp_path):
    torch.manual_seed(1)
    src = open_clip.create_model(TINY)
    path = tmp_path / "openclip.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                          src.state_dict().items()}}, path)
    model, info = load_clip(TINY, str(path), "fp32", "cpu")
    assert not info["openai_format"]
    torch.testing.assert_close(model.visual.proj, src.visual.proj)


def test_safetensors_checkpoint(tiny_config_file, tmp_path):
    from safetensors.torch import save_file

    src = open_clip.create_model(TINY)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, _ = load_clip(TINY, str(path), "fp32", "cpu")
    torch.testing.assert_close(model.visual.conv1.weight, src.visual.conv1.weight)


def test_torchscript_archive_is_openai_format(tiny_config_file, tmp_path):
    torch.manual_seed(2)
    src = open_clip.create_model(TINY).eval()
    # A TorchScript archive whose state dict has OpenAI's key layout and metadata buffers.
    holder = torch.nn.Module()
    for name, tensor in openai_state_dict(src).items():
        parent = holder
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_buffer(leaf, tensor)
    archive = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(holder), archive)
    model, info = load_clip(TINY, str(archive), "fp32", "cpu")
    assert info["openai_format"] and _quickgelu(model)
    torch.testing.assert_close(model.visual.proj, src.visual.proj)


def test_non_clip_checkpoint_is_refused(tmp_path, tiny_config_file):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(ModelError, match=r"not a CLIP checkpoint \(no visual.conv1 or "
                       r"visual.trunk keys\); pass an open_clip or OpenAI CLIP weights file"):
        load_clip(TINY, str(path), "fp32", "cpu")
    tower = tmp_path / "timm_tower.pt"  # timm's model.safetensors of an image tower alone
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, tower)
    with pytest.raises(ModelError, match=r"an image tower alone, no text tower\); .*"
                       r"open_clip_model.safetensors"):
        load_clip(TINY, str(tower), "fp32", "cpu")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError, match="not a readable checkpoint"):
        load_clip(TINY, str(junk), "fp32", "cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_clip(TINY, str(tmp_path / "missing.pt"), "fp32", "cpu")


def test_checkpoint_of_another_architecture_is_refused(tiny_checkpoint):
    with pytest.raises(ModelError, match="does not fit model.arch"):
        load_clip("ViT-B-32-quickgelu", str(tiny_checkpoint), "fp32", "cpu")


def test_unknown_arch_and_hub_weights_that_cannot_be_had(tiny_config_file, monkeypatch):
    """An unknown arch; a tag the arch does not have (its tags listed); registered weights
    not cached while offline; a failed download online: one line each, naming the file."""
    from huggingface_hub import constants

    with pytest.raises(ModelError, match="unknown model.arch"):
        load_clip("ViT-Q-99", "none")
    with pytest.raises(ModelError, match=r"^model.pretrained=openai is not a hub tag of "
                       rf"{TINY} \(its tags: none\); pass one, or a weights file: "
                       rf"model.pretrained=/path/to/{TINY}.pt$"):
        load_clip(TINY, "openai", "fp32", "cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(open_clip, "create_model", _unreachable)
    with pytest.raises(ModelError, match=r"^weights 'openai' are not in the local cache and "
                       r"the hub is offline: pass model.pretrained=/path/to/ViT-B-16.pt or "
                       r"go online$"):
        load_clip("ViT-B-16", "openai", "fp32", "cpu")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelError, match=r"^could not get weights 'openai' for "
                       r"ViT-B-16-quickgelu \(RuntimeError: no network\); without hub "
                       r"access pass a local file: model.pretrained=/path/to/ViT-B-16.pt$"):
        load_clip("ViT-B-16", "openai", "fp32", "cpu")


def _unreachable(*args, **kwargs):
    raise RuntimeError("no network")


def test_precision_choices(tiny_checkpoint):
    model, info = load_clip(TINY, str(tiny_checkpoint), "bf16", "cpu")
    assert info["precision"] == "bf16" and model.visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="precision"):
        load_clip(TINY, str(tiny_checkpoint), "fp8", "cpu")
    _, auto = load_clip(TINY, str(tiny_checkpoint), "auto", "cpu")
    assert auto["precision"] == "fp32"


@pytest.mark.parametrize("native", [False, True])
def test_cpu_precision_advice_once_per_process(monkeypatch, caplog, native):
    monkeypatch.setattr(precision, "cpu_native", lambda p: native or p == "fp32")
    precision.advise.cache_clear()
    caplog.set_level(logging.INFO, logger="sclip_lab.precision")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for _ in range(3):
        assert resolve_precision("bf16", cpu) == "bf16"
        assert resolve_precision("auto", cpu) == "fp32"  # auto never picks bf16 on CPU
        resolve_precision("bf16", cuda), resolve_precision("fp32", cpu)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    if native:
        assert not warnings and len(infos) == 2 and "precision=bf16 is faster" in infos[1]
    else:
        assert infos == [] and len(warnings) == 1
        assert "emulated" in warnings[0] and "use precision=fp32 (or auto)" in warnings[0]
    precision.advise.cache_clear()


def test_one_precision_table_and_resolver_for_clip_and_the_proxies():
    """``precision.resolve``: names and the table's torch dtypes (a proxy following CLIP's
    encoder) give the same name; anything else is the caller's error, the same line."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.resolve("auto", cuda) == "fp16" and precision.resolve("auto", cpu) == "fp32"
    assert [precision.resolve(d, cuda) for d in precision.PRECISIONS.values()] == list(
        precision.PRECISIONS)
    with pytest.raises(ConfigError, match=r"^precision=torch.float64 is not one of fp32\|"):
        precision.resolve(torch.float64, cpu)
    with pytest.raises(ModelError, match=r"^precision='fp8' is not one of auto\|fp32\|"):
        resolve_precision("fp8", cpu)


def test_native_probe_tolerates_a_torch_without_it(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: 1 / 0, raising=False)
    assert precision.cpu_native("bf16") is False and precision.cpu_native("fp32")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert precision.cpu_native("bf16")


def _reference_pos_embed(pos, h, w):
    """Independent transcription of docs/protocol.md §1's interpolation rule."""
    g = int(math.sqrt(pos.shape[0] - 1))
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic",
                        align_corners=False)
    return torch.cat([pos[:1], out.permute(0, 2, 3, 1).reshape(h * w, -1)])


@pytest.mark.parametrize("grid", [(21, 28), (14, 21), (9, 14), (28, 28)])
def test_pos_embed_interpolation(grid):
    pos = torch.randn(1 + 14 * 14, 32)
    out = interpolate_pos_embed(pos, grid)
    torch.testing.assert_close(out, _reference_pos_embed(pos, *grid))
    assert out.shape == (1 + grid[0] * grid[1], 32)
    assert interpolate_pos_embed(pos, (14, 14)) is pos


def test_dense_features_for_non_square_windows(tiny_model):
    enc = DenseEncoder(tiny_model.visual)
    last = build_last_block({"name": "csa"}, None, enc)
    feats = enc(torch.randn(2, 3, 160, 224), last)
    assert feats.shape == (2, 10 * 14, 32)


def test_the_precision_tip_is_said_once_per_cache_dir(monkeypatch, caplog, tmp_path):
    """The bf16 tip of precision=auto is a tip, not a problem: once per cache_dir, across
    processes (a marker there); a cache that cannot be written says it every time."""
    monkeypatch.setattr(precision, "cpu_native", lambda p: True)
    caplog.set_level(logging.INFO, logger="sclip_lab.precision")
    cpu = torch.device("cpu")
    for _ in range(2):  # two commands: the process cache is cleared between them
        precision.advise.cache_clear()
        assert resolve_precision("auto", cpu, str(tmp_path / "cache")) == "fp32"
    tips = [r for r in caplog.records if "precision=bf16 is faster" in r.getMessage()]
    assert len(tips) == 1 and (tmp_path / "cache" / ".said-precision-auto-bf16").is_file()
    blocked = tmp_path / "file"
    blocked.write_text("")  # a cache_dir that is a file: nothing can be marked
    for _ in range(2):
        precision.advise.cache_clear()
        resolve_precision("auto", cpu, str(blocked))
    tips = [r for r in caplog.records if "precision=bf16 is faster" in r.getMessage()]
    assert len(tips) == 3
    precision.advise.cache_clear()


def test_hub_weights_offline_are_one_line_without_open_clips_error(monkeypatch, caplog,
                                                                   tmp_path):
    """A hub tag that is not in the local cache with the hub offline: the lab's one line
    (open_clip's own ERROR record is dropped), naming the file to pass instead."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelError) as e:
        load_clip("ViT-B-32", "openai", "fp32", "cpu")
    assert str(e.value) == ("weights 'openai' are not in the local cache and the hub is "
                            "offline: pass model.pretrained=/path/to/ViT-B-32.pt or go online")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
