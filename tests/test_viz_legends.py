"""Overlay legends fit any vocabulary (VOC 21, ADE20K 150, COCO-Stuff 171 classes; all
present or a few): every legend artist drawn lies inside the figure, one entry per class
present (its swatch in the class's palette colour, its full name), none for the absent.
And ``predict overlay=PATH`` writes that figure."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from omegaconf import OmegaConf
from PIL import Image

from sclip_lab import viz
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import UserError

H, W = 48, 64
VOCABULARIES = {"voc21": 21, "ade20k": 150, "coco_stuff": 171}


def names_of(dataset: str) -> list[str]:
    """A benchmark's legend names, as run shows them (first synonym, background)."""
    cfg = OmegaConf.load(CONF_DIR / "dataset" / f"{dataset}.yaml")
    return viz.class_names(list(cfg.classes), has_background=(cfg.get("prob_thd") or 0) > 0)


def photo() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)


def all_classes(k: int) -> np.ndarray:
    """Every class of ``k`` present, in a scrambled stripe pattern."""
    return np.random.default_rng(1).permutation(np.arange(H * W) % k).reshape(H, W)


def few_classes(k: int, present: list[int]) -> np.ndarray:
    return np.asarray(present)[np.arange(H * W).reshape(H, W) % len(present)]


