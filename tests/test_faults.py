"""The fault suite: every bad input or fault ends in one clear line, and nothing is lost.

Each case runs an entry point in this process (as ``python -m`` would, with ``sys.argv``)
on the tiny random ViT and asserts the exit code, the one ``error:`` line and its content,
no traceback, and that no record is marked finished.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fill_disk
from synthetic import write_benchmark

from sclip_lab.errors import MAX_LINE


def _module(name: str):
    if name == "trunk_cache":  # a library room whose command line is its __main__
        return importlib.import_module("sclip_lab.trunk_cache.__main__")
    if name == "analysis.make_tables":  # a script: import it by path, as users run it
        if "make_tables" not in sys.modules:
            spec = importlib.util.spec_from_file_location("make_tables",
                                                          REPO / "analysis/make_tables.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules["make_tables"] = module
            spec.loader.exec_module(module)
        return sys.modules["make_tables"]
    return importlib.import_module(f"sclip_lab.{name}")


def invoke(module: str, argv: list[str]) -> int:
    """Run ``python -m sclip_lab.<module> argv`` in this process -> exit code."""
    mod = _module(module)
    old = sys.argv
    sys.argv = [module, *argv]
    try:
        code = mod.main(argv) if module in ("prepare", "sync", "analysis.make_tables",
                                            "trunk_cache") \
            else mod.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return 0 if code is None else int(code)


def finished_records(root: Path) -> list[Path]:
    return [p for p in root.rglob("result.json")
            if json.loads(p.read_text()).get("status") == "finished"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_config_file, tiny_checkpoint):
    """Benchmarks (good, corrupt image, bad label size), files and a shared text cache."""
    root = tmp_path_factory.mktemp("faults")
    good, corrupt, badsize = root / "good", root / "corrupt", root / "badsize"
    write_benchmark(good, "voc21", num_images=2, size=(64, 64))
    write_benchmark(corrupt, "voc21", num_images=3, size=(64, 64), corrupt_image_for=1)
    write_benchmark(badsize, "voc21", num_images=3, size=(64, 64), bad_label_size_for=2)
    a_file = root / "a_file.txt"
    a_file.write_text("not a directory")
    junk = root / "junk.pt"
    junk.write_bytes(b"\x00\x01 not a checkpoint")
    # a pickle that weights_only refuses (torch's explanation of it runs to ~700 characters)
    import argparse

    pickled = root / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, pickled)
    image = next((good / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg"))
    model = ["model.arch=sclip-tiny-vit", f"model.config_file={tiny_config_file}",
             f"model.pretrained={tiny_checkpoint}", f"cache_dir={root / 'cache'}"]
    return {"root": root, "good": good, "corrupt": corrupt, "badsize": badsize,
            "file": a_file, "junk": junk, "image": image, "model": model, "pickled": pickled}


def _fill(arg: str, w: dict) -> str:
    return (arg.replace("{file}", str(w["file"])).replace("{junk}", str(w["junk"]))
            .replace("{pickled}", str(w["pickled"]))
            .replace("{image}", str(w["image"])).replace("{root}", str(w["root"]))
            .replace("{corrupt}", str(w["corrupt"])).replace("{badsize}", str(w["badsize"])))


RUN = "run"
# (id, entry, overrides, expected exit code, expected substring of the error line)
CASES = [
    # Hydra's own errors: unknown options and keys, syntax, unusable run directories.
    ("unknown-dataset", RUN, ["dataset=nope"], 2,
     "available options in 'dataset': ade20k, cityscapes, coco_object"),
    ("unknown-attention", RUN, ["attention=nope"], 2, "attention/nope"),
    ("unknown-key", RUN, ["notakey=1"], 2, "notakey"),
    # misspelt names: the closest group, option, key or knob
    ("typo-group", RUN, ["atention=csa"], 2, "atention is not a config group or key; did you "
     "mean attention=csa?"),
    ("typo-option", RUN, ["attention=csaa"], 2, "unknown attention=csaa (no conf/attention/"
     "csaa.yaml); did you mean attention=csa? available options in 'attention': clearclip"),
    ("typo-top-knob", RUN, ["kernal=5"], 2, "did you mean kernel=5?"),
    ("typo-knob", RUN, ["attention=local", "attention.kernal=5"], 2,
     "attention=local has no knob 'kernal'; its knobs: kernel"),
    ("typo-knob-hint", RUN, ["attention=local", "attention.kernal=5"], 2,
     "; did you mean attention.kernel?"),
    ("typo-variant", RUN, ["variants=[csaa]"], 2, "[csaa] variant 'csaa': unknown "
     "attention=csaa (no conf/attention/csaa.yaml); did you mean attention=csa?"),
    ("override-syntax", RUN, ["limit=[1"], 2, "limit=[1"),
    ("run-dir-under-file", RUN, ["hydra.run.dir={file}/run"], 2,
     "cannot create the run directory"),
    ("run-dir-is-file", RUN, ["hydra.run.dir={file}"], 2, "cannot create the run directory"),
    # Numbers: types, ranges, non-finite values, anywhere they are configured.
    ("limit-type", RUN, ["limit=abc"], 2, "limit=abc must be an integer"),
    ("limit-zero", RUN, ["limit=0"], 2, "limit=0"),
    ("temperature-nan", RUN, ["temperature=nan"], 2, "temperature=nan is not a finite number"),
    ("temperature-inf", RUN, ["temperature=inf"], 2, "temperature=inf is not a finite"),
    ("sigma-neg-inf", RUN, ["attention=naclip", "sigma=-inf"], 2, "sigma=-inf"),
    ("dataset-logit-scale-nan", RUN, ["dataset.logit_scale=nan"], 2, "logit_scale=nan"),
    ("n-type", RUN, ["projection=random", "n=abc"], 2, "n=abc must be an integer"),
    ("n-zero", RUN, ["projection=random", "n=0"], 2, "n=0"),
    ("local-even-window", RUN, ["attention=local", "window=4"], 2, "odd integer"),
    ("early-layer-range", RUN, ["attention=early", "layer=99"], 2, "layer=99"),
    ("temperature-type", RUN, ["temperature=hot"], 2, "temperature=hot must be a finite"),
    ("batch-size", RUN, ["batch_size=0"], 2, "batch_size=0"),
    ("num-workers", RUN, ["num_workers=-1"], 2, "num_workers=-1"),
    ("images-per-batch-type", RUN, ["images_per_batch=x"], 2, "images_per_batch=x"),
    ("seed-float", RUN, ["seed=1.5"], 2, "seed=1.5 must be an integer"),
    ("stride-over-window", RUN, ["preprocess.stride=300"], 2, "preprocess.stride=300"),
    ("crop-type", RUN, ["preprocess.window=abc"], 2, "preprocess.window=abc"),
    ("precision", RUN, ["precision=fp8"], 2, "precision='fp8'"),
    ("device", RUN, ["device=tpu"], 2, "device='tpu'"),
    ("logger-mode", RUN, ["logger=wandb", "logger.mode=sometimes"], 2, "logger.mode"),
    ("logger-timeout", RUN, ["logger=wandb", "logger.init_timeout=0"], 2,
     "logger.init_timeout=0"),
    ("templates", RUN, ["text.templates=nope"], 2, "text.templates='nope'"),
    ("unknown-knob", RUN, ["attention=sharpen", "+attention.kernel=3"], 2,
     "attention=sharpen has no knob 'kernel'; its knobs: temperature"),
    ("knob-not-in-file", RUN, ["attention=sharpen", "attention.kernel=3"], 2,
     "attention=sharpen has no knob 'kernel'; its knobs: temperature"),
    ("recipe-term", RUN, ["attention=recipe", "attention.scores=[qq,xx]"], 2,
     "unknown term 'xx'"),
    ("recipe-empty", RUN, ["attention=recipe", "attention.scores=[]"], 2, "scores=[] is empty"),
    ("alpha-zero", RUN, ["attention.alpha=0"], 2, "attention.alpha=0 is out of range"),
    ("alpha-nan", RUN, ["attention.alpha=nan"], 2, "attention.alpha=nan is not a finite"),
    # knobs are checked before the model is loaded (here: missing weights come second)
    ("knob-before-model", RUN, ["attention.alpha=0", "model.pretrained={root}/none.pt"], 2,
     "attention.alpha=0 is out of range"),
    ("residual-type", RUN, ["attention.residual=perhaps"], 2, "is not true/false"),
    ("protocol-unknown", RUN, ["protocol=nope"], 2, "available options in 'protocol': "
     "clearclip, naclip, pearl, proxyclip, resclip, scclip, sclip, sfp"),
    # ProxyCLIP: its proxy backbone and knobs.
    ("proxy-missing", RUN, ["attention=proxy"], 2, "attention=proxy needs a proxy backbone"),
    ("proxy-unknown", RUN, ["proxy=nope"], 2, "available options in 'proxy'"),
    ("proxy-no-weights", RUN, ["attention=proxy", "proxy=dino_vitb8"], 2,
     "proxy=dino_vitb8 needs weights: add proxy.pretrained="),
    ("proxy-file-missing", RUN, ["attention=proxy", "proxy=dino_vitb8",
                                 "proxy.pretrained={root}/none.pth"], 2, "does not exist"),
    ("proxy-file-corrupt", RUN, ["attention=proxy", "proxy=dino_vitb8",
                                 "proxy.pretrained={junk}"], 2, "not a readable checkpoint"),
    ("proxy-gamma-zero", RUN, ["attention=proxy", "proxy=clip_self", "proxy.layer=2",
                               "attention.gamma=0"], 2, "attention.gamma=0 is out of range"),
    ("proxy-beta-inf", RUN, ["attention=proxy", "proxy=clip_self", "proxy.layer=2",
                             "attention.beta=inf"], 2, "attention.beta=inf is not a finite"),
    ("proxy-layer-deep", RUN, ["attention=proxy", "proxy=clip_self", "proxy.layer=4"], 2,
     "proxy.layer=4 is impossible for proxy=clip_self"),
    ("pamr-steps", RUN, ["postprocess=pamr", "postprocess.steps=abc"], 2, "postprocess.steps"),
    # Paths: files where folders belong, missing data and weights.
    ("cache-dir-is-file", RUN, ["cache_dir={file}"], 2, "cache_dir {file} is a file"),
    ("cache-dir-under-file", RUN, ["cache_dir={file}/c"], 2, "lies under the file"),
    ("trunk-cache-is-file", RUN, ["trunk_cache={file}"], 2, "trunk_cache {file} is a file"),
    ("trunk-cache-under-file", RUN, ["trunk_cache={file}/c"], 2, "lies under the file"),
    ("trunk-cache-dtype", RUN, ["trunk_cache_dtype=bf16"], 2,
     "trunk_cache_dtype=bf16 is not one of fp32|fp16"),
    # a folder of other files is refused before the model loads (the junk weights never do)
    ("trunk-cache-foreign-folder", RUN, ["trunk_cache={root}/good", "model.pretrained={junk}"],
     2, "trunk_cache={root}/good is a folder of other files (VOCdevkit), not a trunk cache"),
    ("trunk-cache-foreign-folder-predict", "predict", ["image={image}", "output={root}/p.png",
                                                       "trunk_cache={root}/good"], 2,
     "give an empty or new folder, e.g. trunk_cache={root}/good/trunk_cache"),
    ("data-root-is-file", RUN, ["data_root={file}"], 2, "data_root {file} is a file"),
    ("data-root-missing", RUN, ["data_root={root}/nothing"], 2,
     "python -m sclip_lab.prepare voc21"),
    ("resume-root-is-file", RUN, ["resume_root={file}"], 2, "resume_root={file} is a file"),
    ("weights-missing", RUN, ["model.pretrained={root}/none.pt"], 2, "does not exist"),
    ("weights-corrupt", RUN, ["model.pretrained={junk}"], 2, "not a readable checkpoint"),
    ("weights-unsafe-pickle", RUN, ["model.pretrained={pickled}"], 2,
     "not a readable checkpoint (UnpicklingError: Weights only load failed"),
    ("learned-missing", RUN, ["projection=learned", "projection.path={root}/none.pt"], 2,
     "does not exist; train it"),
    ("learned-corrupt", RUN, ["projection=learned", "projection.path={junk}"], 2,
     "not a learned-projection artefact"),
    # Errors inside DataLoader workers come back as their own line.
    ("worker-corrupt-image", RUN, ["data_root={corrupt}", "num_workers=2"], 2,
     "cannot decode image"),
    ("worker-label-size", RUN, ["data_root={badsize}", "num_workers=2"], 2,
     "but its image is 64×64"),
    # predict
    ("predict-no-image", "predict", ["output={root}/p.png"], 2, "image is required"),
    ("predict-image-missing", "predict", ["image={root}/none.jpg", "output={root}/p.png"], 2,
     "cannot read image"),
    ("predict-image-corrupt", "predict", ["image={junk}", "output={root}/p.png"], 2,
     "cannot decode image"),
    ("predict-output-suffix", "predict", ["image={image}", "output={root}/p.jpg"], 2,
     "must be a .png file"),
    ("predict-output-under-file", "predict", ["image={image}", "output={file}/p.png"], 2,
     "output={file}/p.png: its folder {file} is a file"),
    ("predict-empty-classes", "predict", ["image={image}", "output={root}/p.png",
                                          "classes=[]"], 2, "classes=[] is empty"),
    ("predict-logit-scale-inf", "predict", ["image={image}", "output={root}/p.png",
                                            "classes=[cat,dog]", "logit_scale=inf"], 2,
     "logit_scale=inf is not a finite number"),
    ("predict-palette-limit", "predict", ["image={image}", "output={root}/p.png",
                                          f"classes=[{','.join(f'c{i}' for i in range(257))}]"],
     2, "257 classes do not fit output={root}/p.png: a palette PNG holds at most 256"),
    # visualize
    ("visualize-no-image", "visualize", [], 2, "image is required"),
    ("visualize-points", "visualize", ["image={image}", "points=[[1]]"], 2,
     "not an [x, y] pair"),
    ("visualize-size-type", "visualize", ["image={image}", "points=[[1,1]]", "size=abc"], 2,
     "size=abc must be an integer"),
    ("visualize-output-file", "visualize", ["image={image}", "points=[[1,1]]",
                                            "output={file}"], 2, "output {file} is a file"),
    # learn
    ("learn-steps-type", "learn", ["steps=abc"], 2, "projection.steps=abc"),
    ("learn-cache-under-file", "learn", ["cache_dir={file}/c"], 2, "lies under the file"),
    ("learn-no-train-split", "learn", [], 2, "prepare voc21 data_root={root}/good train=true"),
    # prepare, make_tables, sync (argparse entry points)
    ("prepare-unknown", "prepare", ["nope"], 2, "unknown benchmark 'nope'"),
    ("prepare-option", "prepare", ["voc21", "colour=red"], 2, "unknown option colour="),
    ("prepare-root-is-file", "prepare", ["voc21", "data_root={file}"], 2,
     "data_root {file} is a file"),
    ("tables-root-missing", "analysis.make_tables", ["--root", "{root}/none"], 2,
     "is not a directory"),
    ("tables-out-is-file", "analysis.make_tables", ["--root", "{root}", "--out", "{file}"], 2,
     "--out {file} is a file"),
    ("tables-bad-number", "analysis.make_tables", ["--tables", "9"], 2,
     "no table '9'; tables are 1, 2"),
    ("sync-root-missing", "sync", ["{root}/none"], 2, "no such folder"),
    ("trunk-cache-cli-missing", "trunk_cache", ["info", "{root}/none"], 2,
     "no trunk cache at {root}/none"),
    ("trunk-cache-cli-not-a-cache", "trunk_cache", ["clear", "{root}/good"], 2,
     "{root}/good is not a trunk cache"),
]


@pytest.mark.parametrize("entry,overrides,code,message",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fault(world, tmp_path, capsys, monkeypatch, entry, overrides, code, message):
    monkeypatch.chdir(tmp_path)  # anything written by accident lands here, not in the repo
    argv = [_fill(o, world) for o in overrides]
    if entry in ("run", "predict", "visualize", "learn"):
        base = [*world["model"], f"data_root={world['good']}", "num_workers=0",
                "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
        argv = base + argv  # later overrides win
    assert invoke(entry, argv) == code
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err[-2000:]
    assert _fill(message, world) in errors[0], errors[0]
    assert len(errors[0]) <= len("error: ") + MAX_LINE, errors[0]  # the library's text: --verbose
    assert "Traceback" not in captured.err + captured.out
    assert not finished_records(tmp_path)


def test_the_suite_is_broad():
    entries = {c[1] for c in CASES}
    assert len(CASES) >= 40
    assert entries == {"run", "predict", "visualize", "learn", "prepare",
                       "analysis.make_tables", "sync", "trunk_cache"}


# ---------------------------------------------------------------- no result is ever lost


def _run_argv(world, tmp_path, *extra):
    return [*world["model"], f"data_root={world['good']}", "num_workers=0",
            f"hydra.run.dir={tmp_path / 'run'}", *extra]


@pytest.mark.parametrize("broken", ["init", "log", "finish"])
def test_wandb_failures_keep_the_record(world, tmp_path, capsys, monkeypatch, broken):
    import wandb

    monkeypatch.chdir(tmp_path)

    def fail(*a, **k):
        raise wandb.errors.CommError("simulated: no network")

    if broken == "init":
        monkeypatch.setattr(wandb, "init", fail)
    else:
        real_init = wandb.init

        def init(*a, **k):
            run = real_init(*a, **k)
            monkeypatch.setattr(run, "log" if broken == "log" else "finish", fail)
            return run

        monkeypatch.setattr(wandb, "init", init)
    assert invoke("run", _run_argv(world, tmp_path, "logger=wandb")) == 0
    records = finished_records(tmp_path)
    assert len(records) == 1
    out = capsys.readouterr()
    warnings = [line for line in (out.out + out.err).splitlines() if "W&B:" in line]
    assert len(warnings) == 1 and "simulated: no network" in warnings[0], warnings
    assert "Traceback" not in out.err + out.out


def test_online_without_credentials_logs_offline(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = _run_argv(world, tmp_path, "logger=wandb", "logger.mode=online")
    assert invoke("run", argv) == 0
    assert len(finished_records(tmp_path)) == 1
    assert "W&B has no credentials: logging offline" in capsys.readouterr().out
    assert list((tmp_path / "run").rglob("offline-run-*"))


def test_online_init_that_fails_falls_back_offline(world, tmp_path, monkeypatch, capsys):
    """A key but no network: the online start fails (here at once), the run goes offline."""
    import wandb

    monkeypatch.chdir(tmp_path)
    real_init = wandb.init

    def init(*a, mode=None, **k):
        if mode == "online":
            raise wandb.errors.CommError("simulated: timed out")
        return real_init(*a, mode=mode, **k)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert invoke("run", _run_argv(world, tmp_path, "logger=wandb")) == 0
    assert len(finished_records(tmp_path)) == 1
    assert "logging offline instead" in capsys.readouterr().out
    assert list((tmp_path / "run").rglob("offline-run-*"))


def test_nan_metric_records_are_strict_json(tmp_path):
    from sclip_lab.files import write_json_atomic

    write_json_atomic(tmp_path / "r.json", {"mIoU": float("nan"), "x": [float("inf"), 1.0],
                                            "t": torch.tensor([float("nan"), 2.0])})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"mIoU": None, "x": [None, 1.0], "t": [None, 2.0]}
    assert (tmp_path / "r.json").stat().st_mode & 0o044  # readable by the group/others


# -------------------------------------------------------------------------- caches heal


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other-vocabulary", "wrong-dtype",
                                    "legacy-tensor"])
def test_broken_text_cache_is_recomputed(tiny_model, tmp_path, caplog, damage):
    from sclip_lab.text import classifier

    names = ["cat", "dog", "grass"]
    fresh = classifier(tiny_model, "sclip-tiny-vit", names, "single", torch.device("cpu"),
                       tmp_path)
    (path,) = tmp_path.glob("text-*.pt")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(b"garbage")
    elif damage == "other-vocabulary":
        torch.save({"names": ["cat", "dog", "sky"], "embeddings": fresh}, path)
    elif damage == "wrong-dtype":
        torch.save({"names": names, "embeddings": fresh.half()}, path)
    else:
        torch.save(fresh, path)
    again = classifier(tiny_model, "sclip-tiny-vit", names, "single", torch.device("cpu"),
                       tmp_path)
    assert torch.equal(again, fresh)
    assert sum("recomputing the broken text cache" in r.getMessage()
               for r in caplog.records) == 1
    caplog.clear()
    # Replaced: the third call reads the healed entry without a warning.
    third = classifier(tiny_model, "sclip-tiny-vit", names, "single", torch.device("cpu"),
                       tmp_path)
    assert torch.equal(third, fresh) and not caplog.records
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left over


def test_broken_learned_cache_is_dropped_and_reported(tmp_path, caplog):
    from hydra import compose, initialize_config_dir

    from sclip_lab.config import CONF_DIR
    from sclip_lab.errors import ConfigError
    from sclip_lab.learned import artefact_path, learned_projection

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=["projection=learned", f"cache_dir={tmp_path}",
                                        "projection.auto_train=false"])
    path = artefact_path(cfg)
    path.parent.mkdir(parents=True)
    torch.save({"weight": torch.full((4, 3), float("nan"))}, path)
    with pytest.raises(ConfigError, match="python -m sclip_lab.learn"):
        learned_projection(cfg)
    assert any("dropping the broken cached projection" in r.getMessage()
               for r in caplog.records)
    assert not path.exists()
    torch.save({"weight": torch.eye(4), "bias": torch.zeros(4)}, path)
    weight, bias = learned_projection(cfg)
    assert torch.equal(weight, torch.eye(4)) and torch.equal(bias, torch.zeros(4))


# ---------------------------------------------------------------------- sweeps and warnings


def test_sweep_with_a_failed_job_exits_nonzero(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    argv = ["-m", *world["model"], f"data_root={world['good']}", "num_workers=0",
            "logger=none", "dataset=voc21,context59", f"hydra.sweep.dir={sweep}"]
    assert invoke("run", argv) == 1
    err = capsys.readouterr().err
    assert "1 job(s)/variant(s) of this sweep failed" in err
    assert str(sweep / "1") in err and "context59" in err
    assert (sweep / "1" / "failed.json").is_file() and len(finished_records(sweep)) == 1


def test_suspicious_input_warns(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = _run_argv(world, tmp_path, "logger=none", "limit=50", "preprocess.short_side=100",
                     "preprocess.window=224", "preprocess.stride=112")
    assert invoke("run", argv) == 0
    text = capsys.readouterr().out
    assert "limit=50 is larger than the voc21 split (2 images)" in text
    assert "preprocess.window=224 is larger than the resized short side 100" in text
    out = tmp_path / "p.png"
    assert invoke("predict", [*world["model"], f"image={world['image']}", f"output={out}",
                              "classes=[cat, dog, cat]", "hydra.run.dir=" + str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "classes= lists cat more than once" in text
    assert "lists the class cat more than once" in text


def test_prepare_reports_a_broken_tree_before_downloading(tmp_path, capsys, monkeypatch):
    from sclip_lab import prepare
    from sclip_lab.data import DataError

    def offline(url, *a, **k):
        raise DataError(f"cannot reach {url} (offline)")

    monkeypatch.setattr(prepare, "download", offline)
    write_benchmark(tmp_path, "voc21", num_images=2, bad_label_size_for=0)
    # After the report, fetching fails, and nothing is marked ready.
    code = prepare.main(["voc21", f"data_root={tmp_path}", f"from={tmp_path / 'none'}"])
    out = capsys.readouterr()
    assert "found: voc21 val" in out.out and "problem" in out.out
    assert out.out.index("found: voc21 val") < out.out.index("preparing under")
    assert code == 2 and len([x for x in out.err.splitlines() if x.startswith("error:")]) == 1
    assert not list(tmp_path.rglob(".sclip_ready.*"))


def test_worker_error_message_is_unwrapped():
    from sclip_lab.data import DataError
    from sclip_lab.errors import message_of

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1, in f\n"
                        "sclip_lab.data.DataError: cannot decode image a.jpg; re-prepare\n")
    assert message_of(wrapped) == "cannot decode image a.jpg; re-prepare"


def test_a_bug_keeps_its_traceback(world, tmp_path, monkeypatch):
    """Only user errors become one line: a bug inside the lab propagates (exit 1 with its
    traceback on the command line) instead of being disguised as bad input."""
    from sclip_lab import segment

    monkeypatch.chdir(tmp_path)

    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(segment, "predict_classes", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        invoke("run", _run_argv(world, tmp_path, "logger=none"))
    assert not finished_records(tmp_path)


def test_sync_lists_only_offline_runs_not_yet_uploaded(tmp_path, capsys, monkeypatch):
    from sclip_lab import sync

    pending = tmp_path / "outputs/voc21/csa/t1/wandb/offline-run-20261130_000000-aaaa"
    done = tmp_path / "multirun/table2/x/wandb/offline-run-20261130_000001-bbbb"
    for run in (pending, done):
        run.mkdir(parents=True)
    (done / "run-bbbb.wandb.synced").write_text("")
    assert sync.pending_runs([tmp_path / "outputs", tmp_path / "multirun"]) == [pending]
    assert invoke("sync", [str(tmp_path / "outputs"), str(tmp_path / "multirun"),
                           "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 offline W&B run(s) not yet uploaded" in out and str(pending) in out
    # Without credentials nothing is attempted: one line saying how to log in.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert invoke("sync", [str(tmp_path / "outputs")]) == 2
    assert "wandb login" in capsys.readouterr().err


# ------------------------------------------------ the trunk cache never costs a result


def _trunk_cache_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "trunk cache: cannot write" in line]


@pytest.mark.parametrize("space", ["some", "none"])
def test_a_full_disk_under_the_trunk_cache_costs_no_result(tiny_inproc, tmp_path, small_fs,
                                                          caplog, space):
    """On a real 1200 KiB filesystem the marker, the manifest and one image's 0.8 MB entry
    fit, not two ("some"); filled up first, not even the marker ("none"). Either way the
    runs finish with the uncached metrics and one warning each, and the next run reads what
    was stored."""
    from conftest import evaluate_in_process

    data = tmp_path / "data"
    write_benchmark(data, "voc21", num_images=3, size=(64, 96))
    base = [*tiny_inproc, f"data_root={data}"]
    (plain,) = evaluate_in_process(base, tmp_path / "plain")
    fs = small_fs(1200)
    if space == "none":
        fill_disk(fs)
    cache = fs / "trunks"
    for i, hits in enumerate((0, 1) if space == "some" else (0, 0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sclip_lab"):
            (rec,) = evaluate_in_process([*base, f"trunk_cache={cache}"], tmp_path / f"run{i}")
        assert len(_trunk_cache_warnings(caplog.text)) == 1, caplog.text
        assert "No space left on device" in caplog.text
        assert rec["status"] == "finished" and rec["metrics"] == plain["metrics"]
        assert rec["per_class_iou"] == plain["per_class_iou"]
        assert rec["timings"]["trunk_cache_hits"] == hits
    stored = list(cache.rglob("*.safetensors"))
    assert len(stored) == (space == "some") and not [p for p in stored if p.name[0] == "."]


def test_a_full_disk_under_the_trunk_cache_from_the_command_line(tiny, tmp_path, small_fs):
    from conftest import cli, evaluate_in_process

    data = tmp_path / "data"
    write_benchmark(data, "voc21", num_images=3, size=(64, 96))
    base = [*tiny, "logger=none", f"data_root={data}"]
    (plain,) = evaluate_in_process(base, tmp_path / "plain")
    cache = small_fs(1200) / "trunks"
    done = cli("run", *base, f"trunk_cache={cache}", f"hydra.run.dir={tmp_path / 'cli'}")
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert len(_trunk_cache_warnings(out)) == 1, out[-3000:]
    (record,) = finished_records(tmp_path / "cli")
    assert json.loads(record.read_text())["metrics"] == plain["metrics"]


# ------------------------------------------- a broken variant never costs the good ones


def _no_temp_files(root: Path) -> list[Path]:
    """Files a crash could leave half-written: atomic temporaries and figure parts."""
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".filler")
            and (p.name.endswith(".part") or (p.name.startswith(".") and "-" in p.name))]


VARIANT_CASES = {  # id -> (variants, the broken entry, what its failed.json says)
    "first-knob": (['local kernel=4', "csa", "sharpen temperature=2"], "local kernel=4",
                   "kernel=4 is out of range"),
    "middle-option": (["csa", "attention=nosuch", "sharpen temperature=2"], "attention=nosuch",
                      "nosuch"),
    "last-shared-key": (["csa", "sharpen temperature=2", "csa dataset=context59"],
                        "csa dataset=context59", "changes dataset"),
}


def _variants_override(entries: list[str]) -> str:
    return "variants=[" + ",".join(f"'{e}'" for e in entries) + "]"


@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_a_broken_variant_fails_alone(world, tmp_path, capsys, monkeypatch, case):
    entries, broken, why = VARIANT_CASES[case]
    monkeypatch.chdir(tmp_path)
    argv = _run_argv(world, tmp_path, "logger=none", _variants_override(entries))
    assert invoke("run", argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"1 of 3 variants failed: [{broken}]" in errors[0], err[-2000:]
    assert "Traceback" not in err
    records = finished_records(tmp_path / "run")
    assert len(records) == 2  # the good ones, evaluated in one pass and recorded
    failed = sorted((tmp_path / "run").rglob("failed.json"))
    assert len(failed) == 1 and why in json.loads(failed[0].read_text())["error"]


def test_every_variant_broken_is_one_user_error(world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = _run_argv(world, tmp_path, "logger=none",
                     _variants_override(["local kernel=4", "sharpen temperature=-1"]))
    assert invoke("run", argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "every variant is broken" in errors[0], err[-2000:]
    assert not finished_records(tmp_path)


def test_a_broken_variant_in_a_sweep_job(world, tmp_path, capsys, monkeypatch):
    """The sweep's other job and the job's good variants finish; the sweep exits 1 and
    lists the broken variant's failed.json."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    argv = ["-m", *world["model"], f"data_root={world['good']}", "num_workers=0",
            "logger=none", "seed=0,1", f"hydra.sweep.dir={sweep}",
            _variants_override(["local kernel=4", "csa"])]
    assert invoke("run", argv) == 1
    err = capsys.readouterr().err
    assert "2 job(s)/variant(s) of this sweep failed" in err and "kernel=4" in err, err[-2000:]
    assert len(finished_records(sweep)) == 2
    assert sorted(p.parent.parent.name for p in sweep.rglob("failed.json")) == ["0", "1"]


