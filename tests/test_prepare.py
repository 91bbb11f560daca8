"""sclip_lab.prepare and the Hugging Face source: everything offline, on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from synthetic import write_benchmark

from sclip_lab import data, prepare
from sclip_lab.data import DataError
from sclip_lab.prepare import Archive, catalogue

REPO = Path(__file__).resolve().parents[1]


# --- a local HTTP server with Range support and cut connections ----------------------------

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.path in srv.cut or self.path in srv.cut_once:
            # Promise the whole body, send half of it, hang up.
            srv.cut_once.discard(self.path)
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.cut, srv.cut_once = {}, [], set(), set()
    srv.ignore_range = False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    """Retries without back-off sleeps."""
    original = prepare.download

    def fast(*args, **kwargs):
        kwargs.setdefault("backoff", 0.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(prepare, "download", fast)


def digest(blob: bytes, algorithm: str = "md5") -> tuple[str, str]:
    return algorithm, hashlib.new(algorithm, blob).hexdigest()


def tree_files(folder: Path, under: str = "") -> dict[str, bytes]:
    """Every file below ``folder`` as ``{archive name: bytes}`` (names prefixed by under)."""
    return {under + p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def section_of(name: str, **changes) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml"))
    cfg.update(changes)
    return cfg


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpg(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def serve(srv, path: str, blob: bytes, checksum=True, base: Archive | None = None,
          **changes) -> Archive:
    srv.files[path] = blob
    archive = base or Archive(path.rsplit("/", 1)[-1], None, None, 1, ".")
    return replace(archive, url=srv.url + path, checksum=digest(blob) if checksum else None,
                   **changes)


def quiet(*_args) -> None:
    pass


# --- downloads ---------------------------------------------------------------------------

def test_download_resumes_after_a_cut_connection(server, tmp_path):
    blob = np.random.default_rng(0).bytes(300_000)
    server.files["/big.bin"] = blob
    server.cut_once.add("/big.bin")
    out = prepare.download(server.url + "/big.bin", tmp_path / "big.bin",
                           digest(blob, "sha256"), chunk=4096)
    assert out.read_bytes() == blob and not (tmp_path / "big.bin.part").exists()
    (first, r1), (second, r2) = server.requests
    assert r1 is None and r2 == "bytes=150000-", "the second request resumes where it stopped"


def test_download_resumes_a_partial_file_of_an_earlier_run(server, tmp_path):
    blob = np.random.default_rng(1).bytes(50_000)
    server.files["/x.zip"] = blob
    (tmp_path / "x.zip.part").write_bytes(blob[:1000])
    prepare.download(server.url + "/x.zip", tmp_path / "x.zip", digest(blob))
    assert (tmp_path / "x.zip").read_bytes() == blob
    assert server.requests == [("/x.zip", "bytes=1000-")]
    # Already there and matching: no request at all
    prepare.download(server.url + "/x.zip", tmp_path / "x.zip", digest(blob))
    assert len(server.requests) == 1


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    blob = np.random.default_rng(2).bytes(20_000)
    server.files["/y"] = blob
    server.ignore_range = True
    (tmp_path / "y.part").write_bytes(b"garbage" * 10)
    prepare.download(server.url + "/y", tmp_path / "y", digest(blob))
    assert (tmp_path / "y").read_bytes() == blob


def test_download_checksum_mismatch_removes_the_file(server, tmp_path):
    server.files["/z"] = b"tampered content"
    with pytest.raises(DataError, match="checksum mismatch for z .*expected md5 0+, got"):
        prepare.download(server.url + "/z", tmp_path / "z", ("md5", "0" * 32))
    assert not list(tmp_path.iterdir())


def test_download_errors_are_clear(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        prepare.download(server.url + "/absent", tmp_path / "a")
    server.files["/w"] = b"w" * 10_000
    server.cut.add("/w")  # cut every time
    with pytest.raises(DataError, match="interrupted 2 times .*run the same command again"):
        prepare.download(server.url + "/w", tmp_path / "w", retries=1)
    assert (tmp_path / "w.part").stat().st_size > 0, "kept for the next run"


def test_download_without_name_resolution_fails_at_once(tmp_path):
    # .invalid never resolves (RFC 6761): retrying cannot help, so there is no backoff
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="cannot reach .*pass from=<its folder>"):
        prepare.download("http://archives.invalid/x.tar", tmp_path / "x.tar", backoff=30.0)
    assert time.perf_counter() - t0 < 20


# --- converters ---------------------------------------------------------------------------

def rle_string(counts: list[int]) -> str:
    """COCO's rleToString (maskApi.c), transcribed: the encoder of the compressed form."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def runs(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary mask in column-major order, zeros first."""
    counts, value, run = [], 0, 0
    for v in mask.T.ravel().astype(np.uint8):
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return counts


