"""Benchmark preparation: ``python -m sclip_lab.prepare <benchmark> [key=value ...]``.

Downloads the official archives (resumable over HTTP Range, with progress bars and
checksums), extracts the members the benchmark needs into the standard layout under
``data_root`` (docs/protocol.md §6), converts the raw annotations the benchmark does not ship in
its evaluation format, verifies the result and only then writes a ready marker.

Converters, written from the formats' facts (docs/protocol.md §6 "Preparation facts"):

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

Cityscapes needs an account: its two zips are taken from ``from=DIR``. ``from=DIR`` also
works for any other archive already on disk.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import shutil
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import numpy as np
from PIL import Image
from tqdm import tqdm

from sclip_lab.data import (
    IGNORE_INDEX,
    BenchmarkSpec,
    DataError,
    apply_label_rule,
    list_ids,
    read_label,
    resolve_data_root,
    spec_from_config,
)
from sclip_lab.errors import EXIT_USER_ERROR, UserError, check_writable_dir, report

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
BENCHMARKS = ("voc21", "context60", "coco_object", "voc20", "cityscapes", "context59",
              "ade20k", "coco_stuff")
DOWNLOADS = "downloads"            # archives, under data_root
MARKER = ".sclip_ready.{name}.json"  # under the benchmark root, written after verification
CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"


@dataclass(frozen=True)
class Archive:
    """One official file and where its members go.

    Attributes:
        filename: name on the server and in ``from=DIR``.
        url: download address; None = needs a login (``from=DIR`` only).
        checksum: ``(algorithm, hex digest)`` as published; None = not published (zip
            archives are then still checked by their member CRCs while extracting).
        size_mb: approximate size in MB, for announcements only (not checked).
        dest: folder (relative to data_root) the members are extracted into, or the file
            path (relative to data_root) for a plain file.
        members: extract only members under these prefixes; () = a plain file.
    """

    filename: str
    url: str | None
    checksum: tuple[str, str] | None
    size_mb: int
    dest: str
    members: tuple[str, ...] = ()
    train_members: tuple[str, ...] = field(default=())


ARCHIVES: dict[str, Archive] = {
    "voc2012": Archive(
        "VOCtrainval_11-May-2012.tar",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        ("md5", "6cd6e144f989b92b3379bac3b3de84fd"), 1900, ".",
        ("VOCdevkit/VOC2012/JPEGImages/", "VOCdevkit/VOC2012/SegmentationClass/",
         "VOCdevkit/VOC2012/ImageSets/Segmentation/")),
    "voc2010": Archive(
        "VOCtrainval_03-May-2010.tar",
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
        ("md5", "da459979d0c395079b5c75ee67908abb"), 1300, ".",
        ("VOCdevkit/VOC2010/JPEGImages/",)),
    "context_json": Archive(
        "trainval_merged.json",
        "https://codalabuser.blob.core.windows.net/public/trainval_merged.json",
        ("md5", "3c2d0c0656b7be9eb61928ffe885d8ce"), 600,
        "VOCdevkit/VOC2010/trainval_merged.json"),
    "ade20k": Archive(
        "ADEChallengeData2016.zip",
        "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
        ("sha1", "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"), 923, ".",
        ("ADEChallengeData2016/images/validation/",
         "ADEChallengeData2016/annotations/validation/"),
        ("ADEChallengeData2016/images/training/", "ADEChallengeData2016/annotations/training/")),
    "coco_val2017": Archive(
        "val2017.zip", "http://images.cocodataset.org/zips/val2017.zip",
        ("sha1", "4950dc9d00dbe1c933ee0170f5797584351d2a41"), 778, "coco_stuff164k/images",
        ("val2017/",)),
    "coco_train2017": Archive(
        "train2017.zip", "http://images.cocodataset.org/zips/train2017.zip",
        ("sha1", "10ad623668ab00c62c096f0ed636d6aff41faca5"), 18000, "coco_stuff164k/images",
        ("train2017/",)),
    "stuffthingmaps": Archive(
        "stuffthingmaps_trainval2017.zip",
        "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
        "stuffthingmaps_trainval2017.zip",
        None, 659, "coco_stuff164k/annotations", ("val2017/",), ("train2017/",)),
    "cityscapes_images": Archive(
        "leftImg8bit_trainvaltest.zip", None, None, 11000, "cityscapes",
        ("leftImg8bit/val/",), ("leftImg8bit/train/",)),
    "cityscapes_labels": Archive(
        "gtFine_trainvaltest.zip", None, None, 241, "cityscapes",
        ("gtFine/val/",), ("gtFine/train/",)),
}

# Archives per benchmark; train-only archives are fetched with train=true.
NEEDS: dict[str, tuple[str, ...]] = {
    "voc21": ("voc2012",), "voc20": ("voc2012",),
    "context60": ("voc2010", "context_json"), "context59": ("voc2010", "context_json"),
    "ade20k": ("ade20k",),
    "coco_stuff": ("coco_val2017", "stuffthingmaps"),
    "coco_object": ("coco_val2017", "stuffthingmaps"),
    "cityscapes": ("cityscapes_images", "cityscapes_labels"),
}
TRAIN_NEEDS: dict[str, tuple[str, ...]] = {
    "coco_stuff": ("coco_train2017",), "coco_object": ("coco_train2017",),
}

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
                        f"({type(e).__name__}: {e}); delete it and prepare again") from None
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


# --- downloads -------------------------------------------------------------------------

def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_digest(path: Path, checksum: tuple[str, str] | None) -> str | None:
    """None if ``path`` matches ``checksum`` (or there is none), else the digest found."""
    if checksum is None:
        return None
    found = file_digest(path, checksum[0])
    return None if found == checksum[1].lower() else found


def download(url: str, dest: Path, checksum: tuple[str, str] | None = None, *,
             retries: int = 5, timeout: float = 60.0, backoff: float = 2.0,
             chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` with HTTP Range requests.

    A cut connection is retried (``retries`` times, resuming where it stopped); a later
    call resumes too. The checksum is verified before ``dest`` appears.

    Raises:
        DataError: HTTP error, too many interruptions, or a checksum mismatch (the
            partial file is then removed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        if check_digest(dest, checksum) is None:
            return dest
        dest.unlink()  # a complete file that does not match: fetch it again
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        headers = {"User-Agent": "sclip_lab-prepare"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with urlopen(Request(url, headers=headers), timeout=timeout) as resp:
                if offset and resp.status != 206:
                    offset = 0  # the server ignored the Range header: start over
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                with part.open("ab" if offset else "wb") as f, tqdm(
                        total=total, initial=offset, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=dest.name, leave=False) as bar:
                    while data := resp.read(chunk):
                        f.write(data)
                        bar.update(len(data))
            size = part.stat().st_size
            if total is not None and size < total:
                raise ConnectionError(f"connection closed at {size} of {total} bytes")
            break
        except HTTPError as e:
            if e.code == 416 and offset:
                break  # nothing left to fetch: the partial file is complete
            raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}; check the "
                            "URL or fetch the file by hand and pass from=<its folder>") from None
        except (URLError, OSError, http.client.HTTPException) as e:
            failures += 1
            got = part.stat().st_size if part.is_file() else 0
            if failures > retries:
                raise DataError(f"download of {url} interrupted {failures} times ({got} bytes "
                                f"kept in {part}: {e}); run the same command again to "
                                "resume") from None
            log.warning("download of %s interrupted at %d bytes (%s); resuming", url, got, e)
            time.sleep(min(backoff * failures, 30.0))
    found = check_digest(part, checksum)
    if found is not None:
        part.unlink()
        raise DataError(f"checksum mismatch for {dest.name} from {url}: expected "
                        f"{checksum[0]} {checksum[1]}, got {found}; the file was removed, run "
                        "the command again (or fetch it by hand and pass from=<its folder>)")
    part.replace(dest)
    return dest


# --- extraction -------------------------------------------------------------------------

def _safe_target(dest: Path, name: str) -> Path | None:
    """Where member ``name`` goes under ``dest``; None for names that would escape it."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    return dest.joinpath(*pure.parts)


