"""Small synthetic benchmarks in their real on-disk layouts (a helper, not a test file).

``write_benchmark(data_root, name)`` writes a few images and label maps of benchmark
``name`` exactly where and how the real release keeps them (JPEG / PNG images, VOC palette
PNGs, 8-bit grey PNGs, split files, Cityscapes city folders), and returns what it wrote
with the labels after the benchmark's label rule. The layouts and rules are transcribed
here independently of ``sclip_lab.data`` so that tests compare two readings of docs/protocol.md §6.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# name -> (root, img_dir, img_suffix, ann_dir, ann_suffix, split file or None,
#          largest raw class value, raw 255 present, label rule, label format)
LAYOUTS: dict[str, tuple] = {
    "voc21": ("VOCdevkit/VOC2012", "JPEGImages", ".jpg", "SegmentationClass", ".png",
              "ImageSets/Segmentation/val.txt", 20, True, "identity", "palette"),
    "voc20": ("VOCdevkit/VOC2012", "JPEGImages", ".jpg", "SegmentationClass", ".png",
              "ImageSets/Segmentation/val.txt", 20, True, "reduce_zero_label", "palette"),
    "context60": ("VOCdevkit/VOC2010", "JPEGImages", ".jpg", "SegmentationClassContext",
                  ".png", "ImageSets/SegmentationContext/val.txt", 59, True, "identity",
                  "grey"),
    "context59": ("VOCdevkit/VOC2010", "JPEGImages", ".jpg", "SegmentationClassContext",
                  ".png", "ImageSets/SegmentationContext/val.txt", 59, True,
                  "reduce_zero_label", "grey"),
    "coco_object": ("coco_stuff164k", "images/val2017", ".jpg", "annotations/val2017",
                    "_instanceTrainIds.png", None, 80, False, "identity", "grey"),
    "cityscapes": ("cityscapes", "leftImg8bit/val", "_leftImg8bit.png", "gtFine/val",
                   "_gtFine_labelTrainIds.png", None, 18, True, "identity", "grey"),
    "ade20k": ("ADEChallengeData2016", "images/validation", ".jpg", "annotations/validation",
               ".png", None, 150, False, "reduce_zero_label", "grey"),
    "coco_stuff": ("coco_stuff164k", "images/val2017", ".jpg", "annotations/val2017",
                   "_labelTrainIds.png", None, 170, True, "identity", "grey"),
}
CITIES = ("frankfurt", "lindau", "munster")


def voc_palette() -> list[int]:
    """The 256-colour PASCAL VOC palette (bit-interleaved class index), flat RGB list."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def label_rule(raw: np.ndarray, rule: str) -> np.ndarray:
    """docs/protocol.md §6 label rules as a 256-entry lookup table."""
    lut = np.arange(256, dtype=np.int64)
    if rule == "reduce_zero_label":
        lut[0] = 255
        lut[1:255] = np.arange(0, 254)
    return lut[raw.astype(np.int64)]


def make_ids(name: str, n: int) -> list[str]:
    """Ids in the benchmark's own naming scheme."""
    if name.startswith("voc"):
        return [f"2007_{i + 1:06d}" for i in range(n)]
    if name.startswith("context"):
        return [f"2008_{i + 1:06d}" for i in range(n)]
    if name.startswith("coco"):
        return [f"{139 + 646 * i:012d}" for i in range(n)]
    if name == "ade20k":
        return [f"ADE_val_{i + 1:08d}" for i in range(n)]
    # Cityscapes: <city>/<city>_<seq>_<frame>, cities taken in turn.
    return [f"{c}/{c}_000000_{19 * i:06d}" for i, c in
            ((i, CITIES[i % len(CITIES)]) for i in range(n))]