def rle_of(mask: np.ndarray) -> dict:
    return {"size": list(mask.shape), "counts": rle_string(runs(mask))}


def test_rle_known_strings_and_roundtrip():
    assert prepare.rle_counts("231") == [2, 3, 1]
    assert prepare.rle_counts("2312") == [2, 3, 1, 5]   # 4th count stored as 5 - 3
    assert prepare.rle_counts(":31O") == [10, 3, 1, 2]  # negative difference 2 - 3
    assert prepare.rle_counts(b"231") == [2, 3, 1]
    # column-major: column 0 = 0 0 1, column 1 = 1 1 0
    assert prepare.rle_decode({"size": [3, 2], "counts": "231"}).tolist() == [
        [False, True], [False, True], [True, False]]
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((int(rng.integers(1, 40)), int(rng.integers(1, 40)))) < rng.random()
        assert (prepare.rle_decode(rle_of(mask)) == mask).all()
        assert (prepare.rle_decode({"size": list(mask.shape), "counts": runs(mask)}) ==
                mask).all()
    with pytest.raises(DataError, match="covers 5 pixels"):
        prepare.rle_decode({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(DataError, match="not RLE"):
        prepare.rle_decode([[0, 0, 1, 1]])


def test_context_table_matches_the_vocabulary():
    lut = prepare.context_lut()
    classes = section_of("context60")["classes"]
    assert len(prepare.CONTEXT_IDS) == 59 and list(prepare.CONTEXT_IDS) == sorted(
        prepare.CONTEXT_IDS)
    # A few of the 459 ids by name (PASCAL in Detail categories)
    for cat, name in [(2, "aeroplane"), (59, "car"), (65, "cat"), (113, "dog"),
                      (284, "person"), (360, "sky"), (458, "wood")]:
        assert classes[lut[cat]] == name
    assert lut[0] == lut[1] == lut[459] == 0


def context_json(images: list[dict], annos: list[dict]) -> bytes:
    return json.dumps({"info": {}, "images": images, "annos_segmentation": annos,
                       "categories": []}).encode()


def region(h: int, w: int, ys: slice, xs: slice) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[ys, xs] = True
    return m


CONTEXT_IMAGES = [
    {"file_name": "2008_000002.jpg", "image_id": 2008000002, "height": 4, "width": 5,
     "phase": "val"},
    {"file_name": "2008_000001.jpg", "image_id": 2008000001, "height": 4, "width": 5,
     "phase": "val"},
    {"file_name": "2008_000003.jpg", "image_id": 2008000003, "height": 4, "width": 5,
     "phase": "train"},
]
CONTEXT_ANNOS = [
    # image 2: person on the top half, then an aeroplane over the first column (wins),
    # then a non-evaluated class (id 1) on the last pixel -> background
    {"id": 1, "image_id": 2008000002, "category_id": 284,
     "segmentation": rle_of(region(4, 5, slice(0, 2), slice(None)))},
    {"id": 2, "image_id": 2008000002, "category_id": 2,
     "segmentation": rle_of(region(4, 5, slice(None), slice(0, 1)))},
    {"id": 3, "image_id": 2008000002, "category_id": 1,
     "segmentation": rle_of(region(4, 5, slice(3, 4), slice(4, 5)))},
    {"id": 4, "image_id": 2008000001, "category_id": 458,
     "segmentation": {"size": [4, 5], "counts": [0, 20]}},
    {"id": 5, "image_id": 2008000003, "category_id": 360,
     "segmentation": rle_of(region(4, 5, slice(0, 1), slice(None)))},
]
CONTEXT_EXPECTED = {
    "2008_000002": [[1, 37, 37, 37, 37], [1, 37, 37, 37, 37], [1, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0]],
    "2008_000001": [[59] * 5] * 4,
    "2008_000003": [[47] * 5] + [[0] * 5] * 3,  # sky
}


def test_convert_context(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2010"
    voc.mkdir(parents=True)
    (voc / "trainval_merged.json").write_bytes(context_json(CONTEXT_IMAGES, CONTEXT_ANNOS))
    written = prepare.convert_context(voc / "trainval_merged.json", voc, ("val", "train"),
                                      say=quiet)
    assert written == {"val": 2, "train": 1}
    for stem, expected in CONTEXT_EXPECTED.items():
        label = Image.open(voc / "SegmentationClassContext" / f"{stem}.png")
        assert label.mode == "L" and np.asarray(label).tolist() == expected
    sets = voc / "ImageSets/SegmentationContext"
    assert (sets / "val.txt").read_text() == "2008_000001\n2008_000002\n"
    assert (sets / "train.txt").read_text() == "2008_000003\n"
    (voc / "trainval_merged.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read .*trainval_merged.json"):
        prepare.convert_context(voc / "trainval_merged.json", voc, say=quiet)


def test_coco_tables_by_hand_and_by_name():
    stuff, obj = prepare.coco_stuff_lut(), prepare.coco_object_lut()
    # raw value = COCO id - 1: person 0, stop sign 12, toothbrush 89, banner 91, wood 181
    cases = {0: (0, 1), 12: (11, 12), 89: (79, 80), 91: (80, 0), 181: (170, 0),
             11: (255, 0), 90: (255, 0), 255: (255, 0)}
    for raw, (s, o) in cases.items():
        assert (stuff[raw], obj[raw]) == (s, o), raw
    assert sorted(set(stuff[:182]) - {255}) == list(range(171))
    assert sorted(set(obj) - {0}) == list(range(1, 81))
    stuff_names = section_of("coco_stuff")["classes"]
    obj_names = section_of("coco_object")["classes"]
    for raw in range(91):
        if obj[raw]:
            first = obj_names[obj[raw]].split(", ")[0]
            assert stuff_names[stuff[raw]] == first.replace(" ", ""), raw


def test_convert_coco_files(tmp_path):
    ann = tmp_path / "annotations/val2017"
    ann.mkdir(parents=True)
    raw = np.array([[0, 12, 11], [91, 181, 255]], np.uint8)
    Image.fromarray(raw).save(ann / "000000000139.png")
    assert prepare.convert_coco(ann, "_labelTrainIds.png", prepare.coco_stuff_lut(), quiet) == 1
    assert prepare.convert_coco(ann, "_instanceTrainIds.png", prepare.coco_object_lut(),
                                quiet) == 1, "converted files are not converted again"
    stuff = np.asarray(Image.open(ann / "000000000139_labelTrainIds.png"))
    obj = np.asarray(Image.open(ann / "000000000139_instanceTrainIds.png"))
    assert stuff.tolist() == [[0, 11, 255], [80, 170, 255]]
    assert obj.tolist() == [[1, 12, 0], [0, 0, 0]]


def test_cityscapes_table_and_converter(tmp_path):
    lut = prepare.cityscapes_lut()
    names = section_of("cityscapes")["classes"]
    for label_id, name in [(7, "road"), (8, "sidewalk"), (19, "trafficlight"), (24, "person"),
                           (26, "car"), (31, "train"), (33, "bicycle")]:
        assert names[lut[label_id]] == name
    for label_id in (0, 1, 4, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255):
        assert lut[label_id] == 255
    city = tmp_path / "gtFine/val/lindau"
    city.mkdir(parents=True)
    Image.fromarray(np.array([[7, 26, 0], [33, 29, 11]], np.uint8)).save(
        city / "lindau_000000_000019_gtFine_labelIds.png")
    assert prepare.convert_cityscapes(tmp_path / "gtFine/val", quiet) == 1
    out = np.asarray(Image.open(city / "lindau_000000_000019_gtFine_labelTrainIds.png"))
    assert out.tolist() == [[0, 13, 255], [18, 255, 2]]


# --- verification --------------------------------------------------------------------------

def test_verify_catches_missing_files_bad_values_and_counts(tmp_path):
    records = write_benchmark(tmp_path, "ade20k", num_images=3)
    spec = replace(data.spec_from_config(section_of("ade20k")), expected_images=3)
    report = prepare.verify(spec, tmp_path)
    assert report.ok and report.images == 3 and 255 in report.values
    assert re.search(r"3/3 images, label values \d+\.\.149 \(\+255\): ok$", report.line())
    assert not prepare.verify(replace(spec, expected_images=2000), tmp_path).ok
    raw = records[0]["raw_label"].copy()
    raw[0, 0] = 151
    Image.fromarray(raw).save(records[0]["label_path"])
    records[1]["label_path"].unlink()
    problems = prepare.verify(spec, tmp_path).problems
    assert any("holds [150] outside 0..149" in p for p in problems)
    assert any(f"missing label {records[1]['label_path']}" in p for p in problems)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(records[1]["label_path"])
    assert any("is 5×5, its image 80×60" in p
               for p in prepare.verify(spec, tmp_path).problems)


# --- whole preparations against the local server --------------------------------------------

def voc_archive(tmp_path: Path, n: int = 3) -> tuple[bytes, list[dict]]:
    stage = tmp_path / "stage"
    records = write_benchmark(stage, "voc21", num_images=n)
    files = tree_files(stage)
    files["VOCdevkit/VOC2012/Annotations/2007_000001.xml"] = b"<annotation/>"
    files["VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"] = b"2012_999999\n"
    return make_tar(files), records


def test_prepare_voc_downloads_resumes_extracts_verifies_and_marks(server, tmp_path):
    blob, records = voc_archive(tmp_path)
    server.cut_once.add("/voc.tar")
    archive = serve(server, "/voc.tar", blob, base=prepare.ARCHIVES["voc2012"])
    root = tmp_path / "data"
    lines = []
    reports = prepare.prepare("voc21", root, section=section_of("voc21", expected_images=3),
                              archives={"voc2012": archive}, say=lines.append)
    assert [r.ok for r in reports] == [True] and reports[0].images == 3
    assert any("downloading VOCtrainval_11-May-2012.tar" in line for line in lines)
    assert [r for _, r in server.requests][1].startswith("bytes="), "resumed after the cut"
    voc = root / "VOCdevkit/VOC2012"
    assert (voc / ".sclip_ready.voc21.json").is_file()
    assert not (voc / "Annotations").exists(), "only the needed members are extracted"
    ds = data.SegmentationDataset(data.spec_from_config(section_of("voc21")), root)
    assert ds.ids == [r["id"] for r in records]
    assert all((item["label"] == rec["label"]).all() for item, rec in zip(ds, records))
    # Ready: nothing is fetched again; voc20 shares the files and only verifies them
    n = len(server.requests)
    prepare.prepare("voc21", root, section=section_of("voc21", expected_images=3),
                    archives={"voc2012": archive}, say=quiet)
    prepare.prepare("voc20", root, section=section_of("voc20", expected_images=3),
                    archives={"voc2012": archive}, say=quiet)
    assert len(server.requests) == n and (voc / ".sclip_ready.voc20.json").is_file()


def test_prepare_checksum_mismatch_marks_nothing(server, tmp_path):
    blob, _ = voc_archive(tmp_path, n=1)
    archive = replace(serve(server, "/voc.tar", blob, base=prepare.ARCHIVES["voc2012"]),
                      checksum=("md5", "f" * 32))
    root = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch for VOCtrainval_11-May-2012.tar"):
        prepare.prepare("voc21", root, section=section_of("voc21", expected_images=1),
                        archives={"voc2012": archive}, say=quiet)
    assert not list(root.rglob(".sclip_ready*")) and not (root / "VOCdevkit").exists()
    spec = data.spec_from_config(section_of("voc21"))
    assert not prepare.is_ready(spec, root)
    with pytest.raises(DataError, match="sclip_lab.prepare voc21"):
        prepare.ensure_ready(spec, root, auto_prepare=False)


def test_prepare_failing_verification_marks_nothing(server, tmp_path):
    blob, _ = voc_archive(tmp_path, n=2)
    archive = serve(server, "/voc.tar", blob, base=prepare.ARCHIVES["voc2012"])
    root = tmp_path / "data"
    with pytest.raises(DataError, match="verification failed .*2 images, expected 1449"):
        prepare.prepare("voc21", root, archives={"voc2012": archive}, say=quiet)
    assert not list(root.rglob(".sclip_ready*"))


def test_prepare_coco_stuff_then_coco_object(server, tmp_path):
    rng = np.random.default_rng(0)
    ids = ["000000000139", "000000000285"]
    raws = {i: rng.choice([0, 12, 11, 91, 181, 255], size=(6, 7)).astype(np.uint8)
            for i in ids}
    images = make_zip({f"val2017/{i}.jpg": jpg(6, 7) for i in ids})
    maps = make_zip({**{f"val2017/{i}.png": png(r) for i, r in raws.items()},
                     **{f"train2017/{i}.png": png(r) for i, r in raws.items()}})
    archives = {
        "coco_val2017": serve(server, "/val2017.zip", images,
                              base=prepare.ARCHIVES["coco_val2017"]),
        "stuffthingmaps": serve(server, "/stuff.zip", maps, checksum=False,
                                base=prepare.ARCHIVES["stuffthingmaps"]),
    }
    root = tmp_path / "data"
    prepare.prepare("coco_stuff", root, section=section_of("coco_stuff", expected_images=2),
                    archives=archives, say=quiet)
    n = len(server.requests)
    assert n == 2
    prepare.prepare("coco_object", root, section=section_of("coco_object", expected_images=2),
                    archives=archives, say=quiet)
    assert len(server.requests) == n, "the shared archives are not fetched again"
    assert not (root / "coco_stuff164k/annotations/train2017").exists()
    stuff, obj = prepare.coco_stuff_lut(), prepare.coco_object_lut()
    for name, lut in (("coco_stuff", stuff), ("coco_object", obj)):
        ds = data.SegmentationDataset(data.spec_from_config(section_of(name)), root)
        assert ds.ids == ids
        for item in ds:
            assert (item["label"] == lut[raws[item["id"]]]).all()


def test_prepare_context59_from_server(server, tmp_path):
    files = {f"VOCdevkit/VOC2010/JPEGImages/{im['file_name']}": jpg(4, 5, k)
             for k, im in enumerate(CONTEXT_IMAGES)}
    files["VOCdevkit/VOC2010/SegmentationClass/2008_000001.png"] = png(np.zeros((4, 5)))
    archives = {
        "voc2010": serve(server, "/voc2010.tar", make_tar(files),
                         base=prepare.ARCHIVES["voc2010"]),
        "context_json": serve(server, "/trainval_merged.json",
                              context_json(CONTEXT_IMAGES, CONTEXT_ANNOS),
                              base=prepare.ARCHIVES["context_json"]),
    }
    root = tmp_path / "data"
    section = section_of("context59", expected_images=2)
    section["train"] = {**section["train"], "expected_images": 1}
    reports = prepare.prepare("context59", root, section=section, archives=archives,
                              with_train=True, say=quiet)
    assert [(r.split, r.images) for r in reports] == [("val", 2), ("train", 1)]
    voc = root / "VOCdevkit/VOC2010"
    assert not (voc / "SegmentationClass").exists()
    ds = data.SegmentationDataset(data.spec_from_config(section_of("context59")), root)
    for item in ds:
        expected = np.array(CONTEXT_EXPECTED[item["id"]])
        assert (item["label"] == np.where(expected == 0, 255, expected - 1)).all()
    assert prepare.is_ready(data.spec_from_config(section), root, ("val", "train"))


def cityscapes_zips(folder: Path) -> dict[str, np.ndarray]:
    ids = {"frankfurt/frankfurt_000000_000294": np.array([[7, 26], [0, 33]], np.uint8),
           "lindau/lindau_000000_000019": np.array([[8, 8], [24, 11]], np.uint8)}
    images, labels = {"README": b"x"}, {"license.txt": b"x"}
    for i, raw in ids.items():
        images[f"leftImg8bit/val/{i}_leftImg8bit.png"] = png(np.zeros((2, 2, 3)))
        images[f"leftImg8bit/train/{i}_leftImg8bit.png"] = png(np.zeros((2, 2, 3)))
        labels[f"gtFine/val/{i}_gtFine_labelIds.png"] = png(raw)
        labels[f"gtFine/val/{i}_gtFine_color.png"] = png(np.zeros((2, 2, 3)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "leftImg8bit_trainvaltest.zip").write_bytes(make_zip(images))
    (folder / "gtFine_trainvaltest.zip").write_bytes(make_zip(labels))
    return ids


def test_prepare_cityscapes_from_user_zips(tmp_path):
    root = tmp_path / "data"
    section = section_of("cityscapes", expected_images=2)
    with pytest.raises(DataError, match="cityscapes-dataset.com.*leftImg8bit_trainvaltest.zip"
                                        ".*gtFine_trainvaltest.zip"):
        prepare.prepare("cityscapes", root, section=section, say=quiet)
    ids = cityscapes_zips(tmp_path / "zips")
    prepare.prepare("cityscapes", root, source_dir=tmp_path / "zips", section=section,
                    say=quiet)
    assert not (root / "cityscapes/leftImg8bit/train").exists()
    ds = data.SegmentationDataset(data.spec_from_config(section), root)
    assert ds.ids == sorted(ids)
    lut = prepare.cityscapes_lut()
    for item in ds:
        assert (item["label"] == lut[ids[item["id"]]]).all()


def test_prepare_damaged_archive(tmp_path):
    (tmp_path / "zips").mkdir()
    (tmp_path / "zips/leftImg8bit_trainvaltest.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="neither a zip nor a tar|damaged"):
        prepare.prepare("cityscapes", tmp_path / "data", source_dir=tmp_path / "zips",
                        say=quiet)


# --- a full disk is the disk's fault, never the archive's (real tmpfs, small_fs) ---------------

EXTRACT = sys.modules["sclip_lab.prepare.extract"]  # ``prepare.extract`` is the function


def incompressible(n: int = 4, kib: int = 100) -> dict[str, bytes]:
    """``n`` members of ``kib`` KiB of random bytes under leftImg8bit/val/ (and a README)."""
    rng = np.random.default_rng(0)
    files = {f"leftImg8bit/val/city/city_{i:06d}_leftImg8bit.png": rng.bytes(kib << 10)
             for i in range(n)}
    return {"README": b"x", **files}


def fill(folder: Path) -> None:
    """Write zeros under ``folder`` until its filesystem is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, bytes(1 << 16)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != "filler"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extract_refuses_upfront_what_the_free_space_cannot_hold(small_fs, tmp_path, kind):
    """400 KiB of declared members, a 256 KiB filesystem: one line before anything is
    written, with what is needed and free where, and the archive is kept."""
    fs = small_fs(256)
    archive = tmp_path / f"images.{kind}"
    archive.write_bytes((make_zip if kind == "zip" else make_tar)(incompressible()))
    with pytest.raises(DataError) as err:
        prepare.extract(archive, fs / "cityscapes", ("leftImg8bit/val/",))
    message = str(err.value)
    assert re.fullmatch(r"no space left on the device: need 0\.00041 GB, free 0\.000\d+ GB at "
                        + re.escape(str(fs / "cityscapes")) + r"; free space or set data_root=… "
                        r"to a larger disk, then prepare again", message), message
    assert archive.is_file() and not files_under(fs)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_disk_filled_during_extraction_keeps_the_archive(small_fs, tmp_path, kind,
                                                          monkeypatch):
    """The declared sizes fit, then the disk fills up (another writer): the write error
    is reported as no space, never as a damaged archive, and no half-written file stays."""
    fs = small_fs(1024)
    archive = tmp_path / f"images.{kind}"
    archive.write_bytes((make_zip if kind == "zip" else make_tar)(incompressible()))
    check = EXTRACT.check_space

    def then_fill(dest, members):
        check(dest, members)
        fill(fs)

    monkeypatch.setattr(EXTRACT, "check_space", then_fill)
    with pytest.raises(DataError) as err:
        prepare.extract(archive, fs / "cityscapes", ("leftImg8bit/val/",))
    message = str(err.value)
    assert message.startswith(f"no space left on the device: free 0 GB at {fs / 'cityscapes'}"
                              f" while extracting {archive.name} (kept: it is not damaged)")
    assert "delete" not in message and archive.is_file() and not files_under(fs)


def large_cityscapes_zips(zips: Path) -> Path:
    """Cityscapes' two zips in ``zips``, the images one grown by incompressible members past
    what a 256 KiB disk holds -> its path."""
    cityscapes_zips(zips)
    images = zips / "leftImg8bit_trainvaltest.zip"
    with zipfile.ZipFile(images) as zf:
        files = {i.filename: zf.read(i) for i in zf.infolist()}
    images.write_bytes(make_zip({**files, **incompressible()}))
    return images


def test_prepare_on_a_full_disk_marks_nothing(small_fs, tmp_path, monkeypatch):
    """Through ``prepare``: the user's login-gated zip is kept, and neither the extraction
    record nor the ready marker is written."""
    zips = tmp_path / "zips"
    images = large_cityscapes_zips(zips)
    root = small_fs(256) / "data"
    section = section_of("cityscapes", expected_images=2)
    with pytest.raises(DataError, match="no space left on the device: need"):
        prepare.prepare("cityscapes", root, source_dir=zips, section=section, say=quiet)
    assert images.is_file() and not list(root.rglob("*.extracted.json"))
    assert not list(root.rglob(".sclip_ready.*"))


# --- the catalogue: conf/dataset/*.yaml prepare: sections -----------------------------------

TABLE1 = ("voc21", "context60", "coco_object", "voc20", "cityscapes", "context59", "ade20k",
          "coco_stuff")


def test_benchmarks_are_the_dataset_files_in_table1_order():
    assert prepare.benchmarks() == TABLE1
    assert set(TABLE1) == {p.stem for p in (REPO / "conf/dataset").glob("*.yaml")}


@pytest.mark.parametrize("name", TABLE1)
def test_every_need_and_converter_is_defined(name):
    section = prepare.load_section(name)
    keys = catalogue.needs(section, with_train=True)
    assert keys and all(k in prepare.ARCHIVES for k in keys)
    assert section["prepare"]["converter"] in (None, *prepare.CONVERTERS)
    for key in keys:
        archive = prepare.ARCHIVES[key]
        assert archive.size_mb > 0 and (archive.url is not None or section["prepare"]["login"])


def test_the_catalogue_keeps_the_published_facts():
    voc = prepare.ARCHIVES["voc2012"]
    assert voc.checksum == ("md5", "6cd6e144f989b92b3379bac3b3de84fd")
    assert voc.members[0] == "VOCdevkit/VOC2012/JPEGImages/" and voc.dest == "."
    assert prepare.ARCHIVES["ade20k"].checksum[0] == "sha1"
    assert prepare.ARCHIVES["context_json"].members == (), "a plain file"
    assert prepare.ARCHIVES["stuffthingmaps"].checksum is None
    assert prepare.ARCHIVES["stuffthingmaps"].train_members == ("train2017/",)
    # shared archives: voc20, context59 and coco_object need what another file defines
    for name, owner in (("voc20", "voc21"), ("context59", "context60"),
                        ("coco_object", "coco_stuff")):
        assert prepare.load_section(name)["prepare"]["archives"] == {}
        assert (catalogue.needs(prepare.load_section(name), True)
                == catalogue.needs(prepare.load_section(owner), True))


def test_an_archive_is_defined_once(monkeypatch):
    twice = {n: prepare.load_section(n) for n in ("voc21", "voc20")}
    twice["voc20"]["prepare"]["archives"] = twice["voc21"]["prepare"]["archives"]
    monkeypatch.setattr(catalogue, "_sections", lambda: twice)
    with pytest.raises(DataError, match="'voc2012' is defined in both voc21.yaml and voc20"):
        catalogue._load_archives()


def test_prepare_sections_are_checked(tmp_path):
    section = section_of("voc21", expected_images=1)
    section["prepare"] = {**section["prepare"], "converter": "voc"}
    with pytest.raises(DataError, match="prepare.converter='voc' is not one of pascal_context"):
        prepare.prepare("voc21", tmp_path, section=section, say=quiet)
    section["prepare"] = {"need": ["voc2012"]}
    with pytest.raises(DataError, match="dataset voc21: dataset.prepare.need: Key 'need'"):
        prepare.prepare("voc21", tmp_path, section=section, say=quiet)
    section["prepare"] = {"archives": {"x": {"filename": "x.zip", "dest": "."}}}
    with pytest.raises(DataError, match="key 'prepare.archives.x.size_mb' is missing"):
        prepare.prepare("voc21", tmp_path, section=section, say=quiet)
    with pytest.raises(DataError, match="unknown benchmark 'voc'; choose one of: voc21, "):
        prepare.load_section("voc")


def test_a_benchmark_without_archives_is_verified_and_marked(tmp_path):
    write_benchmark(tmp_path, "ade20k", num_images=2)
    section = section_of("ade20k", expected_images=2, prepare={})
    reports = prepare.prepare("ade20k", tmp_path, section=section, force=True, say=quiet)
    assert [r.ok for r in reports] == [True] and prepare.is_ready(
        data.spec_from_config(section), tmp_path)


def test_login_instructions_list_every_archive_without_url(tmp_path):
    section = prepare.load_section("cityscapes")
    text = prepare.login_instructions("cityscapes", section, tmp_path, prepare.ARCHIVES)
    assert text == ("cityscapes needs an account: log in at "
                    "https://www.cityscapes-dataset.com/downloads/, download "
                    "leftImg8bit_trainvaltest.zip (~11 GB) and gtFine_trainvaltest.zip "
                    "(~241 MB) into one folder, then run python -m sclip_lab.prepare "
                    f"cityscapes from=<that folder> data_root={tmp_path}")


# --- ensure_ready and the CLI ---------------------------------------------------------------

def test_ensure_ready_cases(server, tmp_path, monkeypatch):
    spec = replace(data.spec_from_config(section_of("ade20k")), expected_images=2)
    laid_out = tmp_path / "laid"
    write_benchmark(laid_out, "ade20k", num_images=2)
    prepare.ensure_ready(spec, laid_out, auto_prepare=False)  # laid out: fine
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        prepare.ensure_ready(spec, root, auto_prepare=False)
    msg = str(e.value)
    assert f"python -m sclip_lab.prepare ade20k data_root={root}" in msg
    assert "auto_prepare=true" in msg and "923 MB" in msg and "\n" not in msg
    with pytest.raises(DataError, match="gtFine_trainvaltest.zip"):
        prepare.ensure_ready(data.spec_from_config(section_of("cityscapes")), root, False)
    # auto_prepare downloads, verifies and marks it
    blob = make_zip(tree_files(laid_out))
    monkeypatch.setitem(prepare.ARCHIVES, "ade20k",
                        serve(server, "/ade.zip", blob, base=prepare.ARCHIVES["ade20k"]))
    prepare.ensure_ready(spec, root, auto_prepare=True)
    assert prepare.is_ready(spec, root) and len(data.SegmentationDataset(spec, root)) == 2


def test_cli_errors_and_ready(tmp_path, capsys):
    assert prepare.main(["nope"]) == 2
    assert "unknown benchmark 'nope'; choose one of: voc21" in capsys.readouterr().err
    assert prepare.main(["voc21", "colour=red"]) == 2
    assert "unknown option colour=" in capsys.readouterr().err
    assert prepare.main(["voc21", "ade20k"]) == 2
    assert prepare.main(["voc21", "train=maybe"]) == 2
    assert prepare.main([]) == 2 and "usage" in capsys.readouterr().out
    write_benchmark(tmp_path, "ade20k", num_images=2)
    prepare.prepare("ade20k", tmp_path, section=section_of("ade20k", expected_images=2),
                    say=quiet)
    assert prepare.main(["ade20k", f"data_root={tmp_path}"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert prepare.parse_args(["voc20", "from=/z", "train=true", "force=1"]) == {
        "name": "voc20", "data_root": None, "source_dir": "/z", "with_train": True,
        "force": True}


def test_cli_help_lists_the_benchmarks(capsys):
    assert prepare.main(["--help"]) == 0
    assert "benchmarks: " + ", ".join(TABLE1) in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "sclip_lab.prepare", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m sclip_lab.prepare")


def test_cli_module_unknown_benchmark_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "sclip_lab.prepare", "pascal"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown benchmark 'pascal'" in proc.stderr


# --- Hugging Face source -------------------------------------------------------------------

@pytest.fixture()
def hf_voc(tmp_path):
    import datasets

    records = write_benchmark(tmp_path / "files", "voc21", num_images=3)
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "annotation": datasets.Image()})
    table = {"id": [r["id"] for r in records],
             "image": [str(r["image_path"]) for r in records],
             "annotation": [str(r["label_path"]) for r in records]}
    ds = datasets.Dataset.from_dict(table, features=features)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "hf"))
    return tmp_path, records


def hf_section(where: Path, **hf) -> dict:
    section = section_of("voc21", source="hf")
    section["hf"] = {**section["hf"], "path": str(where), **hf}
    return section


def test_hf_source_matches_the_files_source(hf_voc):
    tmp_path, records = hf_voc
    files = data.build_dataset(section_of("voc21"), tmp_path / "files")
    for streaming in (False, True):
        ds = data.build_dataset(hf_section(tmp_path / "hf", streaming=streaming), None,
                                transform=lambda im: im.shape)
        assert isinstance(ds, data.HFSegmentationDataset) and len(ds) == 3
        for item, ref in zip(ds, files):
            assert item["id"] == ref["id"]
            assert (item["image"] == ref["image"]).all(), "decoded with OpenCV like files"
            assert (item["label"] == ref["label"]).all() and 255 in item["label"]
            assert item["input"] == ref["image"].shape
    assert len(data.build_dataset(hf_section(tmp_path / "hf", streaming=True), None,
                                  limit=2)) == 2
    assert len(data.build_dataset(hf_section(tmp_path / "hf"), None, limit=1)) == 1


def test_hf_source_applies_the_label_rule_and_reports_errors(hf_voc):
    tmp_path, records = hf_voc
    section = hf_section(tmp_path / "hf")
    section.update({k: v for k, v in section_of("voc20").items()
                    if k not in ("source", "hf")})
    item = data.build_dataset(section, None)[0]
    assert (item["label"] == records[0]["raw_label"].astype(int) - 1)[
        (records[0]["raw_label"] > 0) & (records[0]["raw_label"] < 255)].all()
    assert (item["label"][records[0]["raw_label"] == 0] == 255).all()
    with pytest.raises(DataError, match="no split test"):
        data.build_dataset(hf_section(tmp_path / "hf", split="test"), None)
    with pytest.raises(DataError, match="no column label .*image_column"):
        data.build_dataset(hf_section(tmp_path / "hf", label_column="label"), None)
    with pytest.raises(DataError, match="needs dataset.hf.path"):
        data.build_dataset(hf_section(tmp_path / "hf", path=None), None)
    with pytest.raises(DataError, match="cannot load hf dataset"):
        data.build_dataset(hf_section(tmp_path / "nowhere"), None)
