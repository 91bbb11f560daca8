"""The Python API: ``sclip_lab.load``, ``sclip_lab.methods`` and the public ``Segmenter``.

``load`` composes the same Hydra config as the command line (``conf/predict.yaml``: the
run's groups and knobs, plus a free ``classes`` vocabulary) from keyword arguments and
builds through the same builder (``build.segmenter_from_config``), so a segmenter loaded
here computes what ``python -m sclip_lab.run`` / ``predict`` compute with the same choices.
Bad input raises the CLI's ``ConfigError`` with the CLI's one-line message; nothing here
calls ``sys.exit``.

Example::

    import sclip_lab

    seg = sclip_lab.load("naclip", sigma=3, classes=["cat", "dog", "grass"])
    pred = seg.segment("cat.jpg")                  # (H, W) int64 class map
    fig = sclip_lab.viz.overlay_figure(sclip_lab.images.as_rgb("cat.jpg"), pred,
                                       seg.class_names)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sclip_lab import data, pipeline, viz
from sclip_lab.attention import ATTENTIONS, get_variant
from sclip_lab.build import segmenter_from_config, vocabulary
from sclip_lab.cli import hydra_message
from sclip_lab.config import CONF_DIR, TOP_KNOBS, unused_knobs
from sclip_lab.errors import ConfigError, check_config, integer
from sclip_lab.evaluation import evaluate_segmenter, scores
from sclip_lab.knobs import BLOCK_NAMES, TRUNK_NAMES, Knob, Variant

log = logging.getLogger("sclip_lab")

CONFIG_NAME = "predict"  # the run's groups and knobs, plus classes= and logit_scale
# Keyword arguments of ``load`` that choose an option of a config group.
GROUPS = ("projection", "postprocess", "proxy", "preprocess", "text")
MODEL_KEYS = ("config_file", "quick_gelu")  # model.<key>: a custom open_clip architecture
# Top-level settings of conf/run.yaml a segmenter reads (never the numbers, except
# trunk_cache_dtype=fp16 and logit_scale of a free vocabulary).
RUNTIME_KEYS = ("batch_size", "cache_dir", "trunk_cache", "trunk_cache_dtype",
                "logit_scale", "data_root", "auto_prepare")


@dataclass(frozen=True)
class Method:
    """A registered method as ``methods()`` lists it, from its declarations.

    Attributes:
        name: ``sclip_lab.load(name)`` / ``attention=<name>``.
        doc: one line on what it computes.
        knobs: its own ``Knob`` declarations (``name``, ``kind``, ``default``, ``rule()``:
            the valid range in words, ``doc``); every method also takes the block knobs
            ``residual``, ``ffn``, ``alpha`` and the trunk knob ``pos_embed``.
        residual / ffn: the block around its attention by default.
    """

    name: str
    doc: str
    knobs: tuple[Knob, ...] = ()
    residual: bool = True
    ffn: bool = True

    @property
    def defaults(self) -> dict[str, Any]:
        """knob name -> its default."""
        return {k.name: k.default for k in self.knobs}

    def __repr__(self) -> str:
        knobs = ", ".join(k.describe() for k in self.knobs) or "no knobs of its own"
        return f"<{self.name}: {self.doc} | {knobs}>"


def methods() -> list[Method]:
    """Every registered method with its knobs, defaults, ranges and docs, by name.

    Example:
        >>> naclip = {m.name: m for m in methods()}["naclip"]
        >>> naclip.defaults, naclip.knobs[0].rule()
        ({'sigma': 5.0}, 'a number > 0')
    """
    return [Method(v.name, v.doc, v.knobs, v.residual, v.ffn)
            for _, v in sorted(ATTENTIONS.items())]


@dataclass(eq=False)
class Segmenter(pipeline.Segmenter):
    """A segmenter that knows the config it was built from: ``segment`` / ``logits`` (see
    ``pipeline.Segmenter``), ``evaluate`` on its benchmark, ``class_names`` for figures.

    Make one with ``sclip_lab.load(...)`` or ``Segmenter.from_config(cfg)``.

    Attributes:
        config: the composed run/predict config it was built from.
        info: the model's description (arch, weights, device, precision, depth, …).
        class_names: the display name of each class index (legends, ``viz``).
    """

    config: DictConfig | None = field(default=None, repr=False)
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    class_names: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Segmenter:
        """Build from a composed Hydra config (``conf/run.yaml`` or ``conf/predict.yaml``
        with any overrides) through the CLI's builder; the vocabulary is ``cfg.classes``
        when given, else the dataset's.

        Example::

            with hydra.initialize_config_dir(str(sclip_lab.config.CONF_DIR), version_base="1.3"):
                cfg = hydra.compose("run", overrides=["attention=naclip", "sigma=3"])
            seg = Segmenter.from_config(cfg)
        """
        if "classes" not in cfg:  # a run config: its dataset's vocabulary
            cfg = cfg.copy()
            with open_dict(cfg):
                cfg.classes = None
        classes, logit_scale, prob_thd, area_thd = vocabulary(cfg)
        built, info = segmenter_from_config(cfg, classes, logit_scale, prob_thd, area_thd)
        parts = {f.name: getattr(built, f.name) for f in fields(pipeline.Segmenter)}
        return cls(**parts, config=cfg, info=info,
                   class_names=tuple(viz.class_names(classes, has_background=prob_thd > 0)))

    def evaluate(self, dataset: str | None = None, *, data_root: str | os.PathLike | None = None,
                 limit: int | None = None, images_per_batch: int = 1, num_workers: int = 0
                 ) -> dict[str, Any]:
        """Evaluate on the benchmark it was loaded for, by the loop of ``sclip_lab.run``:
        the same numbers as the run's record.

        Args:
            dataset: the benchmark's name (default: the one it was loaded for; another
                needs ``sclip_lab.load(..., dataset=name)``: its vocabulary, constants and
                short side differ).
            data_root: the folder holding the benchmark (default: ``$SCLIP_DATA`` or
                ``./data``, as the run's ``data_root``).
            limit: only the first N images (sorted ids).
            images_per_batch / num_workers: throughput only.

        Returns:
            ``{"mIoU", "aAcc", "mAcc"}`` in percent, ``"per_class_iou"`` (class name ->
            IoU in percent, None for a class absent from labels and predictions) and
            ``"num_images"``.
        """
        cfg = self.config
        if cfg is None:
            raise ConfigError("this segmenter has no config to evaluate with; make it with "
                              "sclip_lab.load(...) or Segmenter.from_config(cfg)")
        name = cfg.dataset.name
        if cfg.get("classes") is not None:
            raise ConfigError("this segmenter has a free vocabulary (classes=); a benchmark "
                              "is scored on its own classes: sclip_lab.load(..., "
                              f"dataset={dataset or name!r}) without classes")
        if dataset is not None and dataset != name:
            raise ConfigError(f"this segmenter was loaded for dataset={name} (its vocabulary, "
                              f"constants and short side); load it with dataset={dataset!r} "
                              f"to evaluate {dataset}")
        limit = integer(limit, "limit", 1, optional=True)
        spec = data.spec_from_config(cfg.dataset)
        root = data.resolve_data_root(cfg.data_root if data_root is None else data_root)
        if cfg.dataset.get("source", "files") == "files":
            from sclip_lab.prepare import ensure_ready

            ensure_ready(spec, root, auto_prepare=bool(cfg.get("auto_prepare", False)))
        images = data.build_dataset(cfg.dataset, root, limit, self.prep)
        result = evaluate_segmenter(self, images, spec.num_classes,
                                    integer(images_per_batch, "images_per_batch", 1),
                                    integer(num_workers, "num_workers", 0), desc=spec.name)[0]
        metrics, per_class = scores(result.metric, viz.class_names(
            spec.classes, has_background=spec.prob_thd > 0))
        return {**metrics, "per_class_iou": per_class, "num_images": len(images)}


def load(method: str = "csa", model: str = "vit_b16_openai",
         pretrained: str | os.PathLike | None = None, dataset: str | None = None,
         classes: Sequence[str] | str | None = None, protocol: str = "sclip",
         device: str = "auto", precision: str = "auto", **knobs: Any) -> Segmenter:
    """A ready segmenter, configured as ``python -m sclip_lab.predict`` would be.

    Args:
        method: a registered method (``methods()``; ``attention=<method>``).
        model: a preset of ``conf/model/`` (``vit_b16_openai``, …) or an open_clip
            architecture name (``model.arch``; a custom one with ``config_file=``).
        pretrained: the weights: a hub tag or a checkpoint file (default: the preset's,
            ``openai``).
        dataset: the benchmark whose vocabulary, constants and short side it takes
            (default ``voc21``); ``evaluate`` scores on it.
        classes: a free vocabulary instead (``["cat", "dog"]``; synonyms in one entry as
            ``"person, man"``); the dataset then gives only the short side.
        protocol: a method's own evaluation protocol (``conf/protocol/``).
        device: ``auto`` | ``cpu`` | ``cuda``.  precision: ``auto`` | ``fp32`` | ``fp16`` |
            ``bf16``.
        **knobs: the method's knobs (``sigma=3``), the block knobs (``residual``, ``ffn``,
            ``alpha``, ``pos_embed``), the top-level paper knobs (``n``, ``trial``, …),
            group options (``projection="random"``, ``postprocess="pamr"``, ``proxy``,
            ``preprocess``, ``text``), ``config_file`` / ``quick_gelu`` of the model, and
            the settings ``batch_size``, ``cache_dir``, ``trunk_cache``,
            ``trunk_cache_dtype``, ``logit_scale``, ``data_root``.

    Raises:
        ConfigError: an unknown method, group option or knob, or a bad value: one line,
            the command line's message.

    Example::

        seg = sclip_lab.load("naclip", sigma=3)
        seg = sclip_lab.load("csa", projection="random", n=16, dataset="context59")
    """
    cfg = load_config(method, model, pretrained, dataset, classes, protocol, device,
                      precision, **knobs)
    return Segmenter.from_config(cfg)


def load_config(method: str = "csa", model: str = "vit_b16_openai",
                pretrained: str | os.PathLike | None = None, dataset: str | None = None,
                classes: Sequence[str] | str | None = None, protocol: str = "sclip",
                device: str = "auto", precision: str = "auto", **knobs: Any) -> DictConfig:
    """The composed config ``load`` builds from (same arguments), checked: ``???`` and
    non-finite values refused, top-level knobs that nothing reads warned about."""
    presets = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
    groups = {"attention": method, "protocol": protocol, "dataset": dataset,
              "model": model if model in presets else None,
              **{g: knobs.pop(g) for g in GROUPS if g in knobs}}
    overrides = [f"{g}={'null' if v is None else v}" for g, v in groups.items()
                 if v is not None or g in GROUPS] + ["image=null", "output=null"]
    cfg = _compose(overrides)
    variant = get_variant(cfg.attention.name)
    values = {"device": device, "precision": precision,
              "classes": None if classes is None else _class_list(classes)}
    if model not in presets:
        values["model.arch"] = str(model)
    if pretrained is not None:
        values["model.pretrained"] = os.fspath(pretrained)
    top = []
    for key, value in knobs.items():
        path = _knob_path(key, variant)
        values[path] = value
        top += [f"{key}={value}"] if path in TOP_KNOBS else []
    for path, value in values.items():
        try:
            OmegaConf.update(cfg, path, value, merge=False, force_add=path.startswith("attention."))
        except (OmegaConfBaseException, ValueError) as e:
            raise ConfigError(f"{path}={value!r} cannot be set: {str(e).splitlines()[0]}") from None
    check_config(cfg)
    for warning in unused_knobs([cfg], top):
        log.warning(warning)
    return cfg


def _knob_path(key: str, variant: Variant) -> str:
    """Where a keyword argument of ``load`` goes in the config: a method's knob under
    ``attention.`` (by its own name, not an old alias), else a model key, a top-level
    paper knob or setting; anything else is the variant's unknown-knob error."""
    knob = variant.knob(key)
    if knob is not None:
        return f"attention.{knob.name}"
    if key in (*BLOCK_NAMES, *TRUNK_NAMES):
        return f"attention.{key}"
    if key in MODEL_KEYS:
        return f"model.{key}"
    if key in (*TOP_KNOBS, *RUNTIME_KEYS):
        return key
    raise ConfigError(variant.unknown_knob(key))


def _class_list(classes: Sequence[str] | str) -> list[str]:
    if isinstance(classes, str):
        return [classes]
    if not isinstance(classes, Sequence):
        raise ConfigError(f"classes must be a list of names, not a {type(classes).__name__}; "
                          "give e.g. classes=['cat', 'dog', 'grass']")
    return [str(c) for c in classes]


def _compose(overrides: list[str]) -> DictConfig:
    """Hydra's composition of ``conf/predict.yaml`` with ``overrides``; its errors as the
    CLI's one line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app or a test's context
            return compose(CONFIG_NAME, overrides=overrides)
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(CONFIG_NAME, overrides=overrides)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's own: an unknown group option lists the options
        raise ConfigError(hydra_message(e)) from None
