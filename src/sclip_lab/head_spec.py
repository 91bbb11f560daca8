"""A head validated once: ``HeadSpec``, what one variant computes after the shared trunk.

``head_spec`` is the only place a head's config is checked and its defaults are filled:
the variant and its knobs (types converted, nulls resolved), the block around it, the
trunk it reads (position-embedding rule), the variant's own extra groups (CSA's projection
set), the post-processing and the proxy backbone. Everything downstream reads the spec:
the pipeline builds the last block from it, records take their result key and summary
fields from it, the console and folders their labels, tables their defaults, the trunk
its needs (``HeadSpec.needs``). Nothing below re-derives a default.

Example::

    >>> spec = head_spec({"name": "local", "kernel": 5})
    >>> spec.params["kernel"], spec.summary()["window"], spec.label()
    (5, 5, 'local kernel=5')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sclip_lab import refine
from sclip_lab.attention import get_variant
from sclip_lab.errors import ConfigError, integer, number
from sclip_lab.knobs import (
    BLOCK_KNOBS,
    BLOCK_NAMES,
    TRUNK_KNOBS,
    Variant,
    record_value,
    summary_fields,
)

POSTPROCESS = ("none", "pamr", "tlp")


class Pairs(tuple):
    """A frozen mapping: ``(key, value)`` pairs in the config's order (hashable)."""


