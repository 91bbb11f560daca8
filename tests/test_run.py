"""End to end: `python -m sclip_lab.run` / `predict` / `learn` on synthetic benchmarks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, evaluate_in_process
from PIL import Image
from synthetic import write_benchmark

from sclip_lab.data import DataError
from sclip_lab.pipeline import ConfigError

BENCHMARKS = ["voc21", "context60", "coco_object", "voc20", "cityscapes", "context59",
              "ade20k", "coco_stuff"]


def record_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def test_run_writes_record_and_offline_wandb_and_is_deterministic(tiny, tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, "voc21", num_images=3, size=(120, 160))
    out1, out2 = tmp_path / "r1", tmp_path / "r2"
    args = [*tiny, f"data_root={root}", "limit=2", "attention=csa", "projection=random", "n=16"]
    p1 = cli("run", *args, f"hydra.run.dir={out1}", "save_overlays=1",
             "logger.num_overlays=1")
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert "mIoU" in p1.stdout
    rec = record_of(out1)
    assert rec["status"] == "finished" and rec["num_images"] == 2
    assert rec["summary"]["projection"] == "random" and rec["summary"]["n"] == 16
    assert rec["config"]["projection"]["n"] == 16
    # per-class IoU keyed by display name; the full query lines are stored once
    assert rec["classes"] == rec["config"]["dataset"]["classes"]
    assert list(rec["per_class_iou"]) == ["background"] + [
        c.split(", ")[0] for c in rec["classes"][1:]]
    import pandas as pd

    table = pd.read_csv(out1 / "per_class_iou.csv")
    assert list(table.columns) == ["class", "iou", "acc", "queries"]
    assert list(table["class"]) == list(rec["per_class_iou"])
    assert "per-class IoU" in p1.stderr + p1.stdout
    # the start banner names the variant fully and the weights by their digest; open_clip's
    # root-logger chatter (wrongly saying "initialized randomly") is gone
    log = p1.stderr + p1.stdout
    assert "variant     csa random n=16" in log and "[csa random n=16]" in log
    digest = hashlib.sha256(Path(tiny[2].split("=", 1)[1]).read_bytes()).hexdigest()
    assert f"(sha256 {digest[:12]})" in log and rec["model"]["weights_sha256"] == digest
    assert "[root]" not in log and "initialized randomly" not in log
    assert f"python -m sclip_lab.sync {out1}" in log  # how to upload the offline run
    assert rec["versions"]["torch"] and "git_commit" in rec
    assert {"setup_s", "eval_s"} <= set(rec["timings"])
    assert list((out1 / "wandb").glob("offline-run-*")), "an offline W&B run is written"
    assert len(list(out1.glob("overlay_000_*.png"))) == 1
    assert list(out1.glob("wandb/offline-run-*/files/media/images/predictions/000_*.png"))
    p2 = cli("run", *args, f"hydra.run.dir={out2}", "logger=none")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert record_of(out2)["metrics"] == rec["metrics"]
    assert record_of(out2)["key"] == rec["key"]
    assert not (out2 / "wandb").exists()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_end_to_end(name, tiny_inproc, tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, name, num_images=2, size=(64, 96))
    out = tmp_path / "run"
    (rec,) = evaluate_in_process([*tiny_inproc, f"dataset={name}", f"data_root={root}",
                                  "limit=2"], out)
    assert record_of(out) == json.loads(json.dumps(rec))
    assert rec["summary"]["dataset"] == name and rec["num_images"] == 2
    assert 0.0 <= rec["metrics"]["mIoU"] <= 100.0


@pytest.mark.e2e
def test_variants_share_a_pass_and_match_single_runs(tiny, tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, "context59", num_images=2, size=(64, 96))
    base = [*tiny, "dataset=context59", f"data_root={root}", "logger=none"]
    multi = tmp_path / "multi"
    proc = cli("run", *base, f"hydra.run.dir={multi}",
               "variants=['attention=vanilla','attention=early layer=2',"
               "'projection=random n=2 trial=1','attention=csa postprocess=pamr']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = sorted(p.parent.name for p in multi.rglob("result.json"))
    assert len(dirs) == 4, dirs
    single = tmp_path / "single"
    proc = cli("run", *base, f"hydra.run.dir={single}", "attention=early", "layer=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = record_of(multi / "attention-early-layer-2")
    assert shared["metrics"] == record_of(single)["metrics"]
    assert shared["key"] == record_of(single)["key"]


@pytest.mark.e2e
def test_resume_skips_finished_variants(tiny, tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, "voc20", num_images=1, size=(64, 64))
    args = [*tiny, "dataset=voc20", f"data_root={root}", "logger=none",
            f"resume_root={tmp_path}", "variants=['attention=vanilla','attention=maskclip']"]
    first = cli("run", *args, f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli("run", *args, f"hydra.run.dir={tmp_path / 'b'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout
    assert not list((tmp_path / "b").rglob("result.json"))


@pytest.mark.parametrize("overrides,message", [
    (["dataset=nope"], "dataset/nope"),
    (["projection=random", "n=0"], "n=0"),
])
def test_bad_overrides_fail_cleanly_on_the_cli(tiny, tmp_path, overrides, message):
    root = tmp_path / "data"
    write_benchmark(root, "voc21", num_images=1, size=(64, 64))
    out = tmp_path / "run"
    proc = cli("run", *tiny, f"data_root={root}", "logger=none", f"hydra.run.dir={out}",
               *overrides)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (out / "result.json").exists()


@pytest.mark.parametrize("overrides,message", [
    (["attention=nope"], "attention/nope"),
    (["projection=nope"], "projection/nope"),
    (["attention=local", "window=4"], "odd"),
    (["attention=early", "layer=99"], "layer=99"),
    (["attention=sharpen", "temperature=-1"], "temperature"),
    (["attention=vanilla", "projection=random"], "has no projection"),
    (["limit=0"], "limit=0"),
    (["images_per_batch=0"], "images_per_batch=0"),
    (["batch_size=0"], "batch_size=0"),
    (["preprocess.stride=300"], "stride ≤ the window"),
    (["preprocess.window=8", "preprocess.stride=8"], "smaller than one 16-pixel patch"),
    (["num_workers=-1"], "num_workers=-1"),
    (["num_threads=0"], "num_threads=0"),
    (["save_overlays=-2"], "save_overlays=-2"),
    (["precision=fp8"], "precision"),
    (["device=tpu"], "device"),
    (["postprocess=pamr", "postprocess.steps=0"], "steps ≥ 1"),
    # a good variant beside it is evaluated (test_faults: a broken variant fails alone)
    (["variants=['preprocess=mode1']"], "changes preprocess"),
])
def test_bad_overrides_are_refused(tiny_inproc, tmp_path, overrides, message):
    root = tmp_path / "data"
    write_benchmark(root, "voc21", num_images=1, size=(64, 64))
    out = tmp_path / "run"
    with pytest.raises(Exception, match=message):
        evaluate_in_process([*tiny_inproc, f"data_root={root}", *overrides], out)
    assert not list(out.rglob("result.json"))


def test_missing_data_fails_cleanly(tiny_inproc, tmp_path):
    with pytest.raises(DataError, match="sclip_lab.prepare voc21"):
        evaluate_in_process([*tiny_inproc, f"data_root={tmp_path / 'nowhere'}"], tmp_path / "r")
    assert not list(tmp_path.rglob("result.json"))


def test_bad_checkpoint_fails_cleanly_on_the_cli(tiny, tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, "voc21", num_images=1, size=(64, 64))
    bad = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2)}, bad)
    out = tmp_path / "run"
    proc = cli("run", *tiny, f"data_root={root}", f"model.pretrained={bad}", "logger=none",
               f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "not a CLIP checkpoint" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (out / "result.json").exists()


@pytest.mark.parametrize("defect,message", [("corrupt_image_for", "image"),
                                            ("bad_label_size_for", "but its image is")])
def test_broken_files_fail_cleanly(tiny_inproc, tmp_path, defect, message):
    root = tmp_path / "data"
    write_benchmark(root, "ade20k", num_images=2, size=(64, 64), **{defect: 1})
    out = tmp_path / "run"
    with pytest.raises(DataError, match=message):
        evaluate_in_process([*tiny_inproc, "dataset=ade20k", f"data_root={root}"], out)
    assert not list(out.rglob("result.json"))


@pytest.mark.e2e
def test_predict_dataset_vocabulary_and_free_classes(tiny, tmp_path):
    img = (np.random.default_rng(0).random((90, 130, 3)) * 255).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(img).save(path)
    pred, logits = tmp_path / "pred.png", tmp_path / "logits.npy"
    proc = cli("predict", *tiny, f"image={path}", f"output={pred}", f"logits={logits}",
               'classes=[cat, dog, "grass, lawn"]', f"hydra.run.dir={tmp_path / 'p'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Image.open(pred)
    assert out.mode == "P" and out.size == (130, 90)
    arr = np.load(logits)
    assert arr.dtype == np.float32 and arr.shape == (4, 90, 130)
    # the map is the argmax class of the saved logits (synonyms 2, 3 -> class 2)
    expect = np.array([0, 1, 2, 2])[arr.argmax(0)]
    assert (np.asarray(out) == expect).mean() > 0.999
    proc = cli("predict", *tiny, f"image={path}", f"output={pred}", "dataset=voc21",
               f"hydra.run.dir={tmp_path / 'q'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    proc = cli("predict", *tiny, f"image={bad}", f"output={pred}",
               f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "broken.jpg" in proc.stderr


@pytest.mark.e2e
def test_learned_projection_trains_then_evaluates(tiny, tiny_inproc, tmp_path):
    root = tmp_path / "data"
    items = write_benchmark(root, "voc21", num_images=3, size=(64, 96))
    split = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (split / "train.txt").write_text("".join(f"{it['id']}\n" for it in items))
    learn = [*tiny, f"data_root={root}", "logger=none", "steps=4", "images=2", "lr=0.01"]
    proc = cli("learn", *learn, f"hydra.run.dir={tmp_path / 'learn'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "learn" / "learn.json").read_text())
    assert len(info["losses"]) == 4 and all(np.isfinite(info["losses"]))
    artefact = Path(info["artefact"])
    assert artefact.is_file() and (tmp_path / "learn" / "projection.pt").is_file()
    # evaluation finds the matching artefact (same steps/lr/images/seed) without training
    base = [*tiny_inproc, f"data_root={root}", "limit=1", "projection=learned"]
    (rec,) = evaluate_in_process([*base, "projection.steps=4", "projection.images=2",
                                  "projection.lr=0.01", "projection.auto_train=false"],
                                 tmp_path / "eval")
    assert rec["summary"]["projection"] == "learned"
    # an explicit path works; a missing one, or no artefact with training off, fails clearly
    (rec2,) = evaluate_in_process([*base, f"projection.path={artefact}"], tmp_path / "e2")
    assert rec2["metrics"] == rec["metrics"]
    with pytest.raises(ConfigError, match="sclip_lab.learn"):
        evaluate_in_process([*base, f"projection.path={tmp_path / 'none.pt'}"], tmp_path / "e3")
    with pytest.raises(ConfigError, match="no learned projection"):
        evaluate_in_process([*base, "projection.steps=5", "projection.auto_train=false"],
                            tmp_path / "e4")
    assert not (tmp_path / "e4" / "result.json").exists()


def test_help_lists_commands_groups_and_knobs():
    proc = cli("run", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "python -m sclip_lab.predict" in out and "analysis/make_tables.py" in out
    assert "protocol: clearclip, naclip" in out and "attention.residual" in out
