"""From a composed config to the lab's objects: variants, vocabulary, segmenter, heads.

What the entry points share sits here, below them: ``run``, ``predict`` and ``visualize``
expand variants and build segmenters the same way, and none imports another.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import partial

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from sclip_lab import data
from sclip_lab.cli import hydra_message
from sclip_lab.config import variant_overrides
from sclip_lab.errors import ConfigError, number
from sclip_lab.head_spec import HeadSpec, head_spec_of
from sclip_lab.pipeline import Preprocess, Segmenter, build_segmenter

log = logging.getLogger("sclip_lab")

# What a variant may change: everything after the shared trunk.
VARIANT_KEYS = ("attention", "projection", "postprocess", "proxy")
SHARED_KEYS = ("model", "dataset", "preprocess", "text", "precision", "limit", "data_root")


def slug(overrides: str) -> str:
    """A directory name for a variant's override string."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", overrides).strip("-") or "default"


def variant_configs(cfg: DictConfig, entries: Sequence[str] | None = None, compose=None, *,
                    keep_broken: bool = False) -> list[tuple[str, DictConfig | ConfigError]]:
    """``[(label, config)]``: the job's own config, or one per variant entry.

    Each entry (default: ``cfg.variants``) is a string of overrides, ``"attention=local
    kernel=5"`` (or ``"local kernel=5"``), composed on top of this job's overrides; variants
    may change only attention, projection, their knobs, the proxy backbone and
    post-processing (what comes after the shared trunk). ``compose(overrides) -> config``
    defaults to Hydra's. A broken entry raises its ``ConfigError``; with ``keep_broken``
    the error takes the config's place, so that one bad entry does not cost the others.
    """
    entries = cfg.get("variants") if entries is None else entries
    if not entries:
        return [("", cfg)]
    if compose is None:
        from hydra import compose as hydra_compose

        job = HydraConfig.get()
        base = [o for o in job.overrides.task if not o.startswith(("variants=", "+variants="))]
        compose = partial(_compose_variant, hydra_compose, job.job.config_name, base)
    out = []
    for entry in entries:
        try:
            out.append((str(entry), _variant_config(cfg, str(entry), compose)))
        except ConfigError as e:
            if not keep_broken:
                raise
            out.append((str(entry), e))
    return out


def _variant_config(cfg: DictConfig, entry: str, compose) -> DictConfig:
    try:
        vcfg = compose(variant_overrides(entry))
    except ConfigError:
        raise
    except Exception as e:  # Hydra's own errors name the unknown group or option
        raise ConfigError(f"variant '{entry}': {hydra_message(e)}") from None
    for key in SHARED_KEYS:
        if OmegaConf.select(vcfg, key) != OmegaConf.select(cfg, key):
            raise ConfigError(f"variant '{entry}' changes {key}; variants may only change "
                              f"{', '.join(VARIANT_KEYS)} and their knobs — sweep {key} "
                              "as separate jobs")
    return vcfg


def _compose_variant(hydra_compose, config_name: str, base: list[str], overrides: list[str]):
    cfg = hydra_compose(config_name=config_name, overrides=base + overrides)
    with open_dict(cfg):
        cfg.variants = None
    return cfg


def vocabulary(cfg: DictConfig) -> tuple[list[str], float, float, float | None]:
    """(class lines, logit scale, prob_thd, area_thd) from ``classes=`` or ``dataset=``."""
    if cfg.classes is not None:
        classes = [cfg.classes] if isinstance(cfg.classes, str) else list(cfg.classes)
        classes = [str(c).strip() for c in classes if str(c).strip()]
        if not classes:
            raise ConfigError("classes=[] is empty; give e.g. classes=\"[cat, dog, grass]\"")
        if len(set(classes)) != len(classes):
            dup = sorted({c for c in classes if classes.count(c) > 1})
            log.warning("classes= lists %s more than once: the first one wins every tie",
                        ", ".join(dup))
        return classes, number(cfg.logit_scale, "logit_scale", above=0), 0.0, None
    spec = data.spec_from_config(cfg.dataset)
    return list(spec.classes), spec.logit_scale, spec.prob_thd, spec.area_thd


def segmenter_from_config(cfg: DictConfig, classes: Sequence[str], logit_scale: float,
                          prob_thd: float, area_thd: float | None,
                          prep: Preprocess | None = None,
                          heads: Sequence[tuple[HeadSpec, LearnedWeights]] | None = None,
                          keep_going: bool = False) -> tuple[Segmenter, dict]:
    """``build_segmenter`` (the one builder) with the sections of a composed run/predict
    config: its model, text, device, precision, batch size, caches (the trunk cache when
    ``trunk_cache`` names a folder) and ``heads`` — ``[(spec, learned weights)]``, default
    the config's own head. ``prep``: the preprocessing already built for the data loader,
    else ``cfg.preprocess``."""
    heads = list(heads) if heads is not None else [(head_spec_of(cfg), learned_of(cfg))]
    return build_segmenter(
        model=cfg.model, heads=[h for h, _ in heads], learned=[w for _, w in heads],
        preprocess=prep or cfg.preprocess, classes=None if classes is None else list(classes),
        logit_scale=logit_scale,
        prob_thd=prob_thd, area_thd=area_thd, templates=cfg.text.templates,
        text_scores=cfg.text.get("scores", "softmax"),
        device=cfg.device, precision=cfg.precision, batch_size=cfg.batch_size,
        cache_dir=cfg.cache_dir, trunk_cache=cfg.get("trunk_cache") or None,
        trunk_cache_dtype=cfg.get("trunk_cache_dtype", "fp32"), keep_going=keep_going)


LearnedWeights = tuple[Tensor, Tensor | None] | None


def learned_of(cfg: DictConfig) -> LearnedWeights:
    """The trained (W, b) when ``cfg`` asks for ``projection=learned``, else None."""
    if cfg.get("projection") is None or cfg.projection.name != "learned":
        return None
    from sclip_lab.learned import learned_projection  # torch-heavy training code: lazily

    return learned_projection(cfg)
