"""ProxyCLIP's protocol (``protocol=proxyclip``, docs/protocol.md §15) against an independent
transcription of its official code (mc-lan/ProxyCLIP @e7b767f): the numbers of
``configs/cfg_*.py`` and ``proxyclip_segmentor.py``, the query list of ``configs/cls_*.txt``,
and the crop-padding rule, which never fires on the benchmarks' usual image shapes."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab import records
from sclip_lab.config import CONF_DIR
from sclip_lab.data import DataError, spec_from_config
from sclip_lab.data.schema import first_names
from sclip_lab.segment import resized_shape, window_boxes
from sclip_lab.text import TEMPLATE_SETS, split_queries

BENCHMARKS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff",
              "cityscapes", "ade20k")
OTHER_PROTOCOLS = ("sclip", "naclip", "clearclip", "resclip", "scclip")

# (short side, window, stride, logit scale, prob_thd). Short side: the `Resize` scale
# (2048, S) of configs/cfg_<name>.py; window/stride: slide_crop=336, slide_stride=112 by
# default (proxyclip_segmentor.py __init__), 224/112 in cfg_city_scapes.py; logit_scale=40
# by default and set by no config; prob_thd in cfg_voc21 / cfg_context60 / cfg_coco_object.
# area_thd: the code has none; PAMR: none.
OFFICIAL = {
    "voc21": (336, 336, 112, 40.0, 0.2),
    "context60": (336, 336, 112, 40.0, 0.15),
    "coco_object": (336, 336, 112, 40.0, 0.25),
    "voc20": (336, 336, 112, 40.0, 0.0),
    "context59": (336, 336, 112, 40.0, 0.0),
    "coco_stuff": (336, 336, 112, 40.0, 0.0),
    "cityscapes": (448, 224, 112, 40.0, 0.0),
    "ade20k": (448, 336, 112, 40.0, 0.0),
}


def _lines(words: str) -> str:
    """A class file of one-word class names (the words, one per line)."""
    return "\n".join(words.split())


CONTEXT59 = """
    aeroplane bag bed bedclothes bench bicycle bird boat book bottle building bus cabinet
    car cat ceiling chair cloth computer cow cup curtain dog door fence floor flower food
    grass ground horse keyboard light motorbike mountain mouse person plate platform
    pottedplant road rock sheep shelves sidewalk sign sky snow sofa table track train tree
    truck tvmonitor wall water window wood"""
VOC20 = """
    aeroplane bicycle bird ship bottle bus car cat chair cow table dog horse motorbike person
    pottedplant sheep sofa train tvmonitor"""
COCO_OBJECT_THINGS = [
    "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
VOC_BACKGROUND = ("sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; "
                  "building; cloud; lamp; door; window; wardrobe; ceiling; shelf; curtain; "
                  "stair; floor; hill; rail; fence")
COCO_BACKGROUND = ("sky; wall; tree; wood; grass; road; sea; river; mountain; sands; desk; bed; "
                   "building; cloud; floor; hill; rail")

# The text of configs/cls_<name>.txt: '; ' separates a class's names, no final newline.
CLASS_FILES = {
    "voc21": VOC_BACKGROUND + "\n" + _lines(VOC20),
    "voc20": _lines(VOC20),
    # its last line is "wood " with a trailing space (see test_trailing_space_is_no_token)
    "context60": "background\n" + _lines(CONTEXT59) + " ",
    "context59": _lines(CONTEXT59),
    "coco_object": "\n".join([COCO_BACKGROUND, "person", *COCO_OBJECT_THINGS]),
    "coco_stuff": _lines("""
    person bicycle car motorcycle airplane bus train truck boat trafficlight firehydrant
    stopsign parkingmeter bench bird cat dog horse sheep cow elephant bear zebra giraffe
    backpack umbrella handbag tie suitcase frisbee skis snowboard sportsball kite
    baseballbat baseballglove skateboard surfboard tennisracket bottle wineglass cup fork
    knife spoon bowl banana apple sandwich orange broccoli carrot hotdog pizza donut cake
    chair couch pottedplant bed diningtable toilet tv laptop mouse remote keyboard cellphone
    microwave oven toaster sink refrigerator book clock vase scissors teddybear hairdrier
    toothbrush banner blanket branch bridge building-other bush cabinet cage cardboard
    carpet ceiling-other ceiling-tile cloth clothes clouds counter cupboard curtain
    desk-stuff dirt door-stuff fence floor-marble floor-other floor-stone floor-tile
    floor-wood flower fog food-other fruit furniture-other grass gravel ground-other hill
    house leaves light mat metal mirror-stuff moss mountain mud napkin net paper pavement
    pillow plant-other plastic platform playingfield railing railroad river road rock roof
    rug salad sand sea shelf sky-other skyscraper snow solid-other stairs stone straw
    structural-other table tent textile-other towel tree vegetable wall-brick wall-concrete
    wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind
    window-other wood"""),
    "cityscapes": _lines("""
    road sidewalk building wall fence pole trafficlight trafficsign vegetation terrain sky
    person rider car truck bus train motorcycle bicycle"""),
    "ade20k": _lines("""
    wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person
    earth door table mountain plant curtain chair car water painting sofa shelf house sea
    mirror rug field armchair seat fence desk rock wardrobe lamp bathtub railing cushion
    base box column signboard chestofdrawers counter sand sink skyscraper fireplace
    refrigerator grandstand path stairs runway case pooltable pillow screendoor stairway
    river bridge bookcase blind coffeetable toilet flower book hill bench countertop stove
    palm kitchenisland computer swivelchair boat bar arcademachine hovel bus towel light
    truck tower chandelier awning streetlight booth televisionreceiver airplane dirttrack
    apparel pole land bannister escalator ottoman bottle buffet poster stage van ship
    fountain conveyerbelt canopy washer plaything swimmingpool stool barrel basket waterfall
    tent bag minibike cradle oven ball food step tank tradename microwave pot animal bicycle
    lake dishwasher screen blanket sculpture hood sconce vase trafficlight tray ashcan fan
    pier crtscreen plate monitor bulletinboard shower radiator glass clock flag"""),
}
# Lines (class indices) where the official files differ from conf/dataset/*.yaml.
DIFFERENT_LINES = {"voc21": {15, 20}, "voc20": {14, 19}, "coco_object": {0, 1}}
# Queries: official vs the lab's default vocabulary (docs/protocol.md §12).
QUERY_COUNTS = {"voc21": (46, 56), "voc20": (20, 30), "coco_object": (97, 113)}


def official_queries(text: str) -> tuple[list[str], list[int]]:
    """The query names and their class of a class file, read as its code reads it: line by
    line, names split on '; ', newlines dropped (nothing else is stripped)."""
    names, owner = [], []
    for idx, line in enumerate(text.splitlines(keepends=True)):
        parts = [n.replace("\n", "") for n in line.split("; ")]
        names += parts
        owner += [idx] * len(parts)
    return names, owner


def resolved(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("run", overrides=["logger=none", *overrides]),
                                      resolve=True)


@pytest.fixture(scope="module")
def proxyclip() -> dict[str, dict]:
    return {name: resolved("protocol=proxyclip", f"dataset={name}") for name in BENCHMARKS}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_protocol_numbers_are_the_official_ones(proxyclip, name):
    cfg = proxyclip[name]
    p, d = cfg["preprocess"], cfg["dataset"]
    assert (p["short_side"], p["window"], p["stride"], d["logit_scale"], d["prob_thd"]) == \
        OFFICIAL[name]
    assert d["area_thd"] is None and cfg["postprocess"]["name"] == "none"
    assert cfg["protocol"]["name"] == "proxyclip" and cfg["protocol"]["whole_image"] == []
    assert cfg["text"]["templates"] == "openai_imagenet" and len(TEMPLATE_SETS[
        "openai_imagenet"]) == 80


def test_protocol_leaves_attention_and_precision_alone():
    base, proto = resolved(), resolved("protocol=proxyclip")
    assert proto["attention"] == base["attention"]
    assert proto["precision"] == base["precision"] == "auto"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_query_list_is_the_official_one(proxyclip, name):
    names, owner = split_queries(spec_from_config(proxyclip[name]["dataset"]).classes)
    want, want_owner = official_queries(CLASS_FILES[name])
    assert owner == want_owner
    # The lab strips each name; the official code keeps "wood " (Context60) as is.
    assert names == [n.strip() for n in want]
    assert {n for n in want if n != n.strip()} <= {"wood "}


def test_trailing_space_is_no_token():
    """ "wood " and "wood" give the same tokens in all 80 templates (the tokenizer cleans
    whitespace and splits the final '.' off either way)."""
    import open_clip

    templates = TEMPLATE_SETS["openai_imagenet"]
    assert open_clip.tokenize([t("wood ") for t in templates]).equal(
        open_clip.tokenize([t("wood") for t in templates]))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_vocabulary_differences_are_exactly_these(proxyclip, name):
    ours = spec_from_config(resolved(f"dataset={name}")["dataset"]).classes
    theirs = spec_from_config(proxyclip[name]["dataset"]).classes
    assert len(ours) == len(theirs)
    assert {i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b} == \
        DIFFERENT_LINES.get(name, set())
    if name in QUERY_COUNTS:
        assert (len(split_queries(theirs)[0]), len(split_queries(ours)[0])) == \
            QUERY_COUNTS[name]


@pytest.mark.parametrize("protocol", OTHER_PROTOCOLS)
def test_other_protocols_keep_their_vocabularies(protocol):
    from sclip_lab.data.schema import dataset_config

    for name in BENCHMARKS:
        section = resolved(f"protocol={protocol}", f"dataset={name}")["dataset"]
        assert section["class_overrides"] == {}
        file = dataset_config(OmegaConf.to_container(
            OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml")))
        want = tuple(file["classes"])
        if not section["synonyms"]:
            want = first_names(want, section["background_word"])
        assert spec_from_config(section).classes == want, (protocol, name)


@pytest.mark.parametrize("overrides", [("dataset=voc21",), ("dataset=coco_object",),
                                       ("protocol=clearclip", "dataset=voc21"),
                                       ("protocol=naclip", "dataset=ade20k")])
def test_default_class_overrides_leave_result_keys_unchanged(overrides):
    """The new dataset key at its default is not part of any result key (records.py's
    VOCABULARY_DEFAULTS), so records written before it keep theirs."""
    cfg = resolved(*overrides)
    old = {**cfg, "dataset": {k: v for k, v in cfg["dataset"].items()
                              if k != "class_overrides"}}
    assert records.result_key(cfg) == records.result_key(old)


def test_proxyclip_vocabulary_changes_the_result_key():
    cfg = resolved("protocol=proxyclip", "dataset=voc21")
    plain = {**cfg, "dataset": {**cfg["dataset"], "class_overrides": {}}}
    assert records.result_key(cfg) != records.result_key(plain)


def test_class_overrides_are_checked_and_come_before_first_names():
    section = resolved("dataset=voc21")["dataset"]
    with pytest.raises(DataError, match="class_overrides"):
        spec_from_config({**section, "class_overrides": {21: "x"}})
    with pytest.raises(DataError, match="class_overrides"):
        spec_from_config({**section, "class_overrides": {3: " "}})
    spec = spec_from_config({**section, "class_overrides": {20: "tvmonitor, screen"},
                             "synonyms": False})
    assert spec.classes[20] == "tvmonitor" and spec.classes[0] == "sky"


# ------------------------------------------------------------------- crop padding


def official_padsize(h: int, w: int, multiple: int = 56) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a crop to a multiple of 56, centred
    (the smaller half first), as ProxyCLIP's slide inference pads each crop."""
    lr = (multiple - w % multiple) % multiple
    tb = (multiple - h % multiple) % multiple
    return lr // 2, lr - lr // 2, tb // 2, tb - tb // 2


