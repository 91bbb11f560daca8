"""Label converters: raw annotations -> the evaluation format (docs/protocol.md §6).

Written from the formats' facts (docs/protocol.md §6 "Preparation facts"):

- Pascal-Context: ``trainval_merged.json`` (PASCAL in Detail) holds, per image, run-length
  encoded masks with the 459-class ids; painted in file order, the 59 evaluated ids map
  in ascending order to 1..59 and every other pixel to 0 (background)
  -> ``SegmentationClassContext/<id>.png`` plus ``ImageSets/SegmentationContext/*.txt``.
- COCO-Stuff: raw stuffthingmaps values 0-181 (COCO id - 1; 11 thing ids are unused) map
  in ascending order to 0-170, 255 stays 255 -> ``<id>_labelTrainIds.png``.
- COCO-Object: the 80 used thing values map to 1-80 in COCO order, everything else (stuff
  and 255) to 0 -> ``<id>_instanceTrainIds.png``.
- Cityscapes: ``_gtFine_labelIds.png`` through the official labelIds -> trainIds table
  (unlisted ids -> 255) -> ``_gtFine_labelTrainIds.png``.

``CONVERTERS`` maps the names that ``dataset.prepare.converter`` may hold to functions
``(specs by split, data_root, say)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from sclip_lab.data import IGNORE_INDEX, BenchmarkSpec, DataError, read_label
from sclip_lab.errors import brief

# --- label tables (docs/protocol.md §6) ---------------------------------------------------------

# The 59 evaluated Pascal-Context category ids of the 459-class annotation, ascending;
# class k (1..59) of context60 is the k-th of them, in the vocabulary's alphabetical order.
CONTEXT_IDS = (
    2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105,
    113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308,
    324, 326, 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454,
    458)
# stuffthingmaps values (COCO id - 1) of the 11 thing ids COCO never used.
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_THINGS_END = 91   # raw values 0..90 are things, 91..181 stuff
COCO_RAW_END = 182
# Official Cityscapes labelIds -> trainIds (cityscapesscripts labels.py); others -> 255.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17,
                        33: 18}


def context_lut() -> np.ndarray:
    """(460,) uint8: Pascal-Context 459-class id -> 0 (background) or 1..59."""
    lut = np.zeros(460, dtype=np.uint8)
    lut[list(CONTEXT_IDS)] = np.arange(1, len(CONTEXT_IDS) + 1)
    return lut


def coco_stuff_lut() -> np.ndarray:
    """(256,) uint8: stuffthingmaps value -> COCO-Stuff-171 trainId (255 = ignored)."""
    used = [v for v in range(COCO_RAW_END) if v not in COCO_UNUSED]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[used] = np.arange(len(used))
    return lut


def coco_object_lut() -> np.ndarray:
    """(256,) uint8: stuffthingmaps value -> COCO-Object id (things 1..80, else 0)."""
    things = [v for v in range(COCO_THINGS_END) if v not in COCO_UNUSED]
    lut = np.zeros(256, dtype=np.uint8)
    lut[things] = np.arange(1, len(things) + 1)
    return lut


def cityscapes_lut() -> np.ndarray:
    """(256,) uint8: Cityscapes labelId -> trainId (255 = ignored)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


# --- RLE (COCO / PASCAL in Detail masks) ------------------------------------------------

def rle_counts(counts: str | bytes | Sequence[int]) -> list[int]:
    """Run lengths of a COCO RLE: a list as is, or the compressed string decoded.

    The string form stores each count (from the fourth on, as the difference to the
    count two before) in 5-bit groups, least significant first, offset by 48; bit 0x20
    says "more groups follow", bit 0x10 of the last group is the sign.
    """
    if not isinstance(counts, (str, bytes)):
        return [int(c) for c in counts]
    s = counts.encode() if isinstance(counts, str) else counts
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def rle_decode(segmentation: Mapping[str, Any]) -> np.ndarray:
    """Binary mask of a COCO RLE ``{"size": [h, w], "counts": ...}``.

    Returns:
        ``(h, w)`` bool array (runs alternate 0 / 1 in column-major order, zeros first).
    """
    if not isinstance(segmentation, Mapping) or "counts" not in segmentation:
        raise DataError("a Pascal-Context annotation is not RLE-encoded ({'size', 'counts'}); "
                        "is trainval_merged.json the PASCAL in Detail file?")
    h, w = (int(v) for v in segmentation["size"])
    counts = rle_counts(segmentation["counts"])
    if sum(counts) != h * w:
        raise DataError(f"an RLE mask covers {sum(counts)} pixels, not {h}×{w}; "
                        "trainval_merged.json is damaged: delete it and prepare again")
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


# --- converters ------------------------------------------------------------------------

def convert_lut(src: Path, dst: Path, lut: np.ndarray) -> None:
    """Write ``lut[raw]`` of label ``src`` as an 8-bit grey PNG ``dst``."""
    raw = read_label(src)
    if raw.max(initial=0) >= len(lut):
        raise DataError(f"label {src} holds value {int(raw.max())} beyond the conversion "
                        "table: wrong file in this folder?")
    Image.fromarray(lut[raw].astype(np.uint8)).save(dst)


