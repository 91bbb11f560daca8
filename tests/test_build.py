"""The build room: variant expansion, vocabularies and learned-artefact lookup from configs."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from sclip_lab import build
from sclip_lab.config import CONF_DIR
from sclip_lab.errors import ConfigError


@pytest.fixture()
def composer():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda *o: compose("run", overrides=list(o))


def test_variant_overrides_and_slugs():
    assert build.variant_overrides("local window=5") == ["attention=local", "window=5"]
    assert build.variant_overrides("projection=random n=4") == ["projection=random", "n=4"]
    with pytest.raises(ConfigError, match="empty"):
        build.variant_overrides("  ")
    assert build.slug("attention=local window=5") == "attention-local-window-5"
    assert build.slug("") == "default"


def test_variants_may_change_only_what_follows_the_trunk(composer):
    cfg = composer("variants=['attention=vanilla', 'projection=random n=4']")
    out = build.variant_configs(cfg, compose=lambda extra: composer(*extra))
    assert [label for label, _ in out] == ["attention=vanilla", "projection=random n=4"]
    assert out[1][1].projection.n == 4 and out[0][1].attention.name == "vanilla"
    with pytest.raises(ConfigError, match="changes preprocess"):
        build.variant_configs(cfg, ["preprocess=mode1"], compose=lambda e: composer(*e))
    with pytest.raises(ConfigError, match="variant 'attention=nope'"):
        build.variant_configs(cfg, ["attention=nope"], compose=lambda e: composer(*e))
    assert build.variant_configs(composer()) == [("", composer())]


def test_vocabulary_from_classes_or_dataset(composer):
    classes, scale, prob, area = build.vocabulary(composer("+classes=[cat, dog]",
                                                           "+logit_scale=50"))
    assert (classes, scale, prob, area) == (["cat", "dog"], 50.0, 0.0, None)
    cfg = composer("+classes=null", "dataset=voc21", "+logit_scale=50")
    classes, scale, prob, area = build.vocabulary(cfg)
    # the dataset's own constants, not the free list's logit_scale
    assert len(classes) == 21 and (scale, prob) == (cfg.dataset.logit_scale,
                                                    cfg.dataset.prob_thd)
    with pytest.raises(ConfigError, match="finite"):
        build.vocabulary(composer("+classes=[cat]", "+logit_scale=inf"))


def test_learned_lookup_never_trains_unless_asked(composer, tmp_path):
    assert build.learned_of(composer()) is None
    cfg = composer("projection=learned", f"cache_dir={tmp_path}")
    with pytest.raises(ConfigError, match="python -m sclip_lab.learn .*auto_train=true"):
        build.learned_of(cfg)
    assert not list(tmp_path.rglob("*.pt"))
