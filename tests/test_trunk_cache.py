"""The trunk cache: exact in fp32, keyed by model, preprocessing and image, self-healing."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import evaluate_in_process
from synthetic import write_benchmark

from sclip_lab import segment
from sclip_lab.pipeline import Head, Preprocess, Segmenter, build_last_block
from sclip_lab.trunk_cache import SUFFIX, folder_usage, open_cache
from sclip_lab.trunk_cache.__main__ import main as cache_cli

# A head of each kind of trunk use: none, a borrowed early map, hidden states (surgery,
# SC-CLIP), borrowed maps plus the window pixels and the text (ResCLIP's two passes); all
# on one trunk (surgery's own position rule would give it entries of its own: the rules
# have their tests in test_pos_embed_rules.py).
SECTIONS = [{"name": "csa"}, {"name": "early", "layer": 2},
            {"name": "surgery", "depth": 2, "pos_embed": "bicubic_scale"},
            {"name": "scclip", "pre_layer": 2, "post_layer": 1, "multi_start": 1,
             "multi_end": 3, "lof_k": 5}, {"name": "resclip", "rcs_start": 1, "rcs_end": 2}]
INFO = {"arch": "sclip-tiny-vit", "pretrained": "tiny.pt", "weights_sha256": "ab" * 32,
        "precision": "fp32", "device": "cpu"}
PREP = Preprocess(64, 64, 32)


@pytest.fixture(scope="module")
def heads(enc):
    return [Head(build_last_block(s, None, enc)) for s in SECTIONS]


@pytest.fixture(scope="module")
def resized():
    """Two images whose windows come in two sizes (64×64, and 48×64 for the short one)."""
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(3, 64, 96, generator=gen), torch.randn(3, 48, 80, generator=gen)]


SIZES = [(70, 100), (50, 90)]


def segmenter(enc, heads, prep=PREP) -> Segmenter:
    queries = F.normalize(torch.randn(5, enc.visual.proj.shape[1],
                                      generator=torch.Generator().manual_seed(5)), dim=-1)
    post = segment.PostProcess(torch.arange(5), 5, 40.0, 0.0, None)
    return Segmenter(enc, list(heads), queries, post, prep)


def cached(seg: Segmenter, root: Path, dtype: str = "fp32", info=INFO) -> Segmenter:
    seg.trunk_cache = open_cache(root, dtype, seg.encoder, info, asdict(seg.prep))
    return seg


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"*{SUFFIX}") if not p.name.startswith("."))


def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(torch.equal(x, y) for ha, hb in zip(a, b) for x, y in zip(ha, hb))


def test_fp32_cache_gives_the_uncached_logits_exactly(enc, heads, resized, tmp_path):
    want = segmenter(enc, heads).logits_many(resized, SIZES)
    seg = cached(segmenter(enc, heads), tmp_path)
    cold = seg.logits_many(resized, SIZES)
    assert (seg.trunk_cache.hits, seg.trunk_cache.misses) == (0, 2)
    assert len(entries(tmp_path)) == 2
    warm = seg.logits_many(resized, SIZES)
    assert (seg.trunk_cache.hits, seg.trunk_cache.misses) == (2, 2)
    assert same(cold, want) and same(warm, want)
    # one image at a time reads the same entries
    alone = [seg.logits_many([r], [s]) for r, s in zip(resized, SIZES)]
    assert all(torch.equal(alone[i][h][0], want[h][i]) for i in range(2) for h in range(5))


def test_an_entry_grows_by_the_layers_a_new_variant_needs(enc, heads, resized, tmp_path):
    plain = cached(segmenter(enc, heads[:1]), tmp_path)
    plain.logits_many(resized[:1], SIZES[:1])
    (entry,) = entries(tmp_path)
    borrow = cached(segmenter(enc, heads[:2]), tmp_path)  # needs block 2's map: a miss
    got = borrow.logits_many(resized[:1], SIZES[:1])
    assert (borrow.trunk_cache.hits, borrow.trunk_cache.misses) == (0, 1)
    assert same(got, segmenter(enc, heads[:2]).logits_many(resized[:1], SIZES[:1]))
    from safetensors import safe_open

    with safe_open(str(entry), "pt") as f:
        assert set(f.keys()) == {"0.x", "0.early.2"}
    for subset in (heads[:1], heads[1:2]):  # both now hit the rewritten entry
        seg = cached(segmenter(enc, subset), tmp_path)
        seg.logits_many(resized[:1], SIZES[:1])
        assert (seg.trunk_cache.hits, seg.trunk_cache.misses) == (1, 0)


def test_model_preprocessing_dtype_and_image_are_in_the_key(enc, heads, resized, tmp_path):
    cached(segmenter(enc, heads[:1]), tmp_path).logits_many(resized[:1], SIZES[:1])
    others = [cached(segmenter(enc, heads[:1], Preprocess(64, 64, 16)), tmp_path),
              cached(segmenter(enc, heads[:1]), tmp_path, info={**INFO, "weights_sha256":
                                                                "cd" * 32}),
              cached(segmenter(enc, heads[:1]), tmp_path, "fp16")]
    for seg in others:
        seg.logits_many(resized[:1], SIZES[:1])
        assert (seg.trunk_cache.hits, seg.trunk_cache.misses) == (0, 1)
    seg = cached(segmenter(enc, heads[:1]), tmp_path)
    seg.logits_many([resized[0] + 1e-3], SIZES[:1])  # other pixels
    assert (seg.trunk_cache.hits, seg.trunk_cache.misses) == (0, 1)
    manifests = list(tmp_path.glob("*/manifest.json"))
    assert len(manifests) == 4 and (tmp_path / "README.txt").is_file()
    assert json.loads(manifests[0].read_text())["arch"] == "sclip-tiny-vit"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_broken_entry_is_recomputed_with_one_warning(enc, heads, resized, tmp_path,
                                                      caplog, damage):
    want = cached(segmenter(enc, heads[:2]), tmp_path).logits_many(resized[:1], SIZES[:1])
    (entry,) = entries(tmp_path)
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF  # inside a tensor: only the checksum sees it
    else:
        data = bytearray(b"not a safetensors file")
    entry.write_bytes(bytes(data))
    seg = cached(segmenter(enc, heads[:2]), tmp_path)
    with caplog.at_level(logging.WARNING, logger="sclip_lab"):
        got = seg.logits_many(resized[:1], SIZES[:1])
    warnings = [r for r in caplog.records if "broken entry" in r.getMessage()]
    assert len(warnings) == 1 and same(got, want)
    assert (seg.trunk_cache.hits, seg.trunk_cache.misses) == (0, 1)
    seg.logits_many(resized[:1], SIZES[:1])  # replaced by a good one
    assert seg.trunk_cache.hits == 1


def test_a_partial_write_is_never_read(enc, heads, resized, tmp_path, monkeypatch, caplog):
    import safetensors.torch

    def dies_half_way(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    seg = cached(segmenter(enc, heads[:1]), tmp_path)
    want = segmenter(enc, heads[:1]).logits_many(resized, SIZES)
    with caplog.at_level(logging.WARNING, logger="sclip_lab"):
        assert same(seg.logits_many(resized, SIZES), want)  # the run goes on
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1
    assert not list(tmp_path.rglob(f"*{SUFFIX}"))  # no entry, no temporary file left
    monkeypatch.undo()
    # a killed writer's temporary file beside the entries is ignored
    folder = seg.trunk_cache.folder
    (folder / f".0123-abcd{SUFFIX}").write_bytes(b"\x00" * 10)
    seg = cached(segmenter(enc, heads[:1]), tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sclip_lab"):
        assert same(seg.logits_many(resized, SIZES), want)
    assert not caplog.records and folder_usage(folder)[0] == 2


def test_fp16_halves_the_size_and_drifts_little(enc, heads, resized, tmp_path):
    want = segmenter(enc, heads[:2]).logits_many(resized, SIZES)
    full, half = tmp_path / "full", tmp_path / "half"
    cached(segmenter(enc, heads[:2]), full).logits_many(resized, SIZES)
    seg = cached(segmenter(enc, heads[:2]), half, "fp16")
    seg.logits_many(resized, SIZES)
    got = seg.logits_many(resized, SIZES)
    assert seg.trunk_cache.hits == 2
    size = [sum(p.stat().st_size for p in entries(r)) for r in (full, half)]
    assert 0.45 < size[1] / size[0] < 0.55, size
    drift = max((a - b).abs().max().item() for ha, hb in zip(got, want)
                for a, b in zip(ha, hb))
    assert 0 < drift < 1e-2


def test_runs_hit_keep_their_result_keys_and_log_the_cache(tiny_inproc, tmp_path, caplog):
    root, cache = tmp_path / "data", tmp_path / "trunks"
    write_benchmark(root, "voc21", num_images=2, size=(64, 96))
    base = [*tiny_inproc, f"data_root={root}", "attention=early", "layer=2"]
    (plain,) = evaluate_in_process(base, tmp_path / "plain")
    evaluate_in_process([*base[:-2], "attention=vanilla", f"trunk_cache={cache}"],
                        tmp_path / "cold")
    with caplog.at_level(logging.INFO, logger="sclip_lab"):
        (warm,) = evaluate_in_process([*base, f"trunk_cache={cache}"], tmp_path / "warm")
    # vanilla's entries held no early map: extended once, then read
    assert (warm["timings"]["trunk_cache_hits"], warm["timings"]["trunk_cache_misses"]) == (
        0, 2)
    (again,) = evaluate_in_process([*base, f"trunk_cache={cache}"], tmp_path / "again")
    assert again["timings"]["trunk_cache_hits"] == 2
    for rec in (warm, again):
        assert rec["key"] == plain["key"] and rec["metrics"] == plain["metrics"]
        assert rec["per_class_iou"] == plain["per_class_iou"]
    assert any(r.getMessage().startswith("trunk cache: 0 hits, 2 misses;")
               and "2 entries" in r.getMessage() for r in caplog.records)
    (half,) = evaluate_in_process([*base, f"trunk_cache={cache}", "trunk_cache_dtype=fp16"],
                                  tmp_path / "half")
    assert half["key"] != plain["key"] and half["config"]["trunk_cache_dtype"] == "fp16"


def test_info_and_clear(enc, heads, resized, tmp_path, capsys):
    cache = tmp_path / "trunks"
    cached(segmenter(enc, heads[:1]), cache).logits_many(resized, SIZES)
    assert cache_cli(["info", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "sclip-tiny-vit-" in out and "2 entries" in out and "window 64, stride 32" in out
    assert cache_cli(["clear", str(cache)]) == 0
    assert not cache.exists() and "removed" in capsys.readouterr().out


@pytest.mark.parametrize("target,message", [
    ("missing", "no trunk cache at"), ("file", "is a file, not a trunk cache folder"),
    ("other", "is not a trunk cache")])
def test_the_command_line_refuses_what_is_not_a_cache(tmp_path, capsys, target, message):
    path = tmp_path / target
    if target == "file":
        path.write_text("x")
    elif target == "other":
        (path / "keep").mkdir(parents=True)
    assert cache_cli(["clear", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert target != "other" or (path / "keep").is_dir()


@pytest.mark.parametrize("cache,dtype,precision,lossy", [
    (None, "fp16", "fp32", False), ("/c", "fp32", "fp32", False),
    ("/c", "fp16", "fp32", True), ("/c", "fp16", "fp16", False)])
def test_only_a_rounding_cache_enters_the_result_key(cache, dtype, precision, lossy):
    from sclip_lab.records import lossy_trunk_cache, result_key

    config = {"model": {"arch": "a"}, "precision": precision, "trunk_cache": cache,
              "trunk_cache_dtype": dtype}
    assert lossy_trunk_cache(config) is lossy
    assert (result_key(config) != result_key({"model": {"arch": "a"},
                                              "precision": precision})) is lossy


# ------------------------------------------- never costs a run, owns only its own files


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _rust_no_space(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


@pytest.mark.parametrize("stage", ["marker", "mkdir", "manifest", "rename", "entry-oserror",
                                   "entry-safetensors"])
def test_a_failing_write_of_any_kind_is_one_warning(enc, heads, resized, tmp_path,
                                                    monkeypatch, caplog, stage):
    import os

    import safetensors.torch

    import sclip_lab.trunk_cache as tc

    want = segmenter(enc, heads[:1]).logits_many(resized, SIZES)
    target = {"marker": (Path, "write_text"), "mkdir": (Path, "mkdir"),
              "manifest": (tc, "write_json_atomic"), "rename": (os, "replace"),
              "entry-oserror": (safetensors.torch, "save_file"),
              "entry-safetensors": (safetensors.torch, "save_file")}[stage]
    monkeypatch.setattr(*target, _rust_no_space if stage == "entry-safetensors" else _no_space)
    root = tmp_path / "trunks"
    with caplog.at_level(logging.WARNING, logger="sclip_lab"):
        seg = cached(segmenter(enc, heads[:1]), root)  # opening: marker, folder, manifest
        got = [seg.logits_many([r], [s]) for r, s in zip(resized, SIZES)]  # two stores
    assert all(torch.equal(got[i][0][0], want[0][i]) for i in range(2))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "cannot write" in warned[0], warned
    assert "No space left on device" in warned[0] and "Error while" not in warned[0]
    assert seg.trunk_cache.misses == 2 and "stored nothing new" in seg.trunk_cache.summary()
    assert not entries(root) and not [p for p in root.rglob(".*") if p.is_file()]


def test_a_full_disk_keeps_the_entries_it_has(enc, heads, resized, small_fs, caplog):
    """A real 36 KiB filesystem: the marker, the manifest and the first image's entry fit,
    the second does not; the run goes on uncached for it, and later runs read the first."""
    want = segmenter(enc, heads[:1]).logits_many(resized, SIZES)
    root = small_fs(36) / "trunks"
    for hits in (0, 1):
        caplog.clear()
        seg = cached(segmenter(enc, heads[:1]), root)
        with caplog.at_level(logging.WARNING, logger="sclip_lab"):
            got = [seg.logits_many([r], [s]) for r, s in zip(resized, SIZES)]
        assert all(torch.equal(got[i][0][0], want[0][i]) for i in range(2))
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "No space left on device" in warned[0], warned
        assert (seg.trunk_cache.hits, len(entries(root))) == (hits, 1)
    assert not [p for p in root.rglob(".*") if p.is_file()]  # no temporary file left


@pytest.mark.parametrize("damage", ["garbage", "truncate", "list", "other-schema", "empty"])
def test_a_damaged_manifest_heals_with_one_warning(enc, heads, resized, tmp_path, caplog,
                                                  capsys, damage):
    cache = tmp_path / "trunks"
    cached(segmenter(enc, heads[:1]), cache).logits_many(resized[:1], SIZES[:1])
    (manifest,) = cache.glob("*/manifest.json")
    good = manifest.read_text()
    manifest.write_text({"garbage": "\x00\xff not json", "truncate": good[:len(good) // 2],
                         "list": "[1, 2]", "other-schema": json.dumps({"arch": "x"}),
                         "empty": ""}[damage])
    assert cache_cli(["info", str(cache)]) == 0  # says so, and that a run rewrites it
    assert "manifest.json missing or damaged" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="sclip_lab"):
        seg = cached(segmenter(enc, heads[:1]), cache)
        seg.logits_many(resized[:1], SIZES[:1])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "rewriting the damaged manifest" in warned[0], warned
    assert manifest.read_text() == good and seg.trunk_cache.hits == 1  # entries kept
    assert cache_cli(["info", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "fp32 on cpu, short side 64, window 64, stride 32, stored float32" in out
    assert "?" not in out and "None" not in out
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sclip_lab"):
        cached(segmenter(enc, heads[:1]), cache)  # healed: no warning again
    assert not caplog.records


@pytest.mark.parametrize("content", ["user-file", "user-folder", "user-readme"])
def test_a_folder_of_other_files_is_not_adopted(enc, tmp_path, content):
    from sclip_lab.errors import ConfigError
    from sclip_lab.trunk_cache import check_cache_dir

    root = tmp_path / "mine"
    if content == "user-folder":
        (root / "photos").mkdir(parents=True)
    else:
        root.mkdir()
        (root / ("notes.txt" if content == "user-file" else "README.txt")).write_text("mine")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for check in (lambda: check_cache_dir(root),
                  lambda: open_cache(root, "fp32", enc, INFO, asdict(PREP))):
        with pytest.raises(ConfigError, match="is a folder of other files .* not a trunk "
                                              "cache; give an empty or new folder"):
            check()
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing added


def test_an_empty_missing_or_own_folder_is_adopted(enc, heads, resized, tmp_path):
    from sclip_lab.trunk_cache import check_cache_dir

    (tmp_path / "empty").mkdir()
    for name in ("empty", "missing"):
        assert check_cache_dir(tmp_path / name) == tmp_path / name
        cached(segmenter(enc, heads[:1]), tmp_path / name).logits_many(resized[:1], SIZES[:1])
    own = tmp_path / "empty"
    (own / "notes.txt").write_text("a user's file in a cache: the cache stays its own")
    check_cache_dir(own)
    seg = cached(segmenter(enc, heads[:1]), own)
    seg.logits_many(resized[:1], SIZES[:1])
    assert seg.trunk_cache.hits == 1
    # a writer's temporary marker (a parallel job opening the cache) is the cache's own
    other = tmp_path / "racing"
    other.mkdir()
    (other / ".README-ab12_cd3.txt").write_text("sclip_lab trunk cache (")
    check_cache_dir(other)


def test_clear_deletes_only_what_the_cache_wrote(enc, heads, resized, tmp_path, capsys):
    cache = tmp_path / "trunks"
    seg = cached(segmenter(enc, heads[:1]), cache)
    seg.logits_many(resized, SIZES)
    folder = seg.trunk_cache.folder
    (folder / f".{'0' * 32}-x1y2{SUFFIX}").write_bytes(b"\x00")  # a killed writer's file
    (cache / ".README-k1ll3d.txt").write_text("half a marker")
    mine = [cache / "notes.txt", cache / "photos" / "a.jpg", folder / "keep.safetensors",
            folder / "results.json"]
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("a user's")
    assert cache_cli(["clear", str(cache)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "removed 2 entries" in out[0] and "kept 4 file(s)" in out[0], out
    assert "notes.txt" in out[0] and "photos" in out[0]
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == sorted(mine)
    assert cache_cli(["clear", str(cache)]) == 2  # no marker left: no longer a cache
    assert "is not a trunk cache" in capsys.readouterr().err
    assert all(p.read_text() == "a user's" for p in mine)
