"""The last-block recipe: declared knobs, composable block, presets that keep old numbers
and old result keys, protocols.

The official code of ClearCLIP and NACLIP is checked in ``test_fidelity.py``; here the lab
is checked against itself: features frozen before the refactor (``golden_last_block.py``),
recipe ≡ preset equivalences, and the contract every variant gets from its declarations.
"""

from __future__ import annotations

import golden_last_block as golden
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab import attention as attn
from sclip_lab import records
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import head_spec
from sclip_lab.knobs import Knob
from sclip_lab.pipeline import build_last_block


@pytest.fixture(scope="module")
def frozen():
    enc, trunk = golden.model_and_trunk()
    return enc, trunk, torch.load(golden.GOLDEN, weights_only=False)


def test_presets_reproduce_the_features_frozen_before_the_recipe(frozen):
    enc, trunk, saved = frozen
    assert [tuple(map(repr, c)) for c in saved["cases"]] == [tuple(map(repr, c))
                                                            for c in golden.CASES]
    for (attention, projection), want, got in zip(golden.CASES, saved["features"],
                                                  golden.outputs(enc, trunk)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5,
                                   msg=lambda m, a=attention, p=projection: f"{a} {p}: {m}")


@pytest.fixture(scope="module")
def trunk(enc):
    torch.manual_seed(0)
    with torch.no_grad():
        return enc.trunk(torch.randn(2, 3, 96, 128), early_layers=(1,))


def block_out(enc, trunk, attention, projection=None):
    with torch.no_grad():
        return enc.last_block(trunk, build_last_block(attention, projection, enc))


RECIPE = {"name": "recipe", "temperature": 8.0, "combine": "sum", "sigma": None}
EQUIVALENT = [
    ({"name": "clearclip"}, {**RECIPE, "scores": ["qq"], "residual": False, "ffn": False}),
    ({"name": "naclip", "sigma": 5.0},
     {**RECIPE, "scores": ["kk"], "sigma": 5.0, "residual": False, "ffn": False}),
    ({"name": "vanilla"}, {**RECIPE, "scores": ["qk"]}),
    ({"name": "maskclip"}, {**RECIPE, "scores": ["id"]}),
    ({"name": "csa", "temperature": 8.0, "combine": None}, {**RECIPE, "scores": ["qq", "kk"]}),
    ({"name": "sharpen", "temperature": 8.0}, {"name": "vanilla"}),
    ({"name": "sharpen", "temperature": 0.0}, {**RECIPE, "scores": ["qk"], "temperature": 0}),
    ({"name": "local", "kernel": 3, "alpha": 1.0, "residual": True}, {"name": "local"}),
    ({"name": "local", "kernel": 5}, {**RECIPE, "scores": ["qk"], "kernel": 5}),
    ({"name": "recipe", "scores": ["qq", "kk"], "temperature": [8.0, 8.0]},
     {**RECIPE, "scores": ["qq", "kk"]}),
]


@pytest.mark.parametrize("a,b", EQUIVALENT, ids=lambda s: str(s)[:40])
def test_presets_are_recipes(enc, trunk, a, b):
    torch.testing.assert_close(block_out(enc, trunk, a), block_out(enc, trunk, b))


