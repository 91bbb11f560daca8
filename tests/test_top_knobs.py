"""Every top-level knob (``n``, ``trial``, ``temperature``, ``kernel``, ``window``, ``layer``,
``sigma``) reaches the bound head in every entry point, however often one process composes.

A resolver cached by OmegaConf once returned the first composition's value to every later
one (``predict attention=local kernel=5`` computed with kernel 3); these tests compose each
entry point's config several times in one process, interleaving values, and check what the
built head computes with, not only what the config says.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import cli
from hydra import compose, initialize_config_dir
from synthetic import write_benchmark

from sclip_lab.attention.csa import random_projections
from sclip_lab.build import variant_configs
from sclip_lab.config import CONF_DIR
from sclip_lab.pipeline import build_head


def _projections(head):
    return head.last.params["projections"]


# knob -> (overrides that select the option reading it, values, what the bound head holds)
KNOBS = {
    "n": (["attention=csa", "projection=random"], [2, 5, 2],
          lambda head: len(_projections(head))),
    "trial": (["attention=csa", "projection=random", "n=1"], [3, 0, 3],
              lambda head: next(t for t in range(8) if torch.equal(
                  _projections(head)[0][0],
                  random_projections(1, _projections(head)[0][0].shape[0], t)[0][0]))),
    "temperature": (["attention=sharpen"], [2.0, 0.5, 2.0],
                    lambda head: head.last.params["temperature"]),
    "kernel": (["attention=local"], [5, 1, 7], lambda head: head.last.params["kernel"]),
    "window": (["attention=local"], [5, 9, 5], lambda head: head.last.params["kernel"]),
    "layer": (["attention=early"], [2, 1, 3], lambda head: head.last.early_layers[0]),
    "sigma": (["attention=naclip"], [3.0, 7.5, 3.0], lambda head: head.last.params["sigma"]),
}
ENTRY_CONFIGS = {"run": [], "predict": ["image=x.jpg", "output=pred.png"],
                 "visualize": ["image=x.jpg"]}


def _bound(cfg, enc):
    head = build_head(cfg.attention, cfg.get("projection"), cfg.get("postprocess"), enc)
    return head


def test_every_top_level_knob_is_covered():
    from sclip_lab.config import TOP_KNOBS

    assert set(KNOBS) == set(TOP_KNOBS)


@pytest.mark.parametrize("config_name", list(ENTRY_CONFIGS))
def test_top_level_knobs_reach_the_head_composed_many_times(enc, config_name, caplog):
    extra = ENTRY_CONFIGS[config_name]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for step in range(3):  # interleave knobs and values: no composition sees another's
            for knob, (select, values, held) in KNOBS.items():
                cfg = compose(config_name, overrides=[*extra, *select, f"{knob}={values[step]}"])
                assert held(_bound(cfg, enc)) == values[step], (config_name, knob, step)
            # and the default comes back once the override is gone
            cfg = compose(config_name, overrides=[*extra, "attention=local"])
            assert _bound(cfg, enc).last.params["kernel"] == 3


def test_deprecated_window_warns_once_per_process(enc, caplog):
    import sclip_lab.config as config

    config._WARNED_WINDOW.discard(11)
    with caplog.at_level(logging.WARNING, logger="sclip_lab"), \
            initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for _ in range(3):
            cfg = compose("run", overrides=["attention=local", "window=11"])
            assert _bound(cfg, enc).last.params["kernel"] == 11
    assert sum("window=11 names the local attention size" in r.getMessage()
               for r in caplog.records) == 1


@pytest.mark.parametrize("config_name", ["run", "visualize"])
def test_top_level_knobs_reach_every_variant_entry(enc, config_name):
    """``variants=`` (run) and ``attentions=`` (visualize) entries compose on top of the
    job's overrides, each with its own knob value."""
    base = ENTRY_CONFIGS[config_name]
    entries = ["local kernel=5", "local kernel=1", "early layer=3", "naclip sigma=2.5",
               "csa projection=random n=3", "local window=7", "sharpen temperature=0.25"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=[*base, "kernel=9"])

        def again(extra):
            return compose(config_name, overrides=[*base, "kernel=9", *extra])

        for _ in range(2):
            heads = [_bound(v, enc) for _, v in variant_configs(cfg, entries, again)]
            assert [heads[0].last.params["kernel"], heads[1].last.params["kernel"],
                    heads[2].last.early_layers[0], heads[3].last.params["sigma"],
                    len(_projections(heads[4])), heads[5].last.params["kernel"],
                    heads[6].last.params["temperature"]] == [5, 1, 3, 2.5, 3, 7, 0.25]
        # the job's own top-level kernel=9 is the default of an entry that sets none
        (_, plain), = variant_configs(cfg, ["local"], again)
        assert _bound(plain, enc).last.params["kernel"] == 9


@pytest.mark.e2e
def test_a_sweep_binds_each_jobs_knob(tiny, tmp_path):
    """``-m kernel=5,1`` runs both jobs in one process (Hydra's basic launcher): each
    record holds and was computed with its own kernel."""
    root = tmp_path / "data"
    write_benchmark(root, "voc21", num_images=1, size=(64, 80))
    sweep = tmp_path / "sweep"
    done = cli("run", "-m", *tiny, f"data_root={root}", "logger=none", "attention=local",
               "kernel=5,1", f"hydra.sweep.dir={sweep}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.rglob("result.json"))]
    assert sorted(r["config"]["attention"]["kernel"] for r in records) == [1, 5]
    assert sorted(r["summary"]["window"] for r in records) == [1, 5]
    assert len({r["key"] for r in records}) == 2
