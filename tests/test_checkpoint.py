"""The one state-dict loader (sclip_lab.checkpoint) of CLIP and the proxy backbones: a file
that does not fit is one line naming the fix, refused before anything is copied; keys the
model lacks are one warning."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY
from torch import nn

from sclip_lab.checkpoint import load_state, mismatches
from sclip_lab.errors import MAX_LINE, UserError
from sclip_lab.model import ModelError, load_clip


class Fit(UserError):
    pass


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def test_a_file_that_fits_is_loaded_and_extra_keys_are_one_warning(caplog):
    model, src = _mlp(), _mlp()
    state = {**src.state_dict(), "decoder.weight": torch.zeros(1)}
    with caplog.at_level(logging.WARNING, logger="sclip_lab.checkpoint"):
        load_state(model, state, "w.pt", "the mlp", "pass its weights", error=Fit)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 src.state_dict().values()))
    (record,) = caplog.records
    assert "w.pt: ignored 1 unexpected keys" in record.getMessage() and "decoder.weight" in (
        record.getMessage())


def test_a_file_that_does_not_fit_is_refused_before_anything_is_copied():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in _mlp().state_dict().items()}
    state["0.weight"] = torch.ones(4, 2)  # another width
    del state["2.bias"]
    assert mismatches(model, state) == (["0.weight"], ["2.bias"])
    with pytest.raises(Fit) as e:
        load_state(model, state, "w.pt", "the mlp", "pass its weights", error=Fit)
    text = str(e.value)
    assert text == ("w.pt does not fit the mlp: 1 shape mismatches (e.g. 0.weight), "
                    "1 missing keys (e.g. 2.bias); pass its weights")
    assert e.value.detail == "shape mismatches: ['0.weight']; missing keys: ['2.bias']"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(Fit, match=r"^w.pt does not fit the mlp: 1 missing keys \(e.g. 2.bias\); "):
        load_state(model, {k: v for k, v in _mlp().state_dict().items() if k != "2.bias"},
                   "w.pt", "the mlp", "pass its weights", error=Fit)


def test_assign_takes_the_files_tensors_into_a_meta_model():
    with torch.device("meta"):
        model = nn.Linear(2, 3)
    state = {"weight": torch.ones(3, 2, dtype=torch.float16), "bias": torch.zeros(3)}
    load_state(model, state, "w.pt", "a layer", "pass its weights", assign=True)
    assert model.weight.device.type == "cpu" and model.weight.dtype == torch.float16


def test_clip_of_another_tower_is_named_within_one_line(tiny_checkpoint):
    """A file of another architecture is named by what it is, before any tensor is
    compared (backbones.looks_like)."""
    with pytest.raises(ModelError) as e:
        load_clip("ViT-B-32-quickgelu", str(tiny_checkpoint), "fp32", "cpu")
    assert str(e.value) == (
        f"{tiny_checkpoint} does not fit model.arch=ViT-B-32-quickgelu: it looks like an "
        "open_clip ViT tower of width 128, 4 blocks, 16-pixel patches at 224 px; set model.arch "
        "(and model.config_file) to its architecture")
    assert len(str(e.value)) - len(str(tiny_checkpoint)) <= MAX_LINE


def test_clip_reports_through_it_within_one_line(tiny_checkpoint, tmp_path):
    """A file of the right tower with tensors that do not fit: the loader's line, the count
    of both kinds, the fix at the end, every key behind --verbose (detail)."""
    state = torch.load(tiny_checkpoint, weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("ln_post.bias")}
    state["visual.proj"] = state["visual.proj"][:, :3]
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as e:
        load_clip(TINY, str(path), "fp32", "cpu")
    text = str(e.value)
    assert text == (f"{path} does not fit model.arch={TINY}: 1 shape mismatches "
                    "(e.g. visual.proj), 1 missing keys (e.g. visual.ln_post.bias); set "
                    "model.arch to the checkpoint's architecture")
    assert e.value.detail.startswith("shape mismatches: [")
