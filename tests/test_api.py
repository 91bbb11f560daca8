"""The Python API (``import sclip_lab``): load, methods, Segmenter.segment / logits /
evaluate / from_config, figures, errors, and the quickstart example, on the tiny ViT."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, cli, evaluate_in_process
from PIL import Image
from synthetic import write_benchmark

import sclip_lab
from sclip_lab.attention import ATTENTIONS
from sclip_lab.config import CONF_DIR


@pytest.fixture()
def backbone(tiny_config_file, tiny_checkpoint, tmp_path):
    """``load`` keyword arguments for the tiny random ViT, a private text cache, CPU."""
    return {"model": TINY, "pretrained": tiny_checkpoint, "config_file": str(tiny_config_file),
            "cache_dir": str(tmp_path / "cache"), "device": "cpu"}


@pytest.fixture()
def photo(tmp_path):
    """A 50×70 RGB PNG (lossless: every reader gives the same pixels) and its array."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    return path, image


def test_import_is_light_and_exports_the_api():
    done = subprocess.run([sys.executable, "-c", "import sys, sclip_lab; "
                           "print('torch' in sys.modules, sclip_lab.__version__)"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.stdout.split() == ["False", sclip_lab.__version__], done.stderr
    for name in ("load", "methods", "Segmenter", "ConfigError", "viz", "images"):
        assert name in sclip_lab.__all__ and getattr(sclip_lab, name) is not None
    assert sclip_lab.ConfigError is __import__("sclip_lab.errors").errors.ConfigError
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sclip_lab.nope  # noqa: B018


def test_methods_lists_every_registered_variant_with_its_declarations():
    listed = sclip_lab.methods()
    assert [m.name for m in listed] == sorted(ATTENTIONS)
    assert {m.name for m in listed} == {p.stem for p in (CONF_DIR / "attention").glob("*.yaml")}
    for method in listed:
        variant = ATTENTIONS[method.name]
        assert method.knobs == variant.knobs and method.doc == variant.doc
        assert (method.residual, method.ffn) == (variant.residual, variant.ffn)
    by_name = {m.name: m for m in listed}
    assert by_name["naclip"].defaults == {"sigma": 5.0}
    assert not by_name["naclip"].residual and not by_name["naclip"].ffn
    assert "sigma (a number > 0, default 5.0)" in repr(by_name["naclip"])
    assert by_name["local"].knobs[0].rule() == "an odd integer ≥ 1"


def test_load_config_puts_each_keyword_where_the_command_line_would():
    cfg = sclip_lab.load_config("naclip", sigma=3, dataset="context59", protocol="naclip")
    assert cfg.attention.name == "naclip" and cfg.attention.sigma == 3
    assert cfg.dataset.name == "context59" and cfg.protocol.name == "naclip"
    cfg = sclip_lab.load_config("csa", projection="random", n=16, temperature=4.0,
                                residual=False, batch_size=4)
    assert cfg.projection.name == "random" and cfg.projection.n == 16 and cfg.n == 16
    assert cfg.attention.temperature == 4.0 and cfg.attention.residual is False
    assert cfg.batch_size == 4
    cfg = sclip_lab.load_config("local", window=5)  # an old knob name: the knob itself
    assert cfg.attention.kernel == 5
    cfg = sclip_lab.load_config("csa", model="vit_l14_openai", classes=["cat", "dog"])
    assert cfg.model.arch == "ViT-L-14-quickgelu" and list(cfg.classes) == ["cat", "dog"]
    cfg = sclip_lab.load_config(model="ViT-B-16", pretrained="/w/b16.pt", config_file="c.json",
                                device="cpu", precision="fp32", postprocess="pamr")
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.config_file) == (
        "ViT-B-16", "/w/b16.pt", "c.json")
    assert (cfg.device, cfg.precision, cfg.postprocess.name) == ("cpu", "fp32", "pamr")


def test_a_knob_nothing_reads_is_warned_about(caplog):
    sclip_lab.load_config("csa", n=16)
    assert "n=16 has no effect here (attention=csa): only projection=random reads n" \
        in caplog.text


def test_an_unknown_method_lists_the_methods_as_the_command_line_does(tiny):
    with pytest.raises(sclip_lab.ConfigError) as caught:
        sclip_lab.load("nope")
    message = str(caught.value)
    assert "\n" not in message and "unknown attention=nope (no conf/attention/nope.yaml)" \
        in message
    assert all(name in message for name in ATTENTIONS)
    done = cli("run", "attention=nope", "--verbose", *tiny)
    assert done.returncode == 2 and f"error: {message}" in done.stderr


@pytest.mark.parametrize(("knobs", "expected"), [
    ({"foo": 3}, ATTENTIONS["naclip"].unknown_knob("foo")),
    ({"sigma": -1}, "attention.sigma=-1 is out of range"),
    ({"projection": "random"}, "attention=naclip has no projection"),
    ({"dataset": "nope"}, "unknown dataset=nope (no conf/dataset/nope.yaml)"),
    ({"classes": 3}, "classes must be a list of names"),
])
def test_bad_input_is_one_config_error(knobs, expected, backbone):
    """Each refused before the model loads (the tiny one would load): one line, never
    sys.exit (a SystemExit would not be caught here)."""
    with pytest.raises(sclip_lab.ConfigError) as caught:
        sclip_lab.load("naclip", **{**backbone, **knobs})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_segment_takes_every_image_kind_and_lists(backbone, photo):
    path, image = photo
    seg = sclip_lab.load("naclip", sigma=3, classes=["cat", "dog", "grass, lawn"], **backbone)
    assert isinstance(seg, sclip_lab.Segmenter) and seg.class_names == ("cat", "dog", "grass")
    pred = seg.segment(image)
    assert pred.shape == (50, 70) and pred.dtype == np.int64 and isinstance(pred, np.ndarray)
    assert pred.min() >= 0 and pred.max() < 3
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    for kind in (path, str(path), Image.open(path), Image.fromarray(image).convert("RGBA"),
                 tensor, tensor.float() / 255):
        np.testing.assert_array_equal(seg.segment(kind), pred, err_msg=type(kind).__name__)
    logits = seg.logits(path)
    assert logits.shape == (4, 50, 70)  # one query per synonym
    np.testing.assert_array_equal(seg.classes(logits).numpy(), pred)
    flipped = np.ascontiguousarray(image[::-1])
    both = seg.segment([image, flipped])
    assert isinstance(both, list) and len(both) == 2
    np.testing.assert_array_equal(both[0], pred)
    np.testing.assert_array_equal(both[1], seg.segment(flipped))
    assert [tuple(x.shape) for x in seg.logits([image, flipped])] == [(4, 50, 70)] * 2


@pytest.mark.parametrize(("bad", "expected"), [
    (42, "cannot read an image from a int"),
    (np.zeros((5, 6), np.uint8), "(H, W, 3) uint8"),
    (np.zeros((5, 6, 3), np.float32), "(H, W, 3) uint8"),
    (torch.zeros(5, 6, 3), "(3, H, W)"),
    (torch.full((3, 5, 6), 2.0), "must lie in 0..1"),
    (torch.zeros(3, 5, 6, dtype=torch.int32), "uint8 (0..255) or float (0..1)"),
])
def test_an_unreadable_image_is_one_config_error(bad, expected):
    from sclip_lab.images import as_rgb

    with pytest.raises(sclip_lab.ConfigError, match=None) as caught:
        as_rgb(bad)
    assert expected in str(caught.value)


def test_a_missing_image_file_is_a_data_error(tmp_path):
    from sclip_lab.data import DataError
    from sclip_lab.images import as_rgb

    with pytest.raises(DataError, match="cannot read image"):
        as_rgb(tmp_path / "missing.png")


def test_evaluate_gives_the_run_records_numbers(backbone, tiny_inproc, tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, "voc21", num_images=3, size=(64, 96))
    (record,) = evaluate_in_process([*tiny_inproc, f"data_root={root}", "attention=naclip",
                                     "sigma=3", "limit=2"], tmp_path / "run")
    seg = sclip_lab.load("naclip", sigma=3, **backbone)
    scores = seg.evaluate("voc21", data_root=root, limit=2)
    assert scores["num_images"] == record["num_images"] == 2
    assert {k: scores[k] for k in ("mIoU", "aAcc", "mAcc")} == record["metrics"]
    assert scores["per_class_iou"] == record["per_class_iou"]
    assert seg.evaluate(data_root=root, limit=2) == scores  # its own dataset by default
    with pytest.raises(sclip_lab.ConfigError, match="load it with dataset='context59'"):
        seg.evaluate("context59", data_root=root)
    free = sclip_lab.load("naclip", classes=["cat", "dog"], **backbone)
    with pytest.raises(sclip_lab.ConfigError, match="free vocabulary"):
        free.evaluate(data_root=root)


def test_from_config_builds_what_load_builds(backbone, tiny, photo):
    from hydra import compose, initialize_config_dir

    _, image = photo
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("run", overrides=[*tiny, "attention=naclip", "sigma=3", "device=cpu"])
    seg = sclip_lab.Segmenter.from_config(cfg)
    assert seg.config.attention.sigma == 3 and seg.info["arch"] == TINY
    loaded = sclip_lab.load("naclip", sigma=3, **backbone)
    np.testing.assert_array_equal(seg.segment(image), loaded.segment(image))
    assert seg.class_names == loaded.class_names and seg.class_names[0] == "background"


def test_overlay_figure_is_a_figure_of_one_panel_per_prediction():
    from matplotlib.figure import Figure

    image = np.zeros((20, 30, 3), np.uint8)
    pred = np.zeros((20, 30), np.int64)
    pred[:, 15:] = 2
    fig = sclip_lab.viz.overlay_figure(image, pred, ["sky", "cat", "dog"])
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes] == ["image", "prediction"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sky", "dog"]
    fig = sclip_lab.viz.overlay_figure(image, {"a": pred, "b": pred * 0 + 5}, ["sky"])
    assert [ax.get_title() for ax in fig.axes] == ["image", "a", "b"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sky", "class 2", "class 5"]


def test_the_quickstart_example_runs(tiny_config_file, tiny_checkpoint, tmp_path):
    root = tmp_path / "data"
    write_benchmark(root, "voc21", num_images=2, size=(64, 96))
    env = {**os.environ, "MPLBACKEND": "Agg", "SCLIP_DATA": str(root),
           "SCLIP_CACHE": str(tmp_path / "cache"), "SCLIP_EXAMPLE_OUT": str(tmp_path / "out"),
           "SCLIP_EXAMPLE_LIMIT": "2", "SCLIP_EXAMPLE_MODEL": TINY,
           "SCLIP_EXAMPLE_PRETRAINED": str(tiny_checkpoint),
           "SCLIP_EXAMPLE_CONFIG_FILE": str(tiny_config_file)}
    done = subprocess.run([sys.executable, str(REPO / "examples/quickstart.py")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "naclip sigma=3: mIoU" in done.stdout and "on 2 images" in done.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"csa.png", "csa_vs_naclip.png"}
