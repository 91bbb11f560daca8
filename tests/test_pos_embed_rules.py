"""The position-embedding rule per method (docs/protocol.md §1): GEM and CLIP Surgery off
the native grid against their official code, one trunk pass and one trunk-cache entry per
rule, the rule as a validated attention knob that enters result keys only off its default.

Transcribed (rewritten here, not copied), the embedding of each official forward:

* GEM — github.com/WalBouss/GEM @ 5fa677c, ``gem/gem_utils.py`` ``modified_vit_forward``
  (L155–180: conv1, CLS, ``x + resample_abs_pos_embed(pos, new_size=[grid_h, grid_w],
  num_prefix_tokens=1, interpolation='bicubic', antialias=True)``, ln_pre) and
  ``resample_abs_pos_embed`` (L12–43: the grid part reshaped to (1, D, g, g),
  ``F.interpolate(size=new_size, mode, antialias)``, the prefix row put back; the table
  itself when the size is unchanged).
* CLIP Surgery — github.com/xmed-lab/CLIP_Surgery @ d4696d4, ``clip/clip_surgery_model.py``
  ``VisionTransformer.forward`` (L329–346: side = √(table rows − 1), new_side = √(tokens −
  1), ``F.interpolate(new_pos, (new_side, new_side), mode='bilinear')``, reshaped back with
  ``reshape(-1, D, new_side²).transpose(1, 2)``; square grids only).

The blocks after the embedding are the transcriptions of ``test_methods_surgery_gem``.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_in_process, with_random_layernorms
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from synthetic import write_benchmark
from test_methods_surgery_gem import gem_forward, surgery_forward

from sclip_lab import records, segment
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import head_spec
from sclip_lab.pipeline import Head, Preprocess, Segmenter, build_last_block
from sclip_lab.pos_embed import DEFAULT_POS_EMBED, POS_EMBED_RULES, interpolate_pos_embed
from sclip_lab.trunk_cache import SUFFIX, digest, entry_name, open_cache

ATOL, RTOL = 1e-5, 1e-4
INFO = {"arch": "sclip-tiny-vit", "pretrained": "tiny.pt", "weights_sha256": "cd" * 32,
        "precision": "fp32", "device": "cpu"}


@pytest.fixture(scope="module")
def enc(enc):
    """The tiny encoder (native grid 14×14) with random LayerNorm gains and biases, so that
    GEM's adaptive τ differs per window."""
    return with_random_layernorms(enc)


def window(h: int, w: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ official transcriptions


def gem_resample(posemb, new_size):
    """GEM's ``resample_abs_pos_embed(posemb (1, 1 + g², D), new_size, num_prefix_tokens=1,
    interpolation='bicubic', antialias=True)``."""
    old = int(math.sqrt(posemb.shape[1] - 1))
    if tuple(new_size) == (old, old):
        return posemb
    prefix, grid = posemb[:, :1], posemb[:, 1:]
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], -1)
    return torch.cat([prefix, grid], dim=1)


def gem_embed(visual, x):
    """GEM's ``modified_vit_forward`` up to ln_pre: ``(1, 3, H, W)`` -> ``(N, D)``."""
    x = visual.conv1(x)
    grid_h, grid_w = x.shape[2:]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
    x = x + gem_resample(visual.positional_embedding.unsqueeze(0), [grid_h, grid_w])
    return visual.ln_pre(x)[0]


def surgery_embed(visual, x):
    """CLIP Surgery's ``VisionTransformer.forward`` up to ln_pre (square grids only)."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    pos = visual.positional_embedding
    side, new_side = int((pos.shape[0] - 1) ** 0.5), int((x.shape[1] - 1) ** 0.5)
    if side != new_side:
        new_pos = pos[1:, :].reshape(-1, side, side, x.shape[-1]).permute(0, 3, 1, 2)
        new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
        new_pos = new_pos.reshape(-1, x.shape[-1], new_side * new_side).transpose(1, 2)
        pos = torch.cat([pos[:1, :], new_pos[0]], 0)
    return visual.ln_pre(x + pos)[0]


def lab_tokens(enc, image, section):
    """The lab's last-block output ``(N, D)`` of one window under ``section``."""
    last = build_last_block(section, None, enc)
    with torch.no_grad():
        return enc.last_block(enc.trunk_for(image, last), last)[0]


# ------------------------------------------------------------ against the official code


@pytest.mark.parametrize("size", [(448, 448), (320, 320)])  # 28×28, 20×20 patches
def test_surgery_off_the_native_grid_is_its_official_code(enc, size):
    image = window(*size)
    blocks = list(enc.visual.transformer.resblocks)
    with torch.no_grad():
        want = surgery_forward(blocks, surgery_embed(enc.visual, image), 2)
    section = {"name": "surgery", "depth": 2, "pos_embed": "bilinear"}
    torch.testing.assert_close(lab_tokens(enc, image, section), want, atol=ATOL, rtol=RTOL)
    old = lab_tokens(enc, image, {**section, "pos_embed": DEFAULT_POS_EMBED})
    assert (old - want).abs().max() > 10 * ATOL  # SCLIP's rule: far outside the tolerance