# ------------------------------------------------------- full disks and the record


def test_a_record_that_cannot_be_written_is_one_error(world, tmp_path, capsys, monkeypatch,
                                                      small_fs):
    """The disk fills while the metrics are computed: one error line, exit 2, no record
    and no temporary left, no logging traceback from the run's log file."""
    import sclip_lab.run as run

    monkeypatch.chdir(tmp_path)
    disk = small_fs(256)
    real = run.build_record

    def build_then_fill(*args, **kwargs):
        fill_disk(disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "build_record", build_then_fill)
    argv = [*world["model"], f"data_root={world['good']}", "num_workers=0", "logger=none",
            f"hydra.run.dir={disk / 'run'}", "save_overlays=1"]
    assert invoke("run", argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot write the record in" in errors[0], err[-2000:]
    assert "free space" in errors[0] and "No space left on device" in errors[0]
    assert "Traceback" not in err and "Logging error" not in err
    assert not list(disk.rglob("result.json")) and not _no_temp_files(disk)


def test_figures_that_cannot_be_written_keep_the_record(world, tmp_path, capsys, monkeypatch,
                                                        small_fs):
    """The record is written before the per-class table and the overlays: a disk that
    is full after it costs one warning, and the run succeeds."""
    import sclip_lab.run as run

    monkeypatch.chdir(tmp_path)
    disk = small_fs(256)
    real = run.save_record

    def save_then_fill(*args, **kwargs):
        path = real(*args, **kwargs)
        fill_disk(disk)
        return path

    monkeypatch.setattr(run, "save_record", save_then_fill)
    argv = [*world["model"], f"data_root={world['good']}", "num_workers=0", "logger=none",
            f"hydra.run.dir={disk / 'run'}", "save_overlays=2"]
    assert invoke("run", argv) == 0
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert err.count("could not write") == 1 and "the record is complete" in err, err[-2000:]
    assert "Traceback" not in err and "Logging error" not in err
    (record,) = finished_records(disk)
    assert json.loads(record.read_text())["metrics"]["mIoU"] >= 0
    assert not list(disk.rglob("overlay_*")) and not _no_temp_files(disk)


def test_a_record_on_a_full_disk_in_process(tiny_inproc, tmp_path, small_fs):
    from conftest import evaluate_in_process

    from sclip_lab.errors import UserError

    data = tmp_path / "data"
    write_benchmark(data, "voc21", num_images=1, size=(64, 64))
    disk = small_fs(128)
    (disk / "run").mkdir()
    fill_disk(disk)
    with pytest.raises(UserError, match="cannot write the record in .*free space"):
        evaluate_in_process([*tiny_inproc, f"data_root={data}"], disk / "run")
    assert not list(disk.rglob("result.json")) and not _no_temp_files(disk)


# ------------------------------------------------------------------------- interrupts


@pytest.fixture(scope="module")
def slow_world(tmp_path_factory, world):
    """40 images, enough that a run is still in its loop when the signal comes."""
    root = tmp_path_factory.mktemp("slow")
    write_benchmark(root, "voc21", num_images=40, size=(256, 320))
    return root


def _interrupt(world, slow_world, tmp_path, signum, *extra) -> tuple[int, str]:
    """Start ``run``, wait for its progress bar, send ``signum`` to its process group (as a
    terminal's Ctrl-C does, DataLoader workers included) -> (exit code, stderr)."""
    import os
    import subprocess
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sclip_lab.run", *extra, *world["model"],
         f"data_root={slow_world}", "logger=none"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = ""
    deadline = time.time() + 300
    while not re.search(r"\b[1-9]\d*/40\b", seen) and time.time() < deadline:
        char = proc.stderr.read(1)
        if not char:
            break
        seen += char
    assert proc.poll() is None, f"the run ended before the signal: {seen[-3000:]}"
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, seen + err + out


@pytest.mark.e2e
@pytest.mark.parametrize("signame,workers,code", [("SIGINT", 2, 130), ("SIGTERM", 0, 143)])
def test_an_interrupted_run_ends_in_one_line(world, slow_world, tmp_path, signame, workers,
                                             code):
    import signal

    run_dir = tmp_path / "run"
    rc, log = _interrupt(world, slow_world, tmp_path, getattr(signal, signame),
                         f"num_workers={workers}", f"hydra.run.dir={run_dir}",
                         f"trunk_cache={tmp_path / 'trunks'}")
    assert rc == code, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and " of 40 images; nothing recorded" in lines[0], log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert not list(run_dir.rglob("result.json")) and not _no_temp_files(tmp_path)


@pytest.mark.e2e
def test_an_interrupted_sweep_ends_in_one_line(world, slow_world, tmp_path):
    import signal

    sweep = tmp_path / "sweep"
    rc, log = _interrupt(world, slow_world, tmp_path, signal.SIGINT, "-m", "seed=0,1",
                         "num_workers=0", f"hydra.sweep.dir={sweep}")
    assert rc == 130, log[-3000:]
    assert sum(line.startswith("interrupted: ") for line in log.splitlines()) == 1
    assert "Traceback" not in log and not list(sweep.rglob("result.json"))
    assert not list(sweep.rglob("failed.json"))  # an interrupt is not a failed job


# ------------------------------------------- predict: any size, any vocabulary, no waste


def test_predict_refuses_a_vocabulary_beyond_the_palette_before_the_model(
        world, tmp_path, capsys, monkeypatch):
    """257 classes cannot be a palette PNG: refused before the image, model or text
    encoder are touched (it used to compute, then fail in the PNG writer)."""
    from sclip_lab import predict

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the palette check")

    monkeypatch.setattr(predict, "segmenter_from_config", loaded)
    monkeypatch.setattr(predict.data, "read_image", loaded)
    classes = "[" + ",".join(f"c{i}" for i in range(300)) + "]"
    out = tmp_path / "p.png"
    assert invoke("predict", [*world["model"], f"image={world['image']}", f"output={out}",
                              f"classes={classes}", f"hydra.run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "error: 300 classes do not fit" in err and "at most 256" in err
    assert not out.exists()


def test_predict_never_builds_full_size_logits_unless_asked(world, tmp_path, monkeypatch):
    """Without ``logits=`` the prediction is stitched and reduced in row blocks (here
    forced to several): the full-size stitch never runs, and the PNG equals the one of the
    full-size path that ``logits=`` takes."""
    import numpy as np
    from PIL import Image

    from sclip_lab import segment

    base = [*world["model"], f"image={world['image']}", "classes=[cat, dog, 'grass, lawn']",
            f"hydra.run.dir={tmp_path}"]
    full, blocked = tmp_path / "full.png", tmp_path / "blocked.png"
    assert invoke("predict", [*base, f"output={full}", f"logits={tmp_path / 'l.npy'}"]) == 0
    monkeypatch.setattr(segment, "CHUNK_ELEMENTS", 4 * 64 * 5)
    monkeypatch.setattr(segment, "STITCH_ELEMENTS", 4 * 64 * 20)

    def full_size(*a, **k):
        raise AssertionError("predict built the full-size logits")

    monkeypatch.setattr(segment, "stitch_windows", full_size)
    assert invoke("predict", [*base, f"output={blocked}"]) == 0
    assert np.array_equal(np.asarray(Image.open(blocked)), np.asarray(Image.open(full)))


# ------------------------------------------- prepare on a full disk (a real small tmpfs)


def test_prepare_on_a_full_disk_is_one_line_and_keeps_the_archive(small_fs, tmp_path, capsys):
    from test_prepare import large_cityscapes_zips

    zips = tmp_path / "zips"
    images = large_cityscapes_zips(zips)
    root = small_fs(256) / "data"
    assert invoke("prepare", ["cityscapes", f"data_root={root}", f"from={zips}"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) <= MAX_LINE, captured.err[-2000:]
    assert errors[0].startswith("error: no space left on the device: need 0.000")
    assert "damaged" not in errors[0] and "Traceback" not in captured.err + captured.out
    assert images.is_file() and not list(root.rglob(".sclip_ready.*"))


# ----------------------------------------------------- the README's error examples are true


def readme_error_examples() -> list[tuple[str, list[str], str]]:
    """``(module, argv, error line)`` of every ``$ python -m sclip_lab.<module> …`` line of
    the README followed by an ``error:`` line."""
    import shlex

    lines = (REPO / "README.md").read_text().splitlines()
    out = []
    for command, answer in zip(lines, lines[1:]):
        if command.startswith("$ python -m sclip_lab.") and answer.startswith("error: "):
            words = shlex.split(command[2:])
            out.append((words[2].removeprefix("sclip_lab."), words[3:], answer))
    return out


def test_the_readme_shows_its_error_examples():
    assert len(readme_error_examples()) >= 3


@pytest.mark.parametrize("module,argv,line", readme_error_examples(),
                         ids=[" ".join(a) for _, a, _ in readme_error_examples()])
def test_a_readme_error_example_prints_what_it_shows(tmp_path, capsys, monkeypatch, module,
                                                     argv, line):
    monkeypatch.chdir(tmp_path)
    assert invoke(module, [*argv, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("error: ")]
    assert errors == [line]