def freeze(value: Any) -> Any:
    """A config value as a hashable one: mappings -> ``Pairs``, sequences -> tuples (an
    OmegaConf ``DictConfig`` / ``ListConfig`` as its plain values: a spec made from a
    composed config equals the one made from its container)."""
    if isinstance(value, Mapping):
        return Pairs((k, freeze(v)) for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(pairs: Pairs | None) -> dict[str, Any] | None:
    """``freeze``'s pairs back to a dict, with lists where the config had lists."""
    if pairs is None:
        return None
    return {k: _thaw_value(v) for k, v in pairs}


def _thaw_value(value: Any) -> Any:
    if isinstance(value, Pairs):
        return thaw(value)
    if isinstance(value, tuple):
        return [_thaw_value(v) for v in value]
    return value


def knob_field_names() -> tuple[str, ...]:
    """The summary fields of the attention knobs: every registered variant's declared knobs
    (read at call time, so a variant registered later has its fields), then the block's."""
    from sclip_lab.attention import ATTENTIONS

    return summary_fields(list(ATTENTIONS.values()))


@dataclass(frozen=True)
class Needs:
    """What a head asks of the trunk: borrowed attention maps (``early``, 1-indexed, the
    last block's own included), hidden states, the proxy backbone, the position rule and
    the named features of registered providers (``sclip_lab.features``)."""

    early: tuple[int, ...] = ()
    hidden: tuple[int, ...] = ()
    proxy: Any = None
    pos_embed: str = TRUNK_KNOBS[0].default
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeadSpec:
    """One validated head (frozen, hashable).

    Attributes:
        variant: the registered attention variant.
        given: the attention section as configured (``name`` dropped; the result key of
            older records is made of it).
        knobs: the variant's own knobs, bound (defaults filled, types converted).
        block: ``residual``, ``ffn``, ``alpha`` resolved against the variant's block.
        pos_embed: the position-embedding rule of the trunk it reads.
        projection: the variant's projection set (``ProjectionSpec``, CSA) or None.
        projection_given: the projection section as configured (for the result key).
        refine: PAMR's settings, or None.
        postprocess: ``none`` | ``pamr``.
        proxy: the proxy backbone's ``ProxySpec`` for variants that read one.
        proxy_given: the proxy section as configured, for those variants.
    """

    variant: Variant
    given: tuple = ()
    knobs: tuple = ()
    block: tuple = ()
    pos_embed: str = TRUNK_KNOBS[0].default
    projection: Any = None
    projection_given: tuple | None = None
    refine: refine.Refinement | None = None
    postprocess: str = "none"
    proxy: Any = None
    proxy_given: tuple | None = None

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def params(self) -> dict[str, Any]:
        """The bound own knobs, as the variant's function receives them."""
        return dict(self.knobs)

    @property
    def blocks(self) -> dict[str, Any]:
        return dict(self.block)

    def needs(self, depth: int) -> Needs:
        """The trunk features this head reads on a ``depth``-block tower."""
        params = self.params
        hidden = set(self.variant.hidden(params, depth))
        if self.proxy is not None and self.proxy.arch is None:  # clip_self: CLIP's own
            hidden.add(self.proxy.layer)
        return Needs(tuple(self.variant.borrows(params)), tuple(sorted(hidden)), self.proxy,
                     self.pos_embed, tuple(self.variant.features(params)))

    def check_depth(self, depth: int) -> None:
        """Raise ``ConfigError`` if a depth-bounded knob (a borrowed block, a path length,
        clip_self's layer) does not exist in a ``depth``-block model."""
        self.variant.bind({"name": self.name, **thaw(self.given)}, depth)
        if self.proxy is not None:
            from sclip_lab.proxy.spec import proxy_spec

            proxy_spec(self.variant, thaw(self.proxy_given), depth)

    # ------------------------------------------------------------- records and labels

    def key_sections(self) -> dict[str, Any]:
        """The result key's head parts: the attention (own knobs as configured, block and
        trunk knobs where they change the variant's), the projection section as configured
        and, for proxy variants only, the proxy section (other keys stay as they were)."""
        out = {"attention": self.variant.key_section({"name": self.name, **thaw(self.given)}),
               "projection": thaw(self.projection_given)}
        if self.variant.proxy:
            out["proxy"] = thaw(self.proxy_given)
        return out

    def summary(self) -> dict[str, Any]:
        """The head's summary fields: attention, projection set, every declared knob's
        field (this variant's as configured, null = its default; others None), block
        knobs resolved, proxy, post-processing."""
        given = thaw(self.given)
        fields = dict.fromkeys(knob_field_names())
        for knob in self.variant.knobs:
            keys = [k for k in (knob.name, *knob.aliases) if given.get(k) is not None]
            fields[knob.field] = record_value(given[keys[0]] if keys else knob.default)
        fields.update(self.block)
        projection = {"projection": None, "n": None, "trial": None}
        if self.projection is not None:
            projection = self.projection.summary()
            fields["combine"] = projection.pop("combine")
        proxy = (thaw(self.proxy_given) or {}).get("name") if self.variant.proxy else None
        return {"attention": self.name, **projection, **fields, "proxy": proxy,
                "postprocess": self.postprocess}

    def label_parts(self) -> list[str]:
        """What sets this head apart, in words: ``csa random n=16``, ``local kernel=5``,
        ``proxy dino_vitb8``, ``naclip pamr`` (knobs at their declared defaults, the
        variant's own block and trunk rule are not differences)."""
        given = thaw(self.given)
        parts = [self.name]
        if self.variant.proxy:
            proxy = thaw(self.proxy_given) or {}
            parts.append(str(proxy.get("name", "none")))
            parts += [f"layer={proxy['layer']}"] if proxy.get("layer") is not None else []
        if self.projection is not None:
            parts += self.projection.label()
        for knob in self.variant.knobs:
            keys = [k for k in (knob.name, *knob.aliases) if given.get(k) is not None]
            if keys and _differs(given[keys[0]], knob.default):
                parts.append(f"{knob.name}={_text(given[keys[0]])}")
        own = self.variant.block_defaults()
        parts += [f"{k.name}={_text(given[k.name])}" for k in BLOCK_KNOBS
                  if given.get(k.name) is not None and _differs(given[k.name], own[k.name])]
        if self.pos_embed != self.variant.pos_embed:
            parts.append(f"pos_embed={self.pos_embed}")
        parts += [self.postprocess] if self.postprocess != "none" else []
        return parts

    def label(self) -> str:
        return " ".join(self.label_parts())


def head_spec(attention: Mapping[str, Any], projection: Mapping[str, Any] | None = None,
              postprocess: Mapping[str, Any] | None = None,
              proxy: Mapping[str, Any] | None = None, *, depth: int | None = None,
              require_proxy: bool = True) -> HeadSpec:
    """Validate a head's config sections (or plain dicts) once -> ``HeadSpec``.

    Args:
        attention: ``cfg.attention``: ``name`` plus the variant's knobs, the block knobs
            (``residual``, ``ffn``, ``alpha``) and the trunk knob ``pos_embed``.
        projection: ``cfg.projection`` (variants that take one: CSA) or None.
        postprocess: ``cfg.postprocess`` (``none`` | ``pamr`` with steps, dilations).
        proxy: ``cfg.proxy``; required by variants that read a proxy backbone.
        depth: the model's block count, once known (depth-bounded knobs are checked then).
        require_proxy: False to describe a head without validating its proxy section (a
            record or a table row: weights files need not exist there); ``proxy`` is
            then None and ``proxy_given`` what was configured.

    Raises:
        ConfigError: one line naming the bad key and the fix.
    """
    section = {k: v for k, v in attention.items()}
    variant = get_variant(section.get("name"))
    if projection is not None and not variant.projection:
        raise ConfigError(f"attention={variant.name} has no projection; projection="
                          f"{projection['name']} applies to attention="
                          f"{'|'.join(_projection_variants())} only (drop the projection "
                          "override)")
    knobs, block = variant.bind(section, depth)
    rule = section.get("pos_embed") or variant.pos_embed
    proj = variant.projection(projection, knobs) if variant.projection else None
    refine, post = _refine(postprocess)
    proxy_spec_ = None
    if require_proxy and (variant.proxy or (proxy or {}).get("name", "none") not in
                          (None, "none")):
        from sclip_lab.proxy.spec import proxy_spec  # timm: only where a proxy is configured

        # validated for every head, so that a typo fails in any run, even unread
        proxy_spec_ = proxy_spec(variant, proxy, depth)
    return HeadSpec(variant, freeze({k: v for k, v in section.items() if k != "name"}),
                    freeze(knobs), freeze(block), str(rule), proj,
                    None if projection is None else freeze(dict(projection)), refine, post,
                    proxy_spec_, freeze(dict(proxy)) if variant.proxy and proxy else None)


def head_spec_of(config: Mapping[str, Any], *, depth: int | None = None,
                 require_proxy: bool = True) -> HeadSpec:
    """``head_spec`` of a composed config's (or a record's) head sections."""
    return head_spec(config["attention"], config.get("projection"), config.get("postprocess"),
                     config.get("proxy"), depth=depth, require_proxy=require_proxy)


def default_fields(attention: str, projection: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The summary fields of ``attention`` with nothing configured (its declared defaults;
    ``projection``: the section of its projection set, for variants that take one): what
    tables give a record that predates a field."""
    variant = get_variant(attention)
    section = dict(projection) if projection and variant.projection else None
    return head_spec({"name": attention}, section, require_proxy=False).summary()


def _projection_variants() -> list[str]:
    from sclip_lab.attention import ATTENTIONS

    return [name for name, v in ATTENTIONS.items() if v.projection]


def _refine(section: Mapping[str, Any] | None) -> tuple[refine.Refinement | None, str]:
    name = (section or {}).get("name", "none")
    if name == "none":
        return None, "none"
    if name not in POSTPROCESS:
        raise ConfigError(f"unknown postprocess={name!r}; choose {' or '.join(POSTPROCESS)}")
    if name == "tlp":
        return _tlp(section), name
    steps = integer(section.get("steps", 10), "postprocess.steps")
    dil = tuple(integer(d, "postprocess.dilations") for d in section["dilations"] or ())
    if steps < 1 or not dil or min(dil) < 1:
        raise ConfigError("postprocess=pamr needs steps ≥ 1 and dilations ≥ 1 "
                          f"(got steps={steps}, dilations={list(dil)})")
    return refine.PAMR(steps, dil), name


def _tlp(section: Mapping[str, Any]) -> refine.TLP:
    """``postprocess=tlp``'s knobs checked (conf/postprocess/tlp.yaml; refine.TLP)."""
    known = {"name", *(f.name for f in fields(refine.TLP))}
    if extra := sorted(set(section) - known):
        raise ConfigError(f"postprocess=tlp has no knob {extra[0]!r}; its knobs: "
                          f"{', '.join(sorted(known - {'name'}))}")
    default = refine.TLP()

    def get(key: str) -> Any:
        return section.get(key, getattr(default, key))

    agree = str(get("agree"))
    if agree not in ("diagonal", "matrix"):
        raise ConfigError(f"postprocess.agree={agree!r}: choose diagonal (the official "
                          "einsum) or matrix")
    return refine.TLP(
        grid=integer(get("grid"), "postprocess.grid", 1),
        tau_s=number(get("tau_s"), "postprocess.tau_s", above=0),
        diag_boost=number(get("diag_boost"), "postprocess.diag_boost", 0),
        edge=number(get("edge"), "postprocess.edge", 0),
        cg_iters=integer(get("cg_iters"), "postprocess.cg_iters", 0),
        tau=number(get("tau"), "postprocess.tau", 0),
        min_conf=number(get("min_conf"), "postprocess.min_conf", 0),
        agree=agree)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(record_value(list(value) if isinstance(value, Sequence)
                            and not isinstance(value, str) else value))


def _differs(value: Any, default: Any) -> bool:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return not isinstance(default, Sequence) or list(value) != list(default)
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) != float(default)
    return value != default


__all__ = ["BLOCK_NAMES", "HeadSpec", "Needs", "Pairs", "default_fields", "freeze", "head_spec",
           "head_spec_of", "knob_field_names", "thaw"]
