"""``HeadSpec``: a head validated once, the one source of keys, summaries, labels, defaults."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sclip_lab.attention import ATTENTIONS
from sclip_lab.config import CONF_DIR, variant_label
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import default_fields, head_spec, head_spec_of
from sclip_lab.records import result_key, summary_of

OPTIONS = sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml"))
EXTRA = {"proxy": ["proxy=clip_self"], "resclip": ["protocol=resclip"],
         "csa": ["projection=random", "n=4", "trial=2"]}


def composed(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("run", overrides=list(overrides))


@pytest.mark.parametrize("option", OPTIONS)
def test_a_spec_of_a_composed_config_is_the_spec_of_its_container(option):
    """run builds specs from DictConfigs (lists are ListConfigs there), records and tables
    from plain containers: the two must give the same spec, key and summary (a ListConfig
    once reached a key as its repr)."""
    cfg = composed(f"attention={option}", "dataset=voc20", *EXTRA.get(option, []))
    plain = OmegaConf.to_container(cfg, resolve=True)
    spec = head_spec_of(cfg)
    assert spec == head_spec_of(plain) and hash(spec) == hash(head_spec_of(plain))
    assert result_key(plain, spec) == result_key(plain)
    assert summary_of(plain, {}, spec=spec) == summary_of(plain, {})
    assert variant_label(plain, spec) == variant_label(plain)


def test_knobs_are_bound_and_the_section_kept_as_configured():
    spec = head_spec({"name": "local", "window": 5, "residual": None})
    assert spec.params == {"kernel": 5} and spec.blocks["residual"] is True
    assert spec.summary()["window"] == 5 and spec.label() == "local kernel=5"
    assert spec.key_sections()["attention"] == {"name": "local", "window": 5}
    with pytest.raises(ConfigError, match="kernel=4 is out of range"):
        head_spec({"name": "local", "kernel": 4})
    with pytest.raises(ConfigError, match="has no projection"):
        head_spec({"name": "naclip"}, {"name": "random"})


def test_a_method_declares_its_projection_set_and_position_rule():
    """No consumer names csa: its projection set is its own declaration, and a method's
    position rule is its registration's (labels name only an override)."""
    csa = head_spec({"name": "csa"}, {"name": "random", "n": 16, "trial": 0})
    assert csa.summary()["projection"] == "random" and csa.summary()["n"] == 16
    assert csa.label() == "csa random n=16"
    assert head_spec({"name": "csa"}).summary()["projection"] == "qk"
    assert head_spec({"name": "gem"}).pos_embed == ATTENTIONS["gem"].pos_embed
    assert head_spec({"name": "gem"}).label() == "gem"
    assert head_spec({"name": "gem", "pos_embed": "bicubic_scale"}).label() == \
        "gem pos_embed=bicubic_scale"


def test_table_defaults_are_the_spec_of_nothing_configured():
    for name in ATTENTIONS:
        fields = default_fields(name)
        assert fields["attention"] == name
        assert fields == head_spec({"name": name}, require_proxy=False).summary()
    from sclip_lab.tables.collect import field_value

    assert default_fields("csa", {"name": "random", "combine": "mean"})["combine"] == "mean"
    # a record that predates the combine field: its projection set's own (random: mean)
    assert field_value({"attention": "csa", "projection": "random"}, "combine") == "mean"
    assert field_value({"attention": "csa", "projection": "identity"}, "combine") == "sum"
    assert field_value({"attention": "csa"}, "projection") == "qk"