def block_label(rng: np.random.Generator, size: tuple[int, int], max_value: int,
                has_255: bool, need_zero: bool) -> np.ndarray:
    """A raw label map of rectangular blocks with a 255 seam where the format has one."""
    h, w = size
    rows, cols = rng.integers(2, 4), rng.integers(2, 5)
    values = rng.integers(0, max_value + 1, size=(rows, cols))
    values[0, 0] = max_value  # the top of the range occurs
    if need_zero:
        values[-1, -1] = 0
    ys = np.minimum(np.arange(h) * rows // h, rows - 1)
    xs = np.minimum(np.arange(w) * cols // w, cols - 1)
    raw = values[ys[:, None], xs[None, :]].astype(np.uint8)
    if has_255:
        # VOC-style ignored boundary between the first and second block rows.
        y = h // rows
        raw[max(y - 1, 0): y + 1, :] = 255
    return raw


def block_image(rng: np.random.Generator, raw: np.ndarray) -> np.ndarray:
    """An RGB image whose colour follows the label blocks, with a little noise."""
    colours = rng.integers(0, 256, size=(256, 3))
    noise = rng.integers(-12, 13, size=(*raw.shape, 3))
    return np.clip(colours[raw] + noise, 0, 255).astype(np.uint8)


def write_benchmark(data_root: Path, name: str, num_images: int = 2,
                    size: tuple[int, int] = (60, 80), seed: int = 0, *,
                    bad_label_size_for: int | None = None,
                    corrupt_image_for: int | None = None,
                    extra_unlabelled: bool = True) -> list[dict]:
    """Write ``num_images`` synthetic images of benchmark ``name`` under ``data_root``.

    Args:
        data_root: the folder that plays ``data_root`` (created if needed).
        name: one of LAYOUTS.
        num_images: images of the evaluated split.
        size: ``(H, W)`` of every image.
        seed: random seed of the label blocks and colours.
        bad_label_size_for: index (sorted order) of an image whose label is written 3 px
            taller and 2 px wider than the image.
        corrupt_image_for: index of an image whose file holds bytes that no decoder reads.
        extra_unlabelled: with a split file, also write one image that the split does not
            list (as JPEGImages holds training and test images).

    Returns:
        Per image in sorted id order: ``id``, ``image_path``, ``label_path``,
        ``raw_label`` (as written), ``label`` (int64 after the label rule) and ``image``
        (the RGB array that was encoded).
    """
    if name not in LAYOUTS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(LAYOUTS)}")
    root, img_dir, img_sfx, ann_dir, ann_sfx, split, top, has_255, rule, fmt = LAYOUTS[name]
    rng = np.random.default_rng(seed)
    base = Path(data_root) / root
    ids = sorted(make_ids(name, num_images))
    records = []
    for i, image_id in enumerate(ids):
        raw = block_label(rng, size, top, has_255, need_zero=True)
        image = block_image(rng, raw)
        image_path = base / img_dir / f"{image_id}{img_sfx}"
        label_path = base / ann_dir / f"{image_id}{ann_sfx}"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        if i == corrupt_image_for:
            image_path.write_bytes(b"\xff\xd8\xff\xe0 this is not a decodable image")
        elif img_sfx.endswith(".jpg"):
            Image.fromarray(image).save(image_path, quality=95)
        else:
            Image.fromarray(image).save(image_path)
        written = raw
        if i == bad_label_size_for:
            written = np.pad(raw, ((0, 3), (0, 2)), mode="edge")
        if fmt == "palette":
            # Palette indices as stored (converting from L would remap the values).
            out = Image.frombytes("P", (written.shape[1], written.shape[0]),
                                  np.ascontiguousarray(written).tobytes())
            out.putpalette(voc_palette())
        else:
            out = Image.fromarray(written)  # 8-bit grey ("L")
        out.save(label_path)
        records.append({"id": image_id, "image_path": image_path, "label_path": label_path,
                        "raw_label": written, "label": label_rule(written, rule),
                        "image": image})
    if split is not None:
        listed = list(ids)
        rng.shuffle(listed)  # split files need not be sorted; loaders sort
        (base / split).parent.mkdir(parents=True, exist_ok=True)
        (base / split).write_text("".join(f"{x}\n" for x in listed))
        if extra_unlabelled:
            extra = base / img_dir / f"2012_999999{img_sfx}"
            Image.fromarray(block_image(rng, np.zeros(size, np.uint8))).save(extra)
    return records