@pytest.mark.parametrize("size", [(448, 448), (448, 320)])  # GEM takes any grid
@pytest.mark.parametrize("name", ["gem", "gem_last"])
def test_gem_off_the_native_grid_is_its_official_code(enc, size, name):
    image = window(*size)
    blocks = list(enc.visual.transformer.resblocks)
    depth, last_only = (3, False) if name == "gem" else (1, True)
    with torch.no_grad():
        want = gem_forward(blocks, gem_embed(enc.visual, image), depth + 1,
                           ignore_residual=last_only)
    section = {"name": name, "pos_embed": "bicubic_antialias",
               **({"depth": depth} if name == "gem" else {})}
    torch.testing.assert_close(lab_tokens(enc, image, section), want, atol=ATOL, rtol=RTOL)
    old = lab_tokens(enc, image, {**section, "pos_embed": DEFAULT_POS_EMBED})
    assert (old - want).abs().max() > 10 * ATOL


def test_on_the_native_grid_every_rule_is_the_table_itself(enc):
    pos = enc.visual.positional_embedding
    for rule in POS_EMBED_RULES:
        assert interpolate_pos_embed(pos, (14, 14), rule) is pos
        out = interpolate_pos_embed(pos, (9, 21), rule)
        assert out.shape == (1 + 9 * 21, pos.shape[1]) and torch.equal(out[0], pos[0])
    torch.testing.assert_close(interpolate_pos_embed(pos, (28, 28), "bicubic_antialias"),
                               gem_resample(pos[None], [28, 28])[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown position-embedding rule"):
        interpolate_pos_embed(pos, (28, 28), "nearest")


# ----------------------------------------------------------------- presets and knobs


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run", overrides=list(overrides)), resolve=True)


@pytest.mark.parametrize("attention,rule", [
    ("gem", "bicubic_antialias"), ("gem_last", "bicubic_antialias"),
    ("surgery", "bilinear"), ("surgery_last", "bilinear"),
    ("csa", None), ("naclip", None), ("resclip", None),  # null: the default rule
])
def test_each_method_declares_its_rule(enc, attention, rule):
    """The rule of a method's official code is declared where it registers (null in its
    yaml: the variant's own), like its block; the composed head uses it."""
    from sclip_lab.attention import ATTENTIONS

    section = resolved(f"attention={attention}")["attention"]
    assert section["pos_embed"] is None
    assert ATTENTIONS[attention].pos_embed == (rule or DEFAULT_POS_EMBED)
    small = {**section, **({"depth": 2} if "depth" in section else {}),
             **({"rcs_start": 1, "rcs_end": 3} if attention == "resclip" else {})}
    assert build_last_block(small, None, enc).pos_embed == (rule or DEFAULT_POS_EMBED)
    override = resolved("attention=csa", "attention.pos_embed=bilinear")["attention"]
    assert build_last_block(override, None, enc).pos_embed == "bilinear"  # any variant


def test_a_bad_rule_is_one_line_before_the_model_loads():
    with pytest.raises(ConfigError, match=r"attention=gem: attention\.pos_embed='nearest'; "
                                          r"choose one of \['bicubic_scale'") as err:
        head_spec({"name": "gem", "pos_embed": "nearest"})
    assert "\n" not in str(err.value)


def test_the_rule_enters_a_result_key_only_off_its_default():
    base = resolved("attention=csa", "limit=1")
    assert base["attention"]["pos_embed"] is None
    key = records.result_key(base)
    gone = {**base, "attention": {k: v for k, v in base["attention"].items()
                                  if k != "pos_embed"}}
    assert records.result_key(gone) == key  # the field absent: as before it existed
    explicit = {**base, "attention": {**base["attention"], "pos_embed": DEFAULT_POS_EMBED}}
    assert records.result_key(explicit) == key
    other = {**base, "attention": {**base["attention"], "pos_embed": "bilinear"}}
    assert records.result_key(other) != key
    # GEM's own rule is its declaration's: its key names it (its numbers changed), and the
    # old rule given back is the key its records had before the rule existed (281a6c0).
    gem = resolved("attention=gem", "limit=1")
    old_rule = resolved("attention=gem", "limit=1", "attention.pos_embed=bicubic_scale")
    assert records.result_key(old_rule) == "b078449f6c2614eb"
    assert records.result_key(gem) != records.result_key(old_rule)


# ------------------------------------------------------------- shared trunk, trunk cache


SECTIONS = [{"name": "csa"}, {"name": "gem", "depth": 2, "pos_embed": "bicubic_antialias"},
            {"name": "naclip"}, {"name": "surgery", "depth": 2, "pos_embed": "bilinear"},
            {"name": "gem_last", "pos_embed": "bicubic_antialias"}]
PREP = Preprocess(320, 320, 160)  # 20×20-patch windows: off the tiny model's 14×14


def segmenter(enc, sections) -> Segmenter:
    heads = [Head(build_last_block(s, None, enc)) for s in sections]
    queries = F.normalize(torch.randn(4, enc.visual.proj.shape[1],
                                      generator=torch.Generator().manual_seed(2)), dim=-1)
    post = segment.PostProcess(torch.arange(4), 4, 40.0, 0.0, None)
    return Segmenter(enc, heads, queries, post, PREP)


@pytest.fixture(scope="module")
def resized():
    return [torch.randn(3, 320, 480, generator=torch.Generator().manual_seed(7))]


def count_passes(seg: Segmenter, monkeypatch) -> list[str]:
    """The rule of every trunk call ``seg``'s encoder makes from now on."""
    calls: list[str] = []
    trunk = seg.encoder.trunk

    def spy(images, early=(), hidden=(), pos_embed=DEFAULT_POS_EMBED, features=()):
        calls.append(pos_embed)
        return trunk(images, early, hidden, pos_embed, features)

    monkeypatch.setattr(seg.encoder, "trunk", spy)
    return calls


def test_heads_of_different_rules_get_their_own_trunk_and_match_single_runs(
        enc, resized, monkeypatch):
    together = segmenter(enc, SECTIONS)
    calls = count_passes(together, monkeypatch)
    both = together.logits_many(resized, [(320, 480)])
    assert calls == ["bicubic_scale", "bicubic_antialias", "bilinear"]  # 1 window batch each
    maps = [m[0] for m in together.iter_class_maps(resized, [(320, 480)])]
    monkeypatch.undo()
    for section, got, got_map in zip(SECTIONS, both, maps):
        alone = segmenter(enc, [section])
        want = alone.logits_many(resized, [(320, 480)])[0][0]
        torch.testing.assert_close(got[0], want, atol=0, rtol=0)
        assert torch.equal(got_map, alone.classes(want))


def test_a_head_never_reads_a_trunk_of_another_rule(enc):
    gem = build_last_block(SECTIONS[1], None, enc)
    with torch.no_grad(), pytest.raises(ValueError, match="pos_embed=bicubic_antialias was "
                                                          "given a trunk embedded by"):
        enc.last_block(enc.trunk(window(320, 320)), gem)


def test_attention_figures_run_each_rule_on_its_own_trunk(enc):
    from sclip_lab.visualize import attention_maps

    lasts = {"gem": build_last_block(SECTIONS[4], None, enc),
             "csa": build_last_block(SECTIONS[0], None, enc)}
    image = window(320, 320)[0]
    with torch.no_grad():
        both = attention_maps(enc, image, [5, 17], lasts)
        assert list(both) == ["gem", "csa"]
        for label, last in lasts.items():
            np.testing.assert_array_equal(both[label],
                                          attention_maps(enc, image, [5, 17], {label: last})[label])


def test_each_rule_has_its_own_trunk_cache_entries(enc, resized, tmp_path, monkeypatch):
    uncached = segmenter(enc, SECTIONS[:2]).logits_many(resized, [(320, 480)])
    seg = segmenter(enc, SECTIONS[:2])
    seg.trunk_cache = open_cache(tmp_path, "fp32", enc, INFO, asdict(PREP))
    first = seg.logits_many(resized, [(320, 480)])
    names = sorted(p.stem for p in tmp_path.rglob(f"*{SUFFIX}"))
    assert names == sorted([digest(resized[0]),  # the default rule: the name it always had
                            entry_name(resized[0], "pos_embed=bicubic_antialias")])
    assert all(len(n) == 32 and int(n, 16) >= 0 for n in names)
    calls = count_passes(seg, monkeypatch)
    again = seg.logits_many(resized, [(320, 480)])
    assert calls == [] and seg.trunk_cache.hits == 2  # both rules read back, none computed
    for got in (first, again):
        for a, b in zip(got, uncached):
            torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)


# ------------------------------------------------------------------------ a whole run


@pytest.fixture()
def benchmark(tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, "voc20", num_images=2, size=(64, 96))
    return root


def test_a_variants_run_of_csa_and_gem_is_the_two_single_runs(tiny_inproc, benchmark,
                                                             tmp_path):
    base = [*tiny_inproc, "dataset=voc20", f"data_root={benchmark}", "limit=2",
            "dataset.short_side=320", "protocol.window=320", "protocol.stride=160"]
    gem = "attention=gem attention.depth=2"
    multi = evaluate_in_process([*base, f"variants=['attention=csa','{gem}']"],
                                tmp_path / "multi")
    singles = [evaluate_in_process([*base, *entry.split()], tmp_path / f"single{i}")[0]
               for i, entry in enumerate(["attention=csa", gem])]
    assert [head_spec(r["config"]["attention"]).pos_embed for r in multi] == [
        DEFAULT_POS_EMBED, "bicubic_antialias"]  # null in the config: each variant's own
    for shared, single in zip(multi, singles):
        assert shared["metrics"] == single["metrics"] and shared["key"] == single["key"]
    plain = evaluate_in_process([*base, *gem.split(), "attention.pos_embed=bicubic_scale"],
                                tmp_path / "plain")[0]
    assert plain["key"] != singles[1]["key"]
