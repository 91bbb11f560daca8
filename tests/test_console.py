"""What the console and the output folders say: variant labels, unused knobs, the start
banner, open_clip's chatter."""

from __future__ import annotations

import hashlib
import logging

import open_clip
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab.config import CONF_DIR, label_dir, readers_of, unused_knobs, variant_label
from sclip_lab.console import banner, quiet_open_clip, weights_text


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("run", overrides=list(overrides), return_hydra_config=hydra)


def label(*overrides: str) -> str:
    return variant_label(OmegaConf.to_container(composed(*overrides), resolve=True))


@pytest.mark.parametrize("overrides,expected", [
    ((), "csa"),
    (("projection=qk",), "csa"),  # csa's own default projection is not repeated
    (("projection=random", "n=16"), "csa random n=16"),
    (("projection=random", "n=4", "trial=2"), "csa random n=4 trial=2"),
    (("projection=q",), "csa q"),
    (("temperature=2",), "csa temperature=2"),
    (("attention=local", "kernel=5"), "local kernel=5"),
    (("attention=local",), "local"),
    (("attention=sharpen", "temperature=0"), "sharpen temperature=0"),
    (("attention=clearclip",), "clearclip"),
    (("attention=clearclip", "attention.ffn=true"), "clearclip ffn=true"),
    (("attention=csa", "attention.alpha=2"), "csa alpha=2"),
    (("attention=recipe", "attention.scores=[qq,kk]"), "recipe scores=qq+kk"),
    (("postprocess=pamr",), "csa pamr"),
    (("attention=naclip", "protocol=naclip"), "naclip pamr protocol=naclip"),
])
def test_variant_label_names_what_differs_from_the_defaults(overrides, expected):
    assert label(*overrides) == expected


def test_random_projection_runs_land_in_their_own_folder():
    default = composed(hydra=True)
    random16 = composed("projection=random", "n=16", hydra=True)
    dirs = [OmegaConf.to_container(c.hydra.run, resolve=True)["dir"] for c in (default, random16)]
    assert dirs[0].startswith("outputs/voc21/csa/")
    assert dirs[1].startswith("outputs/voc21/csa-random-n=16/")
    assert random16.name == "voc21-csa-random-n=16"
    assert label_dir("recipe scores=qq+kk") == "recipe-scores=qq+kk"
    assert label_dir("local kernel=5 ffn=false") == "local-kernel=5-ffn=false"


def test_unused_top_level_knobs_are_named_with_their_readers():
    cfg = composed("n=16", "sigma=3", "temperature=4")
    warnings = unused_knobs([cfg], ["n=16", "sigma=3", "temperature=4", "limit=2"])
    assert len(warnings) == 2, warnings  # csa reads temperature
    assert warnings[0].startswith("n=16 has no effect here (attention=csa)")
    assert "projection=random" in warnings[0]
    assert "attention=naclip" in warnings[1]
    used = composed("projection=random", "n=16")
    assert unused_knobs([used], ["projection=random", "n=16"]) == []
    # with several variants, a knob read by any of them is used
    assert unused_knobs([cfg, used], ["n=16"]) == []
    assert "projection=random" in readers_of("n") and "attention=local" in readers_of("kernel")


def test_open_clip_chatter_is_dropped_but_its_other_warnings_stay(caplog, tiny_config_file):
    quiet_open_clip()
    quiet_open_clip()  # idempotent
    assert sum(f is not None for f in logging.getLogger().filters) == 1
    with caplog.at_level(logging.INFO):
        open_clip.create_model("sclip-tiny-vit")
        open_clip.get_tokenizer("sclip-tiny-vit")
    assert not [r for r in caplog.records if "open_clip" in r.pathname], [
        r.getMessage() for r in caplog.records]
    root = logging.getLogger()
    ours = root.makeRecord("root", logging.WARNING, open_clip.__file__, 1,
                           "pretrained tag mismatch", (), None)
    assert root.filter(ours)
    elsewhere = root.makeRecord("root", logging.INFO, __file__, 1, "initialized randomly",
                                (), None)
    assert root.filter(elsewhere)


def test_weights_identity_is_recorded_and_shown(tiny_config_file, tiny_checkpoint):
    from sclip_lab.model import load_clip

    _, info = load_clip("sclip-tiny-vit", str(tiny_checkpoint), "fp32", "cpu")
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert info["weights_sha256"] == digest
    assert weights_text(info) == f"{tiny_checkpoint} (sha256 {digest[:12]})"
    _, random = load_clip("sclip-tiny-vit", "none", "fp32", "cpu")
    assert random["weights_sha256"] is None
    assert "random" in weights_text(random)
    assert weights_text({"pretrained": "openai"}) == "hub tag openai"


def test_banner_aligns_its_rows():
    text = banner([("model", "ViT-B-16"), ("preprocess", "short side 336")])
    assert text.splitlines() == ["  model       ViT-B-16", "  preprocess  short side 336"]


def test_counts_take_the_singular_for_one():
    from sclip_lab.errors import plural

    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert plural(1, "class", "classes") == "1 class" and plural(3, "query", "queries") == (
        "3 queries")


def test_a_one_image_run_says_image(tiny_inproc, tmp_path, capsys):
    from conftest import evaluate_in_process
    from synthetic import write_benchmark

    write_benchmark(tmp_path / "data", "voc20", num_images=1, size=(48, 64))
    evaluate_in_process([*tiny_inproc, "dataset=voc20", f"data_root={tmp_path / 'data'}"],
                        tmp_path / "r")
    out = capsys.readouterr().out
    assert "(1 image) ->" in out and "1 images" not in out