def _wanted(name: str, prefixes: Sequence[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def extract(archive: Path, dest: Path, prefixes: Sequence[str]) -> int:
    """Extract the regular files of ``archive`` (tar or zip) under ``prefixes`` into ``dest``.

    Zip members are CRC-checked while read. Links, devices and names escaping ``dest``
    are skipped.

    Returns:
        the number of files written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = [i for i in zf.infolist()
                         if not i.is_dir() and _wanted(i.filename, prefixes)]
                for info in tqdm(infos, desc=f"extract {archive.name}", unit="file",
                                 leave=False):
                    target = _safe_target(dest, info.filename)
                    if target is None:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    written += 1
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf, tqdm(desc=f"extract {archive.name}",
                                                    unit="file", leave=False) as bar:
                for member in tf:  # streamed: no full listing of a 2 GB tar first
                    if not member.isfile() or not _wanted(member.name, prefixes):
                        continue
                    target = _safe_target(dest, member.name)
                    if target is None:
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(member)
                    with src, target.open("wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    written += 1
                    bar.update(1)
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive; delete it and "
                            "prepare again")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive} is damaged ({type(e).__name__}: {e}); delete it and "
                        "prepare again") from None
    if not written:
        raise DataError(f"{archive} holds no file under {', '.join(prefixes)}: not the "
                        "expected archive")
    return written


# --- verification -----------------------------------------------------------------------

@dataclass
class Report:
    """What ``verify`` found for one split."""

    name: str
    split: str
    images: int = 0
    expected: int = 0
    values: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        status = "ok" if self.ok else f"{len(self.problems)} problem(s)"
        values = sorted(self.values - {IGNORE_INDEX})
        shown = f"{values[0]}..{values[-1]}" if values else "-"
        return (f"{self.name} {self.split}: {self.images}/{self.expected} images, label values "
                f"{shown}{' (+255)' if IGNORE_INDEX in self.values else ''}: {status}")


def verify(spec: BenchmarkSpec, data_root: Path, split: str = "val",
           max_problems: int = 20) -> Report:
    """Check a prepared split: count, every label present, sizes equal, values in range.

    Values are checked after the label rule: 0..C-1 or 255.
    """
    report = Report(spec.name, split, expected=spec.expected_images)
    try:
        ids = list_ids(spec, data_root)
    except DataError as e:
        report.problems.append(str(e))
        return report
    report.images = len(ids)
    if len(ids) != spec.expected_images:
        report.problems.append(f"{len(ids)} images, expected {spec.expected_images}")
    root = data_root / spec.root
    for image_id in tqdm(ids, desc=f"verify {spec.name} {split}", unit="img", leave=False):
        if len(report.problems) >= max_problems:
            report.problems.append("... (stopped listing problems)")
            break
        image_path = root / spec.img_dir / f"{image_id}{spec.img_suffix}"
        label_path = root / spec.ann_dir / f"{image_id}{spec.ann_suffix}"
        if not image_path.is_file():
            report.problems.append(f"missing image {image_path}")
            continue
        if not label_path.is_file():
            report.problems.append(f"missing label {label_path}")
            continue
        try:
            with Image.open(image_path) as im:
                size = im.size
            raw = read_label(label_path)
        except (OSError, DataError) as e:
            report.problems.append(f"unreadable {image_path.name}/{label_path.name}: {e}")
            continue
        if (raw.shape[1], raw.shape[0]) != size:
            report.problems.append(f"{label_path} is {raw.shape[1]}×{raw.shape[0]}, its image "
                                   f"{size[0]}×{size[1]}")
            continue
        label = apply_label_rule(raw, spec.label_rule)
        values = set(np.unique(label).tolist())
        bad = {v for v in values if v != IGNORE_INDEX and not 0 <= v < spec.num_classes}
        if bad:
            report.problems.append(f"{label_path} holds {sorted(bad)[:5]} outside "
                                   f"0..{spec.num_classes - 1} and {IGNORE_INDEX}")
        report.values |= values
    return report


# --- benchmark configs and markers ------------------------------------------------------

def load_section(name: str) -> dict[str, Any]:
    """``conf/dataset/<name>.yaml`` as a plain dict."""
    from omegaconf import OmegaConf

    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dataset" / f"{name}.yaml"),
                                  resolve=True)


def split_specs(section: Mapping[str, Any], spec: BenchmarkSpec | None = None,
                with_train: bool = False) -> dict[str, BenchmarkSpec]:
    """``{"val": spec, "train": spec}`` (train only when asked) of a dataset section."""
    specs = {"val": spec or spec_from_config(section)}
    if with_train:
        train = dict(section)
        train.update(section.get("train") or {})
        train.pop("train", None)
        specs["train"] = spec_from_config(train)
    return specs


def marker_path(spec: BenchmarkSpec, data_root: Path) -> Path:
    return data_root / spec.root / MARKER.format(name=spec.name)


def is_ready(spec: BenchmarkSpec, data_root: Path, splits: Sequence[str] = ("val",)) -> bool:
    """Whether ``spec`` was verified under ``data_root`` (for every split in ``splits``)."""
    try:
        done = json.loads(marker_path(spec, data_root).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(s in done for s in splits)


def write_marker(spec: BenchmarkSpec, data_root: Path, reports: Sequence[Report]) -> Path:
    path = marker_path(spec, data_root)
    payload = {"benchmark": spec.name, "prepared": datetime.now(timezone.utc).isoformat(),
               "splits": {r.split: {"images": r.images, "values": sorted(r.values)}
                          for r in reports}}
    path.write_text(json.dumps(payload, indent=1))
    return path


def download_size_mb(name: str, with_train: bool = False) -> int:
    keys = NEEDS[name] + (TRAIN_NEEDS.get(name, ()) if with_train else ())
    return sum(ARCHIVES[k].size_mb for k in keys)


def _size(mb: int) -> str:
    return f"{mb / 1000:.1f} GB" if mb >= 1000 else f"{mb} MB"


# --- the preparation --------------------------------------------------------------------

def fetch(key: str, archive: Archive, data_root: Path, source_dir: Path | None,
          say: Callable = print) -> Path:
    """The archive file: from ``source_dir`` when there, else downloaded."""
    if source_dir is not None and (source_dir / archive.filename).is_file():
        path = source_dir / archive.filename
        found = check_digest(path, archive.checksum)
        if found is not None:
            raise DataError(f"{path} does not match its published checksum "
                            f"({archive.checksum[0]} {archive.checksum[1]}, got {found}): "
                            "download it again")
        say(f"  using {path}")
        return path
    if archive.url is None:
        where = f" (not in {source_dir})" if source_dir is not None else ""
        raise DataError(f"{archive.filename}{where}: {cityscapes_instructions(data_root)}")
    say(f"  downloading {archive.filename} (~{_size(archive.size_mb)}) from {archive.url}")
    return download(archive.url, data_root / DOWNLOADS / archive.filename, archive.checksum)


def stage(name: str, data_root: Path, source_dir: Path | None, with_train: bool,
          archives: Mapping[str, Archive], say: Callable = print) -> None:
    """Fetch and extract every archive ``name`` needs (skipping those already extracted)."""
    keys = NEEDS[name] + (TRAIN_NEEDS.get(name, ()) if with_train else ())
    for key in keys:
        archive = archives[key]
        prefixes = archive.members + (archive.train_members if with_train else ())
        # Extraction record: which member prefixes already went out (not the archive:
        # an interrupted extraction leaves no record and is redone).
        done = data_root / DOWNLOADS / f"{archive.filename}.extracted.json"
        have = set(json.loads(done.read_text())) if done.is_file() else set()
        if done.is_file() and set(prefixes) <= have:
            continue
        path = fetch(key, archive, data_root, source_dir, say)
        if prefixes:
            n = extract(path, data_root / archive.dest, prefixes)
            say(f"  extracted {n} files of {archive.filename} -> {data_root / archive.dest}")
        else:
            target = data_root / archive.dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.resolve() != target.resolve():
                shutil.copyfile(path, target)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(sorted(have | set(prefixes))))


def convert(name: str, specs: Mapping[str, BenchmarkSpec], data_root: Path,
            say: Callable = print) -> None:
    """Build the evaluation labels of ``name`` from its raw annotations."""
    for split, spec in specs.items():
        root = data_root / spec.root
        if name in ("context60", "context59") and split == "val":
            # One pass writes every requested phase (train too).
            convert_context(root / "trainval_merged.json", root, tuple(specs), say)
        elif name == "coco_stuff":
            convert_coco(root / spec.ann_dir, spec.ann_suffix, coco_stuff_lut(), say)
        elif name == "coco_object":
            convert_coco(root / spec.ann_dir, spec.ann_suffix, coco_object_lut(), say)
        elif name == "cityscapes":
            convert_cityscapes(root / spec.ann_dir, say)


def prepare(name: str, data_root: str | Path | None = None, *,
            source_dir: str | Path | None = None, with_train: bool = False,
            force: bool = False, spec: BenchmarkSpec | None = None,
            section: Mapping[str, Any] | None = None,
            archives: Mapping[str, Archive] | None = None,
            say: Callable[[str], Any] = print) -> list[Report]:
    """Download, extract, convert and verify benchmark ``name`` under ``data_root``.

    Args:
        name: one of BENCHMARKS.
        data_root: target folder; None = ``$SCLIP_DATA`` or ``./data``.
        source_dir: folder with archives already downloaded (required for Cityscapes).
        with_train: also prepare the training split (learned projection).
        force: prepare again even if marked ready.
        spec: the validation spec to verify against (default: from ``section``).
        section: dataset section (default: ``conf/dataset/<name>.yaml``).
        archives: archive table (default: ARCHIVES).
        say: where progress lines go.

    Returns:
        the verification reports (val, then train).

    Raises:
        DataError: a step failed; nothing is marked ready then.
    """
    section = dict(section) if section is not None else load_section(name)
    root = resolve_data_root(data_root)
    source = Path(source_dir).expanduser() if source_dir else None
    archives = {**ARCHIVES, **(archives or {})}
    specs = split_specs(section, spec, with_train)
    val = specs["val"]
    if is_ready(val, root, tuple(specs)) and not force:
        say(f"{name}: already prepared and verified under {root / val.root}")
        return []
    reports = [verify(s, root, split) for split, s in specs.items()]
    if not all(r.ok for r in reports) or force:
        if (root / val.root).is_dir():  # a tree is there: say what is wrong before fetching
            for r in reports:
                say(f"  found: {r.line()}" + "".join(f"\n    - {p}" for p in r.problems[:5]))
        check_writable_dir(root, "data_root")
        say(f"{name}: preparing under {root} (downloads up to ~"
            f"{_size(download_size_mb(name, with_train))})")
        stage(name, root, source, with_train, archives, say)
        convert(name, specs, root, say)
        reports = [verify(s, root, split) for split, s in specs.items()]
    for r in reports:
        say("  " + r.line())
    failed = [p for r in reports for p in r.problems]
    if failed:
        shown = "; ".join(failed[:3])
        raise DataError(f"{name}: verification failed ({len(failed)} problem(s): {shown}); "
                        f"nothing marked ready: fix or delete {root / val.root} and prepare "
                        "again")
    path = write_marker(val, root, reports)
    say(f"{name}: ready ({path})")
    return reports


def cityscapes_instructions(data_root: Path) -> str:
    names = [ARCHIVES[k].filename for k in NEEDS["cityscapes"]]
    return (f"cityscapes needs an account: log in at {CITYSCAPES_URL}, download "
            f"{names[0]} (~11 GB) and {names[1]} (~241 MB) into one folder, then run "
            f"python -m sclip_lab.prepare cityscapes from=<that folder> data_root={data_root}")


def ensure_ready(spec: BenchmarkSpec, data_root: str | Path, auto_prepare: bool) -> None:
    """Make sure ``spec`` can be evaluated from ``data_root`` (called before a run).

    Returns when the benchmark is marked ready or at least laid out (its images and split
    are where the spec says). Otherwise prepares it when ``auto_prepare`` and it can be
    downloaded (announcing the size), or raises DataError with the exact command.
    """
    data_root = resolve_data_root(data_root)
    if is_ready(spec, data_root):
        return
    try:
        list_ids(spec, data_root)
        log.info("%s is laid out under %s but not verified; run python -m sclip_lab.prepare "
                 "%s data_root=%s to verify it", spec.name, data_root, spec.name, data_root)
        return
    except DataError as missing:
        reason = str(missing)
    if spec.name not in NEEDS:
        raise DataError(f"{reason} ({spec.name} is not a benchmark that prepare knows)")
    if spec.name == "cityscapes":
        raise DataError(f"cityscapes is missing under {data_root}: "
                        f"{cityscapes_instructions(data_root)}")
    size = _size(download_size_mb(spec.name))
    if not auto_prepare:
        raise DataError(f"{reason} (downloads ~{size}; auto_prepare=true prepares it "
                        "automatically)")
    log.warning("%s is missing under %s: preparing it now (downloads ~%s)", spec.name,
                data_root, size)
    prepare(spec.name, data_root, spec=spec, say=log.warning)


# --- CLI --------------------------------------------------------------------------------

USAGE = ("usage: python -m sclip_lab.prepare <benchmark> [data_root=DIR] [from=DIR] "
         "[train=true] [force=true]\n  benchmarks: " + ", ".join(BENCHMARKS))
_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ArgumentError(DataError):
    """A bad command line (the usage hint follows the message)."""


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``<benchmark> key=value ...`` -> options (ArgumentError for anything unknown)."""
    names = [a for a in argv if "=" not in a]
    if len(names) != 1:
        raise ArgumentError("give exactly one benchmark" + (f" (got {', '.join(names)})"
                                                        if names else ""))
    name = names[0]
    if name not in BENCHMARKS:
        raise ArgumentError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    opts: dict[str, Any] = {"name": name, "data_root": None, "source_dir": None,
                            "with_train": False, "force": False}
    keys = {"data_root": "data_root", "from": "source_dir", "train": "with_train",
            "force": "force"}
    for arg in argv:
        if "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if key not in keys:
            raise ArgumentError(f"unknown option {key}=; options: {', '.join(keys)}")
        if keys[key] in ("with_train", "force"):
            if value.lower() not in _FLAGS:
                raise ArgumentError(f"{key}={value} must be true or false")
            opts[keys[key]] = _FLAGS[value.lower()]
        else:
            opts[keys[key]] = value or None
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        opts = parse_args(argv)
        prepare(opts.pop("name"), **opts)
    except UserError as e:
        report(f"{e} (python -m sclip_lab.prepare --help)" if isinstance(e, ArgumentError)
               else e)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