def padded_crops(height: int, width: int, short_side: int, window: int, stride: int = 112):
    h, w = resized_shape(height, width, short_side)
    return [(y2 - y1, x2 - x1, official_padsize(y2 - y1, x2 - x1))
            for y1, y2, x1, x2 in window_boxes(h, w, window, stride)
            if any(official_padsize(y2 - y1, x2 - x1))]


@pytest.mark.parametrize("size,short_side,window", [
    ((375, 500), 336, 336), ((500, 333), 336, 336), ((480, 640), 336, 336),  # VOC, COCO
    ((112, 500), 336, 336), ((427, 640), 336, 336), ((512, 683), 448, 336),  # ADE20K
    ((1024, 2048), 448, 224),                                                # Cityscapes
])
def test_usual_shapes_are_never_padded(size, short_side, window):
    assert padded_crops(*size, short_side, window) == []


def test_padding_needs_a_side_shorter_than_the_window():
    """Crops are window×window whenever both resized sides reach the window; a side falls
    short only when the long side hits the 2048 cap, i.e. beyond an aspect of
    2048/(window − 0.5): about 6.10 for 336 windows, 9.16 for 224."""
    for short in range(40, 400, 3):
        for ratio in (2.0, 4.0, 6.0, 6.1, 6.2, 7.0, 9.0, 9.2, 12.0):
            long = int(short * ratio)
            for window, short_side in ((336, 336), (336, 448), (224, 448)):
                h, w = resized_shape(short, long, short_side)
                crops = padded_crops(short, long, short_side, window)
                if h >= window:
                    assert crops == [], (short, long, window)
                    assert long / short <= 2048 / (window - 0.5)
                else:
                    assert all(c[1] == window for c in crops)
                    assert bool(crops) == (h % 56 != 0)
    # a 100×700 image at 336: resized 293×2048, every crop 293×336 padded 21 above, 22 below
    assert set(padded_crops(100, 700, 336, 336)) == {(293, 336, (0, 0, 21, 22))}