def convert_coco(ann_dir: Path, suffix: str, lut: np.ndarray, say: Callable = print) -> int:
    """Convert every raw stuffthingmaps PNG ``<id>.png`` of ``ann_dir`` to ``<id><suffix>``.

    Returns:
        the number of files written.
    """
    raws = sorted(p for p in ann_dir.glob("*.png") if "_" not in p.stem)
    for src in tqdm(raws, desc=f"{ann_dir.name} -> *{suffix}", unit="img", leave=False):
        convert_lut(src, src.with_name(src.stem + suffix), lut)
    say(f"  converted {len(raws)} labels in {ann_dir} -> *{suffix}")
    return len(raws)


def convert_cityscapes(gt_dir: Path, say: Callable = print) -> int:
    """``*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` under ``gt_dir``."""
    lut = cityscapes_lut()
    srcs = sorted(gt_dir.rglob("*_gtFine_labelIds.png"))
    for src in tqdm(srcs, desc=f"{gt_dir.name} labelIds -> trainIds", unit="img", leave=False):
        dst = src.with_name(src.name.replace("_gtFine_labelIds.png",
                                             "_gtFine_labelTrainIds.png"))
        convert_lut(src, dst, lut)
    say(f"  converted {len(srcs)} labels in {gt_dir} -> *_gtFine_labelTrainIds.png")
    return len(srcs)


def context_mask(image: Mapping[str, Any], annotations: Iterable[Mapping[str, Any]]
                 ) -> np.ndarray:
    """Pascal-Context label of one image: 459-class masks painted in order, then mapped.

    Args:
        image: the JSON image entry (``height``, ``width``).
        annotations: its ``annos_segmentation`` entries in file order (later ones win).

    Returns:
        ``(H, W)`` uint8 with 0 = background and 1..59 the evaluated classes.
    """
    ids = np.zeros((int(image["height"]), int(image["width"])), dtype=np.int64)
    for ann in annotations:
        mask = rle_decode(ann["segmentation"])
        if mask.shape != ids.shape:
            raise DataError(f"annotation {ann.get('id')} of {image.get('file_name')} is "
                            f"{mask.shape}, its image {ids.shape}: damaged trainval_merged.json")
        ids[mask] = int(ann["category_id"])
    lut = context_lut()
    return lut[np.clip(ids, 0, len(lut) - 1)] * (ids < len(lut))


def convert_context(json_path: Path, voc_root: Path, phases: Sequence[str] = ("val",),
                    say: Callable = print) -> dict[str, int]:
    """Write ``SegmentationClassContext/*.png`` and ``ImageSets/SegmentationContext/*.txt``.

    Args:
        json_path: ``trainval_merged.json``.
        voc_root: ``VOCdevkit/VOC2010``.
        phases: image phases to convert (``train``, ``val``).

    Returns:
        images written per phase.
    """
    try:
        meta = json.loads(json_path.read_text())
        images, annos = meta["images"], meta["annos_segmentation"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {json_path} as PASCAL in Detail annotations "
                        f"({brief(e)}); delete it and prepare again") from None
    by_image: dict[Any, list] = {}
    for ann in annos:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out_dir = voc_root / "SegmentationClassContext"
    split_dir = voc_root / "ImageSets" / "SegmentationContext"
    out_dir.mkdir(parents=True, exist_ok=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    for phase in phases:
        chosen = [im for im in images if im.get("phase") == phase]
        ids = []
        for im in tqdm(chosen, desc=f"Pascal-Context {phase}", unit="img", leave=False):
            stem = PurePosixPath(im["file_name"]).stem
            label = context_mask(im, by_image.get(im["image_id"], []))
            Image.fromarray(label.astype(np.uint8)).save(out_dir / f"{stem}.png")
            ids.append(stem)
        (split_dir / f"{phase}.txt").write_text("".join(f"{i}\n" for i in sorted(ids)))
        written[phase] = len(ids)
        say(f"  converted {len(ids)} Pascal-Context {phase} labels -> {out_dir}")
    return written


# --- the registry (dataset.prepare.converter) -------------------------------------------

def _pascal_context(specs: Mapping[str, BenchmarkSpec], data_root: Path,
                    say: Callable = print) -> None:
    # One pass over the json writes every requested phase (train too).
    root = data_root / specs["val"].root
    convert_context(root / "trainval_merged.json", root, tuple(specs), say)


def _coco(specs: Mapping[str, BenchmarkSpec], data_root: Path, say: Callable = print, *,
          lut: Callable[[], np.ndarray]) -> None:
    for spec in specs.values():
        convert_coco(data_root / spec.root / spec.ann_dir, spec.ann_suffix, lut(), say)


def _cityscapes(specs: Mapping[str, BenchmarkSpec], data_root: Path,
                say: Callable = print) -> None:
    for spec in specs.values():
        convert_cityscapes(data_root / spec.root / spec.ann_dir, say)


Converter = Callable[[Mapping[str, BenchmarkSpec], Path, Callable], Any]
CONVERTERS: dict[str, Converter] = {
    "pascal_context": _pascal_context,
    "coco_stuff": partial(_coco, lut=coco_stuff_lut),
    "coco_object": partial(_coco, lut=coco_object_lut),
    "cityscapes": _cityscapes,
}


def get_converter(name: str | None, benchmark: str) -> Converter | None:
    """The converter called ``name``; None (labels used as released) for None."""
    if name is None:
        return None
    if name not in CONVERTERS:
        raise DataError(f"dataset {benchmark}: prepare.converter={name!r} is not one of "
                        f"{', '.join(CONVERTERS)}")
    return CONVERTERS[name]
