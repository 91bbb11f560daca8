"""sclip_lab.data: benchmark configs, label rules, the files loader and its errors."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from synthetic import LAYOUTS, write_benchmark

from sclip_lab import data
from sclip_lab.data import DataError
from sclip_lab.text import split_queries

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
BENCHMARKS = ["voc21", "context60", "coco_object", "voc20", "cityscapes", "context59",
              "ade20k", "coco_stuff"]
# docs/protocol.md §6: C, Q, S, logit scale, prob_thd (0 = off), area_thd, split size, rule.
TABLE = {
    "voc21": (21, 56, 336, 65, 0.1, 0.1, 1449, "identity"),
    "context60": (60, 60, 336, 50, 0.1, None, 5105, "identity"),
    "coco_object": (81, 113, 336, 50, 0.1, None, 5000, "identity"),
    "voc20": (20, 30, 336, 40, 0.0, None, 1449, "reduce_zero_label"),
    "cityscapes": (19, 19, 560, 40, 0.0, None, 500, "identity"),
    "context59": (59, 59, 336, 40, 0.0, None, 5105, "reduce_zero_label"),
    "ade20k": (150, 150, 336, 40, 0.0, None, 2000, "reduce_zero_label"),
    "coco_stuff": (171, 171, 448, 40, 0.0, None, 5000, "identity"),
}


def section(name: str):
    return OmegaConf.load(CONF / f"{name}.yaml")


def spec_of(name: str) -> data.BenchmarkSpec:
    return data.spec_from_config(section(name))


def rule_by_hand(raw: np.ndarray, rule: str) -> np.ndarray:
    """docs/protocol.md §6 transcribed element by element (independent of both implementations)."""
    out = np.empty(raw.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(raw):
        v = int(v)
        if rule == "identity" or v == 255:
            out[idx] = v
        else:
            out[idx] = 255 if v == 0 else v - 1
    return out


# --- configs -------------------------------------------------------------------------

def test_config_files_are_exactly_the_benchmarks():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_config_constants_match_protocol_table(name):
    c, q, short, scale, prob, area, n, rule = TABLE[name]
    spec = spec_of(name)
    names, query_class = split_queries(spec.classes)
    assert spec.name == name and section(name).source == "files"
    assert (spec.num_classes, len(names), len(query_class)) == (c, q, q)
    assert query_class == sorted(query_class) and set(query_class) == set(range(c))
    assert (spec.short_side, spec.logit_scale, spec.prob_thd, spec.area_thd) == (
        short, scale, prob, area)
    assert (spec.expected_images, spec.label_rule) == (n, rule)
    assert all(name == name.strip() and name for name in names)
    assert all(isinstance(line, str) for line in spec.classes)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_config_layout_matches_the_real_layout(name):
    root, img_dir, img_sfx, ann_dir, ann_sfx, split, *_ = LAYOUTS[name]
    spec = spec_of(name)
    assert (spec.root, spec.img_dir, spec.img_suffix, spec.ann_dir, spec.ann_suffix,
            spec.split) == (root, img_dir, img_sfx, ann_dir, ann_sfx, split)
    train = section(name).train
    assert train.expected_images > 0 and ("split" in train or "img_dir" in train)


def test_vocabulary_relations():
    voc21, voc20 = spec_of("voc21").classes, spec_of("voc20").classes
    c60, c59 = spec_of("context60").classes, spec_of("context59").classes
    obj = spec_of("coco_object").classes
    assert voc20 == voc21[1:] and c59 == c60[1:] and c60[0] == "background"
    assert voc21[0].startswith("sky, wall, tree") and voc21[0].endswith("rail, fence")
    assert voc21[15].startswith("person, person in shirt")
    assert voc21[20] == "television monitor, tv monitor, monitor, television, screen"
    assert obj[0] == voc21[0] and obj[1] == voc21[15] + ", body"
    assert obj[2:5] == ("bicycle", "car", "motorcycle") and obj[-1] == "toothbrush"
    assert "traffic light" in obj and "hair drier" in obj
    assert spec_of("cityscapes").classes[6:8] == ("trafficlight", "trafficsign")
    ade = spec_of("ade20k").classes
    assert ade[:3] == ("wall", "building", "sky") and ade[-1] == "flag"
    stuff = spec_of("coco_stuff").classes
    assert stuff[79] == "toothbrush" and stuff[80] == "banner" and stuff[-1] == "wood"


def test_queries_split_synonyms_and_keep_duplicates():
    names, query_class = split_queries(spec_of("coco_object").classes)
    # "bed" is a background synonym and class 60: both stay (docs/protocol.md §12)
    assert [query_class[i] for i, n in enumerate(names) if n == "bed"] == [0, 60]
    names, query_class = split_queries(spec_of("voc21").classes)
    assert names[26] == "aeroplane" and query_class[:27] == [0] * 26 + [1]
    assert names[-5:] == ["television monitor", "tv monitor", "monitor", "television",
                          "screen"] and query_class[-5:] == [20] * 5


@pytest.mark.parametrize("key,value,message", [
    ("label_rule", "reduce", "label_rule"),
    ("classes", [], "classes"),
    ("classes", ["cat", ""], "classes"),
    ("short_side", "big", "short_side"),
    ("short_side", 0, "positive"),
    ("prob_thd", 1.5, "prob_thd"),
    ("area_thd", -0.1, "area_thd"),
    ("expected_images", True, "expected_images"),
    ("split", "", "split"),
])
def test_spec_from_config_rejects_bad_values(key, value, message):
    cfg = OmegaConf.to_container(section("voc21"))
    cfg[key] = value
    with pytest.raises(DataError, match=message):
        data.spec_from_config(cfg)


@pytest.mark.parametrize("key", ["name", "classes", "root", "label_rule", "split", "area_thd"])
def test_spec_from_config_names_a_missing_key(key):
    cfg = OmegaConf.to_container(section("voc21"))
    del cfg[key]
    with pytest.raises(DataError, match=key):
        data.spec_from_config(cfg)


def test_spec_from_config_accepts_plain_dicts_and_resolves_interpolations():
    cfg = OmegaConf.create({"dataset": OmegaConf.to_container(section("context60")),
                            "scale": 12})
    cfg.dataset.logit_scale = "${scale}"
    spec = data.spec_from_config(cfg.dataset)
    assert spec.logit_scale == 12.0
    assert data.spec_from_config(OmegaConf.to_container(section("context60"))).name == (
        "context60")


# --- the schema (data.DatasetConfig, Hydra's dataset/base_dataset) ---------------------------

def compose_run(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF.parent), version_base="1.3"):
        return compose("run", overrides=["logger=none", *overrides])


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_dataset_file_composes_through_the_schema(name):
    cfg = compose_run(f"dataset={name}")
    assert OmegaConf.get_type(cfg.dataset) is data.DatasetConfig
    assert data.spec_from_config(cfg.dataset) == spec_of(name)
    assert cfg.dataset.hf.split == "validation" and cfg.dataset.source == "files"


@pytest.mark.parametrize("override,named", [
    ("dataset.shortside=3", "shortside"),
    ("dataset.short_side=abc", "dataset.short_side=abc"),
    ("dataset.hf.streaming=maybe", "dataset.hf.streaming=maybe"),
    ("dataset.classes=cat", "dataset.classes=cat"),
])
def test_the_schema_refuses_at_composition(override, named):
    from hydra.errors import ConfigCompositionException

    from sclip_lab.errors import message_of

    with pytest.raises(ConfigCompositionException) as e:
        compose_run(override)
    assert named in message_of(e.value) + message_of(e.value.__cause__ or e.value)


def test_a_misspelled_key_in_a_dataset_file_fails_at_composition(tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    conf = tmp_path / "conf"
    shutil.copytree(CONF.parent, conf)
    text = (CONF / "voc21.yaml").read_text()
    (conf / "dataset/typo.yaml").write_text(text.replace("short_side:", "shortside:"))
    with initialize_config_dir(str(conf), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as e:
            compose("run", overrides=["logger=none", "dataset=typo"])
    assert "Key 'shortside' not in 'DatasetConfig'" in str(e.value)


def test_the_schema_leaves_non_finite_numbers_to_the_lab():
    import math

    assert math.isnan(compose_run("dataset.logit_scale=nan").dataset.logit_scale)
    assert compose_run("dataset.short_side=448").dataset.short_side == 448


def test_plain_mappings_meet_the_same_schema():
    cfg = OmegaConf.to_container(section("voc21"))
    with pytest.raises(DataError, match=r"dataset voc21: dataset\.shortside: Key 'shortside'"):
        data.spec_from_config({**cfg, "shortside": 3})
    with pytest.raises(DataError, match="dataset voc21: dataset.hf.streming"):
        data.spec_from_config({**cfg, "hf": {"streming": True}})
    with pytest.raises(DataError, match="key 'short_side' is missing"):
        data.spec_from_config({**cfg, "short_side": None})
    full = data.dataset_config(cfg)
    assert "defaults" not in full and full["hf"]["image_column"] == "image"
    assert full["prepare"]["needs"] == ["voc2012"]
    # A training-split override is checked when its spec is built.
    train = {**{k: v for k, v in cfg.items() if k != "train"}, "expectd_images": 3}
    with pytest.raises(DataError, match="expectd_images"):
        data.spec_from_config(train)


# --- label rules -----------------------------------------------------------------------

def test_apply_label_rule_small_cases():
    raw = np.array([[0, 1, 2], [150, 254, 255]], dtype=np.uint8)
    ident = data.apply_label_rule(raw, "identity")
    reduced = data.apply_label_rule(raw, "reduce_zero_label")
    assert ident.dtype == reduced.dtype == np.int64
    assert ident.tolist() == [[0, 1, 2], [150, 254, 255]]
    assert reduced.tolist() == [[255, 0, 1], [149, 253, 255]]
    assert raw.tolist() == [[0, 1, 2], [150, 254, 255]], "input not modified"
    assert data.apply_label_rule(raw.astype(np.int32), "reduce_zero_label").tolist() == (
        reduced.tolist())
    with pytest.raises(ValueError, match="identity"):
        data.apply_label_rule(raw, "shift")
    with pytest.raises(ValueError, match="2-D"):
        data.apply_label_rule(np.zeros((2, 2, 3), np.uint8), "identity")


def test_apply_label_rule_every_byte_value():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for rule in data.LABEL_RULES:
        assert (data.apply_label_rule(raw, rule) == rule_by_hand(raw, rule)).all()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_loads_with_its_label_rule(name, tmp_path):
    records = write_benchmark(tmp_path, name, num_images=3, size=(40, 56), seed=3)
    spec = spec_of(name)
    ds = data.SegmentationDataset(spec, tmp_path)
    assert len(ds) == 3 and ds.ids == [r["id"] for r in records]
    for item, rec in zip(ds, records):
        assert item["id"] == rec["id"] and set(item) == {"id", "image", "label"}
        raw = np.asarray(Image.open(rec["label_path"]))
        assert (raw == rec["raw_label"]).all()
        expect = rule_by_hand(raw, spec.label_rule)
        assert item["label"].dtype == np.int64 and item["label"].shape == (40, 56)
        assert (item["label"] == expect).all() and (item["label"] == rec["label"]).all()
        assert set(np.unique(item["label"])) <= set(range(spec.num_classes)) | {255}
        if spec.label_rule == "reduce_zero_label":
            assert (item["label"][raw == 0] == 255).all() and (raw == 0).any()
        image = item["image"]
        assert image.dtype == np.uint8 and image.shape == (40, 56, 3)
        bgr = cv2.imread(str(rec["image_path"]), cv2.IMREAD_COLOR)
        assert (image == bgr[..., ::-1]).all(), "OpenCV decode, BGR -> RGB"
        # JPEG is lossy; the colours still follow what was written (RGB, not BGR)
        err = np.abs(image.astype(int) - rec["image"]).mean()
        swapped = np.abs(image[..., ::-1].astype(int) - rec["image"]).mean()
        assert err < 12 and err < swapped


def test_voc_labels_are_palette_indices_with_255(tmp_path):
    rec = write_benchmark(tmp_path, "voc21", num_images=1)[0]
    pil = Image.open(rec["label_path"])
    assert pil.mode == "P"
    raw = data.read_label(rec["label_path"])
    assert 255 in raw and 0 in raw
    # The palette colours of indices are not what we read: index 1 is (128, 0, 0).
    assert pil.getpalette()[3:6] == [128, 0, 0]
    assert (data.SegmentationDataset(spec_of("voc20"), tmp_path)[0]["label"] ==
            rule_by_hand(raw, "reduce_zero_label")).all()


def test_cityscapes_ids_are_city_relative_paths(tmp_path):
    records = write_benchmark(tmp_path, "cityscapes", num_images=4)
    ds = data.SegmentationDataset(spec_of("cityscapes"), tmp_path)
    assert ds.ids == sorted(r["id"] for r in records)
    assert ds.ids[0] == "frankfurt/frankfurt_000000_000000"
    assert ds.image_path(0).name == "frankfurt_000000_000000_leftImg8bit.png"
    assert ds.label_path(0).name == "frankfurt_000000_000000_gtFine_labelTrainIds.png"


# --- ids, limit, transform ---------------------------------------------------------------

def test_split_ids_are_sorted_and_limit_keeps_the_first(tmp_path):
    records = write_benchmark(tmp_path, "context60", num_images=5, seed=1)
    split = tmp_path / "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"
    listed = split.read_text().split()
    assert listed != sorted(listed), "the synthetic split is shuffled"
    ds = data.SegmentationDataset(spec_of("context60"), tmp_path)
    assert ds.ids == sorted(listed) == [r["id"] for r in records]
    # JPEGImages also holds an image outside the split: it is not evaluated
    assert len(list((tmp_path / "VOCdevkit/VOC2010/JPEGImages").glob("*.jpg"))) == 6
    small = data.SegmentationDataset(spec_of("context60"), tmp_path, limit=2)
    assert small.ids == ds.ids[:2] and len(small) == 2
    assert data.SegmentationDataset(spec_of("context60"), tmp_path, limit=99).ids == ds.ids
    with pytest.raises(DataError, match="limit=0"):
        data.SegmentationDataset(spec_of("context60"), tmp_path, limit=0)


def test_folder_ids_are_sorted_relative_paths(tmp_path):
    write_benchmark(tmp_path, "ade20k", num_images=3)
    extra = tmp_path / "ADEChallengeData2016/images/validation/ADE_val_00000000.jpg"
    Image.new("RGB", (80, 60)).save(extra)
    Image.new("L", (80, 60)).save(extra.parents[2] / "annotations/validation" /
                                  "ADE_val_00000000.png")
    ds = data.SegmentationDataset(spec_of("ade20k"), tmp_path, limit=2)
    assert ds.ids == ["ADE_val_00000000", "ADE_val_00000001"]


def test_transform_makes_input(tmp_path):
    write_benchmark(tmp_path, "coco_stuff", num_images=1)
    ds = data.SegmentationDataset(spec_of("coco_stuff"), tmp_path,
                                  transform=lambda im: im.mean(axis=2))
    item = ds[0]
    assert item["input"].shape == item["image"].shape[:2]
    with pytest.raises(IndexError):
        ds[1]


def test_build_dataset_and_resolve_data_root(tmp_path, monkeypatch):
    write_benchmark(tmp_path, "voc21", num_images=2)
    ds = data.build_dataset(section("voc21"), tmp_path, limit=1)
    assert isinstance(ds, data.SegmentationDataset) and len(ds) == 1
    assert len(data.build_dataset(spec_of("voc21"), str(tmp_path))) == 2
    bad = section("voc21")
    bad.source = "ftp"
    with pytest.raises(DataError, match="files, hf"):
        data.build_dataset(bad, tmp_path)
    monkeypatch.setenv("SCLIP_DATA", str(tmp_path))
    assert data.resolve_data_root(None) == tmp_path
    assert data.resolve_data_root("") == tmp_path
    assert len(data.build_dataset(section("voc21"), None)) == 2
    assert data.resolve_data_root("~/x") == Path(os.path.expanduser("~/x"))
    monkeypatch.delenv("SCLIP_DATA")
    assert data.resolve_data_root(None) == Path("./data")


# --- layout and file errors -------------------------------------------------------------

def test_missing_data_root_names_prepare_and_env(tmp_path):
    with pytest.raises(DataError) as e:
        data.SegmentationDataset(spec_of("voc21"), tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg and "sclip_lab.prepare voc21" in msg and "SCLIP_DATA" in msg
    assert f"data_root={tmp_path / 'nowhere'}" in msg


def test_missing_benchmark_root_names_command_and_layout(tmp_path):
    write_benchmark(tmp_path, "voc21", num_images=1)
    with pytest.raises(DataError) as e:
        data.SegmentationDataset(spec_of("ade20k"), tmp_path)
    msg = str(e.value)
    assert f"python -m sclip_lab.prepare ade20k data_root={tmp_path}" in msg
    assert "ADEChallengeData2016/{images/validation/<id>.jpg" in msg and "\n" not in msg


def test_missing_or_empty_image_folder(tmp_path):
    (tmp_path / "ADEChallengeData2016").mkdir()
    with pytest.raises(DataError, match="image folder .* is missing"):
        data.SegmentationDataset(spec_of("ade20k"), tmp_path)
    (tmp_path / "ADEChallengeData2016/images/validation").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no \*\.jpg file under"):
        data.SegmentationDataset(spec_of("ade20k"), tmp_path)


def test_missing_or_empty_split_file(tmp_path):
    write_benchmark(tmp_path, "voc21", num_images=1)
    split = tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.write_text("\n")
    with pytest.raises(DataError, match="lists no id"):
        data.SegmentationDataset(spec_of("voc21"), tmp_path)
    split.unlink()
    with pytest.raises(DataError, match="split file .*val.txt is missing"):
        data.SegmentationDataset(spec_of("voc21"), tmp_path)


def test_image_without_label_and_listed_image_missing(tmp_path):
    records = write_benchmark(tmp_path, "voc21", num_images=2)
    records[1]["label_path"].unlink()
    with pytest.raises(DataError, match=f"has no label file .*{records[1]['id']}.png"):
        data.SegmentationDataset(spec_of("voc21"), tmp_path)
    assert len(data.SegmentationDataset(spec_of("voc21"), tmp_path, limit=1)) == 1
    records[0]["image_path"].unlink()
    with pytest.raises(DataError, match=f"{records[0]['id']}.jpg .* is missing"):
        data.SegmentationDataset(spec_of("voc21"), tmp_path)


def test_corrupt_image_names_the_file(tmp_path):
    records = write_benchmark(tmp_path, "ade20k", num_images=2, corrupt_image_for=1)
    ds = data.SegmentationDataset(spec_of("ade20k"), tmp_path)
    ds[0]
    with pytest.raises(DataError, match=f"cannot decode image {records[1]['image_path']}"):
        ds[1]
    with pytest.raises(DataError, match="cannot read image"):
        data.read_image(tmp_path / "absent.jpg")


def test_corrupt_or_colour_label_names_the_file(tmp_path):
    records = write_benchmark(tmp_path, "coco_object", num_images=2)
    records[0]["label_path"].write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (80, 60)).save(records[1]["label_path"])
    ds = data.SegmentationDataset(spec_of("coco_object"), tmp_path)
    with pytest.raises(DataError, match=f"cannot read label {records[0]['label_path']}"):
        ds[0]
    with pytest.raises(DataError, match="single-channel"):
        ds[1]


def test_label_size_mismatch_names_the_file(tmp_path):
    records = write_benchmark(tmp_path, "cityscapes", num_images=2, bad_label_size_for=0)
    assert records[0]["raw_label"].shape == (63, 82)
    ds = data.SegmentationDataset(spec_of("cityscapes"), tmp_path)
    with pytest.raises(DataError, match=r"82×63 but its image is 80×60"):
        ds[0]
    assert ds[1]["label"].shape == (60, 80)


def test_out_of_range_label_values(tmp_path):
    records = write_benchmark(tmp_path, "cityscapes", num_images=1)
    raw = records[0]["raw_label"].copy()
    raw[0, 0] = 19
    Image.fromarray(raw).save(records[0]["label_path"])
    with pytest.raises(DataError, match=r"values \[19\] outside 0..18"):
        data.SegmentationDataset(spec_of("cityscapes"), tmp_path)[0]