def test_alpha_scales_the_attention_output_only(enc, trunk):
    plain = block_out(enc, trunk, {"name": "clearclip"})
    bias = enc.visual.transformer.resblocks[-1].attn.out_proj.bias
    torch.testing.assert_close(block_out(enc, trunk, {"name": "clearclip", "alpha": 2.0}),
                               2 * plain)
    # with the residual: x + α·o, so the α=2 output minus the α=1 output is o itself
    a1 = block_out(enc, trunk, {"name": "vanilla", "ffn": False})
    a2 = block_out(enc, trunk, {"name": "vanilla", "ffn": False, "alpha": 2.0})
    o = block_out(enc, trunk, {"name": "vanilla", "ffn": False, "residual": False})
    torch.testing.assert_close(a2 - a1, o, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(o, bias.expand_as(o))


def test_residual_and_ffn_are_independent(enc, trunk):
    block = enc.visual.transformer.resblocks[-1]
    o = block_out(enc, trunk, {"name": "clearclip"})
    ffn_only = block_out(enc, trunk, {"name": "clearclip", "ffn": True})
    torch.testing.assert_close(ffn_only, o + block.mlp(block.ln_2(o)))
    res_only = block_out(enc, trunk, {"name": "clearclip", "residual": True})
    torch.testing.assert_close(res_only, trunk.x + o)
    full = block_out(enc, trunk, {"name": "clearclip", "residual": True, "ffn": True})
    torch.testing.assert_close(full, res_only + block.mlp(block.ln_2(res_only)))


def test_neighbourhood_only_is_a_gaussian_scaled_by_the_mean_norm_product(enc, trunk):
    last = build_last_block({**RECIPE, "scores": ["nonly"], "sigma": 2.0}, None, enc)
    inputs = enc.last_inputs(trunk, last)
    A = last.attention(inputs)
    q, k = inputs.q[1], inputs.k[1]  # second window alone: its own scale
    c = torch.stack([q[h].norm(dim=-1)[:, None] * k[h].norm(dim=-1)[None, :]
                     for h in range(q.shape[0])]).mean() / 8
    want = (attn.gaussian_grid_bias(trunk.grid, 2.0) * c).softmax(-1)
    torch.testing.assert_close(A[1, 0], want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(A[1, 1], want, atol=1e-6, rtol=1e-5)  # one map for all heads


@pytest.mark.parametrize("attention,match", [
    ({**RECIPE, "scores": ["xx"]}, "unknown term 'xx'.*qk"),
    ({**RECIPE, "scores": []}, r"scores=\[\] is empty"),
    ({"name": "vanilla", "alpha": 0.0}, "alpha=0.0 is out of range"),
    ({"name": "vanilla", "alpha": -1}, "alpha must be a number > 0"),
    ({"name": "vanilla", "alpha": float("nan")}, "alpha=nan must be a finite number"),
    ({"name": "vanilla", "residual": "maybe"}, "residual='maybe' is not true/false"),
    ({"name": "sharpen", "kernel": 3}, "attention=sharpen has no knob 'kernel'; its knobs: "
     "temperature"),
    ({"name": "clearclip", "sigma": 5}, "attention=clearclip has no knob 'sigma'"),
    ({**RECIPE, "scores": ["qq", "kk"], "temperature": [8.0]}, "2 scores"),
    ({**RECIPE, "scores": ["nonly"]}, "set attention.sigma"),
    ({**RECIPE, "scores": ["nonly"], "sigma": 5, "temperature": 0}, "τ > 0"),
    ({**RECIPE, "combine": "max"}, "combine='max'; choose one of"),
    ({**RECIPE, "scores": ["id"], "kernel": 3}, "the id and nonly terms have none"),
    ({**RECIPE, "kernel": 4}, "kernel must be an odd integer ≥ 1"),
    ({"name": "early", "layer": 9}, "layer=9 is out of range: layer must be an integer ≥ 1 ≤ 4"),
])
def test_bad_knobs_are_one_error_naming_the_fix(enc, attention, match):
    with pytest.raises(ConfigError, match=match):
        build_last_block(attention, None, enc)


def test_a_new_variant_gets_validation_keys_and_summary_fields_from_its_declarations(enc,
                                                                                    trunk):
    @attn.register_attention("test_scaled", knobs=[Knob("gain", "float", 1.0, "", above=0)],
                             residual=False)
    def scaled(x, gain=1.0):
        """softmax(q kᵀ · gain / 8)."""
        return attn.softmax_attention(x.q * gain, x.k)

    try:
        assert block_out(enc, trunk, {"name": "test_scaled", "gain": 2.0}).shape == trunk.x.shape
        with pytest.raises(ConfigError, match="gain=0 is out of range"):
            build_last_block({"name": "test_scaled", "gain": 0}, None, enc)
        with pytest.raises(ConfigError, match="has no knob 'kernel'; its knobs: gain"):
            build_last_block({"name": "test_scaled", "kernel": 3}, None, enc)
        variant = attn.ATTENTIONS["test_scaled"]
        key = variant.key_section({"name": "test_scaled", "gain": 2.0, "residual": False,
                                   "ffn": None, "alpha": 1})
        assert key == {"name": "test_scaled", "gain": 2.0}  # block at its defaults: not keyed
        assert variant.key_section({"name": "test_scaled", "gain": 2.0, "ffn": False}) == {
            "name": "test_scaled", "gain": 2.0, "ffn": False}
        summary = head_spec({"name": "test_scaled", "gain": None}).summary()
        assert (summary["gain"], summary["residual"], summary["ffn"], summary["alpha"]) == (
            1.0, False, True, 1.0)
    finally:
        del attn.ATTENTIONS["test_scaled"]


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run", overrides=list(overrides)), resolve=True)


# Result keys computed before the recipe refactor (commit 7608591): old records stay valid.
OLD_KEYS = [
    ("", "7d9038c8bfbe685a"),
    ("attention=vanilla", "b05547a239491183"),
    ("attention=clearclip", "930ba84f30fae723"),
    ("attention=naclip", "57e880fa3a40e374"),
    ("attention=naclip sigma=3", "2393e1669a7d3338"),
    ("attention=maskclip", "d9f929002eab04d4"),
    ("attention=sharpen temperature=0", "6d686e9793c1ecf8"),
    ("attention=local kernel=5", "0b760667d73507e1"),
    ("attention=early layer=3", "4b98c9fec912bb94"),
    ("projection=random n=16", "c9866cf452200b7b"),
    ("projection=random n=4 trial=2", "1d95ba20c0eabb48"),
    ("projection=learned", "4216ab522d701742"),
    ("projection=identity", "889a0726f219fd6a"),
    ("attention=csa temperature=4", "79e7bbb7be6c868b"),
    ("postprocess=pamr", "5e11866265aad046"),
    ("dataset=ade20k attention=naclip postprocess=pamr", "040f16e82c04bedf"),
    ("preprocess=mode3", "45f3ea5858426a55"),
    ("attention.combine=mean", "f43d9d81db049ed9"),
    # a block knob at the variant's own value changes nothing, so neither does its key
    ("attention=naclip attention.residual=false attention.alpha=1", "57e880fa3a40e374"),
    ("protocol=sclip", "7d9038c8bfbe685a"),
]


def test_old_overrides_keep_their_result_keys():
    for overrides, key in OLD_KEYS:
        assert records.result_key(resolved(*overrides.split())) == key, overrides


def test_new_knobs_and_protocols_get_new_keys_and_are_recorded():
    base = resolved("attention=naclip")
    assert records.result_key(resolved("attention=naclip", "attention.ffn=true")) != \
        records.result_key(base)
    summary = records.summary_of(resolved("attention=recipe", "attention.scores=[qq,kk]",
                                          "attention.residual=false"), {})
    assert (summary["scores"], summary["residual"], summary["ffn"], summary["alpha"]) == (
        "qq+kk", False, True, 1.0)
    assert records.summary_of(base, {})["protocol"] == "sclip"
    naclip = resolved("protocol=naclip", "attention=naclip")
    assert records.result_key(naclip) != records.result_key(base)
    assert records.summary_of(naclip, {})["protocol"] == "naclip"


@pytest.mark.parametrize("protocol,dataset,want", [
    ("sclip", "voc21", (336, 224, 112, 65.0, 0.1, 0.1, "none")),
    ("naclip", "voc21", (336, None, 112, 40.0, 0.1, None, "pamr")),
    ("naclip", "cityscapes", (560, 224, 112, 40.0, 0.0, None, "pamr")),
    ("naclip", "coco_stuff", (336, 224, 112, 40.0, 0.0, None, "pamr")),
    ("clearclip", "voc21", (448, 448, 224, 50.0, 0.5, None, "none")),
    ("clearclip", "context60", (448, 448, 224, 50.0, 0.15, None, "none")),
    ("clearclip", "cityscapes", (448, 224, 224, 50.0, 0.0, None, "none")),
])
def test_protocols_set_each_methods_evaluation(protocol, dataset, want):
    cfg = resolved(f"protocol={protocol}", f"dataset={dataset}")
    p, d = cfg["preprocess"], cfg["dataset"]
    got = (p["short_side"], p["window"], p["stride"], d["logit_scale"], d["prob_thd"],
           d["area_thd"], cfg["postprocess"]["name"])
    assert got == want
    assert cfg["protocol"]["name"] == protocol


def test_clearclip_protocol_names_each_class_once():
    from sclip_lab.data import spec_from_config

    voc = spec_from_config(resolved("protocol=clearclip", "dataset=voc21")["dataset"])
    assert voc.classes[0] == "background" and all("," not in c for c in voc.classes)
    sclip = spec_from_config(resolved("dataset=voc21")["dataset"])
    assert len(voc.classes) == len(sclip.classes) and "," in sclip.classes[0]


def test_command_line_wins_over_the_protocol():
    cfg = resolved("protocol=naclip", "postprocess=none", "dataset.logit_scale=55")
    assert cfg["postprocess"]["name"] == "none" and cfg["dataset"]["logit_scale"] == 55
    assert resolved("protocol=naclip", "preprocess=mode3")["preprocess"]["window"] == 336