def drawn_legend(fig) -> list[tuple[str, tuple[float, ...]]]:
    """Draw ``fig`` with Agg; assert every legend text and swatch lies inside the figure
    and below the panels; return the entries as (text, swatch face colour)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    (legend,) = fig.legends
    texts, swatches = legend.get_texts(), legend.legend_handles
    assert len(texts) == len(swatches)
    eps = 1e-6
    for artist in [*texts, *swatches]:
        e = artist.get_window_extent(renderer)
        assert e.width > 0 and e.height > 0
        assert (box.x0 - eps <= e.x0 and e.x1 <= box.x1 + eps
                and box.y0 - eps <= e.y0 and e.y1 <= box.y1 + eps), \
            (artist, e, box)
    top = legend.get_window_extent(renderer).y1
    for ax in fig.axes:  # the panels keep their size, above the legend
        a = ax.get_window_extent(renderer)
        assert a.y0 >= top - 1 and a.height > 1.5 * fig.dpi and a.width > 1.5 * fig.dpi
    return [(t.get_text(), tuple(s.get_facecolor())) for t, s in zip(texts, swatches)]


def expected(names: list[str], present: list[int]) -> list[tuple[str, tuple[float, ...]]]:
    colors = viz.palette()
    return [(names[c], (*(colors[c] / 255).tolist(), 1.0)) for c in present]


def assert_entries(fig, names: list[str], present: list[int]) -> None:
    got = drawn_legend(fig)
    want = expected(names, present)
    assert [t for t, _ in got] == [t for t, _ in want]  # one entry per class present
    for (_, colour), (_, palette_colour) in zip(got, want):
        np.testing.assert_allclose(colour, palette_colour, atol=1e-6)
    absent = set(names) - {names[c] for c in present}
    assert not absent & {t for t, _ in got}


@pytest.mark.parametrize("dataset", list(VOCABULARIES))
def test_a_legend_of_every_class_fits_the_figure(dataset):
    names = names_of(dataset)
    assert len(names) == VOCABULARIES[dataset]
    fig = viz.overlay_figure(photo(), all_classes(len(names)), names)
    assert_entries(fig, names, list(range(len(names))))


@pytest.mark.parametrize("dataset", list(VOCABULARIES))
def test_a_legend_of_a_few_classes_lists_only_those(dataset):
    names = names_of(dataset)
    present = [0, 3, 7, len(names) - 1]
    fig = viz.overlay_figure(photo(), few_classes(len(names), present), names)
    assert_entries(fig, names, present)
    # The usual case stays a compact figure: the panels and two rows of large type.
    width, height = fig.get_size_inches()
    assert width == 8.0 and height < 4 * H / W + 0.5 + 1.2
    assert {t.get_fontsize() for t in fig.legends[0].get_texts()} == {viz.LEGEND_FONT}


@pytest.mark.parametrize("dataset", ["ade20k", "coco_stuff"])
def test_the_legend_covers_every_map_shown(dataset):
    """Prediction and ground truth (or several methods): the union of their classes."""
    names = names_of(dataset)
    pred, truth = few_classes(len(names), [1, 5, 9]), all_classes(len(names))
    truth[truth % 2 == 1] = 2  # the even classes and 2
    maps = {"prediction": pred, "ground truth": truth}
    present = sorted({1, 5, 9, 2} | set(range(0, len(names), 2)))
    fig = viz.overlay_figure(photo(), maps, names)
    assert [ax.get_title() for ax in fig.axes] == ["image", "prediction", "ground truth"]
    assert_entries(fig, names, present)


def test_a_name_longer_than_the_panels_widens_the_figure():
    names = ["cat", "a remarkably long class name " * 3 + "that no panel is wide enough for"]
    fig = viz.overlay_figure(photo(), few_classes(2, [0, 1]), names)
    assert_entries(fig, names, [0, 1])
    assert fig.get_size_inches()[0] > 8.0


def test_classes_beyond_the_names_are_numbered():
    fig = viz.overlay_figure(photo(), few_classes(200, [0, 180, 199]), ["sky"])
    assert [t for t, _ in drawn_legend(fig)] == ["sky", "class 180", "class 199"]


def test_a_large_photo_is_subsampled_for_the_figure_but_keeps_its_classes(monkeypatch):
    monkeypatch.setattr(viz, "MAX_PANEL_SIDE", 16)
    pred = np.zeros((H, W), np.int64)
    pred[1::4, 1::4] = 4  # only on pixels that a 4-pixel stride skips
    fig = viz.overlay_figure(photo(), pred, names_of("voc21"))
    assert fig.axes[0].get_images()[0].get_array().shape[:2] == (H // 4, W // 4)
    assert [t for t, _ in drawn_legend(fig)] == ["background", "ship"]


def test_save_figure_writes_only_the_formats_asked(tmp_path):
    fig = viz.overlay_figure(photo(), few_classes(21, [0, 15]), names_of("voc21"))
    paths = viz.save_figure(fig, tmp_path / "fig.01", formats=("png",))
    assert paths == [tmp_path / "fig.01.png"] and sorted(tmp_path.iterdir()) == paths
    assert Image.open(paths[0]).format == "PNG"


# ------------------------------------------------------------------ predict overlay=PATH


def compose_predict(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("predict", overrides=overrides)


@pytest.fixture()
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(photo()).save(path)
    return path


def test_predict_writes_the_overlay_figure(tiny, image_file, tmp_path, capsys):
    from sclip_lab.predict import predict

    out, fig = tmp_path / "pred.png", tmp_path / "figs" / "photo.overlay.png"
    cfg = compose_predict([*tiny, f"image={image_file}", f"output={out}", f"overlay={fig}",
                           "classes=[cat, dog, 'grass, lawn']"])
    pred = predict(cfg)
    np.testing.assert_array_equal(np.array(Image.open(out)), pred)  # the index PNG as ever
    with Image.open(fig) as written:
        assert written.format == "PNG" and written.mode == "RGBA"
        assert written.size[0] == 8 * 150  # two 4-inch panels at save_figure's 150 dpi
    assert sorted(p.name for p in fig.parent.iterdir()) == [fig.name]  # no temporary left
    assert f"wrote {out} and {fig}" in capsys.readouterr().out


def test_predict_without_overlay_writes_no_figure(tiny, image_file, tmp_path):
    from sclip_lab.predict import predict

    out = tmp_path / "out" / "pred.png"
    predict(compose_predict([*tiny, f"image={image_file}", f"output={out}",
                             "classes=[cat, dog]"]))
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.png"]


@pytest.mark.parametrize(("overlay", "message"), [
    ("fig.jpg", r"^overlay=\S+fig\.jpg must be a \.png file"),
    ("pred.png", r"^overlay=\S+pred\.png is output= too"),
    ("a_dir.png", r"^overlay=\S+a_dir\.png is a directory; give a file path$"),
    ("a_file/fig.png", r"^overlay=\S+fig\.png: its folder \S+a_file is a file"),
])
def test_a_bad_overlay_path_is_one_line_before_the_model_loads(
        overlay, message, tiny, image_file, tmp_path, monkeypatch):
    from sclip_lab import predict as entry

    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "a_file").write_text("x")

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the overlay path was checked")

    monkeypatch.setattr(entry, "segmenter_from_config", loaded)
    cfg = compose_predict([*tiny, f"image={image_file}", f"output={tmp_path / 'pred.png'}",
                           f"overlay={tmp_path / overlay}", "classes=[cat, dog]"])
    with pytest.raises(UserError, match=message) as e:
        entry.predict(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pred.png").exists()
