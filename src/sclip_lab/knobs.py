"""The contract of a last-block variant: its declared knobs and the block around it.

A variant (``sclip_lab.attention``) declares each knob beside its function: name, kind,
default and valid range. Building a head binds a config section against these
declarations, once, generically: an unknown knob, a wrong type or an out-of-range value is
one ``ConfigError`` that names the variant's knobs. Result keys, summary rows and table
matching read the same declarations (``key_section``, ``summary_fields``).

Every variant also accepts the block knobs (``BLOCK_KNOBS``): ``residual``, ``ffn`` and
``alpha`` decide what surrounds the attention output ``o = out_proj(A v)``::

    x' = (x + alpha·o) if residual else alpha·o
    x' = x' + MLP(LN2(x')) if ffn

and the trunk knob (``TRUNK_KNOBS``): ``pos_embed``, how the trunk resizes the position
table to another patch grid (``sclip_lab.pos_embed``). Heads of different rules read
different trunk passes; it enters a result key only where it is not the default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sclip_lab.errors import ConfigError, closest
from sclip_lab.errors import number as to_number
from sclip_lab.pos_embed import DEFAULT_POS_EMBED, POS_EMBED_RULES

KINDS = ("int", "float", "bool", "choice", "terms", "floats")
DEPTH = "depth"  # a knob's ``high``: the model's number of blocks
TRUNK_DEPTH = "depth-1"  # a knob's ``high``: the blocks before the last


@dataclass(frozen=True)
class Knob:
    """One declared parameter of a variant.

    Attributes:
        name: the key under ``attention.`` (and the keyword of the variant's function).
        kind: ``int``, ``float``, ``bool``, ``choice`` (one of ``choices``), ``terms`` (a
            non-empty list of ``choices``) or ``floats`` (a number, or one per term).
        default: the value a missing or null key takes.
        doc: one line for error messages and the README's variant table.
        low / above / high: inclusive lower, exclusive lower, inclusive upper bound;
            ``high="depth"`` is the model's block count.
        odd: integers must be odd.
        choices: the allowed strings of ``choice`` and ``terms``.
        nullable: null is a value of its own (not "the default").
        record_as: the field name in records and result keys (older records' name).
        aliases: older key names still accepted in a section.
    """

    name: str
    kind: str
    default: Any
    doc: str = ""
    low: float | None = None
    above: float | None = None
    high: int | str | None = None
    odd: bool = False
    choices: tuple[str, ...] = ()
    nullable: bool = False
    record_as: str | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"knob {self.name}: kind {self.kind!r} not in {KINDS}")

    @property
    def field(self) -> str:
        return self.record_as or self.name

    def rule(self, depth: int | None = None) -> str:
        """What a valid value is, in words: ``an odd integer ≥ 1``, ``a number > 0``."""
        if self.kind in ("choice", "terms"):
            return ("one of " if self.kind == "choice" else "a list of ") + "|".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        words = ["an odd integer" if self.odd else "an integer" if self.kind == "int"
                 else "a number" + (" or one per term" if self.kind == "floats" else "")]
        high = self._high(depth)
        if self.above is not None:
            words.append(f"> {self.above:g}")
        if self.low is not None:
            words.append(f"≥ {self.low:g}")
        if high is not None:
            words.append(f"≤ {high}")
        return " ".join(words) + (" or null" if self.nullable else "")

    def _high(self, depth: int | None) -> int | float | str | None:
        if self.high in (DEPTH, TRUNK_DEPTH):  # unknown before the model is loaded
            return None if depth is None else depth - (self.high == TRUNK_DEPTH)
        return self.high

    def describe(self) -> str:
        """``name (rule, default d)`` for listings."""
        return f"{self.name} ({self.rule()}, default {self.default})"

    def bind(self, value: Any, where: str, depth: int | None = None, given_as: str = ""
             ) -> Any:
        """``value`` checked and converted; None takes the default unless ``nullable``.
        Messages name the key as ``where.given_as`` (an alias the user wrote)."""
        if value is None:
            if self.nullable or self.default is None:
                return None if self.nullable else self.default
            value = self.default  # checked too: a block default may not exist in this model
        key = f"{where}.{given_as or self.name}"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r} is not true/false")
            return value
        if self.kind == "choice":
            if str(value) not in self.choices:
                raise ConfigError(f"{key}={value!r}; choose one of {list(self.choices)}")
            return str(value)
        if self.kind == "terms":
            terms = [value] if isinstance(value, str) else list(value)
            if not terms:
                raise ConfigError(f"{key}=[] is empty; give at least one of "
                                  f"{list(self.choices)}, e.g. {key}=[{self.choices[0]}]")
            bad = [t for t in terms if str(t) not in self.choices]
            if bad:
                raise ConfigError(f"{key} has unknown term {bad[0]!r}; the terms are "
                                  f"{list(self.choices)}")
            return tuple(str(t) for t in terms)
        if self.kind == "floats" and not isinstance(value, (int, float, str)):
            return tuple(self._number(v, key, depth) for v in value)
        return self._number(value, key, depth)

    def _number(self, value: Any, key: str, depth: int | None) -> float | int:
        number = to_number(value, key)  # "attention.τ=hot must be a finite number"
        if self.kind == "int":
            if number != int(number):
                raise ConfigError(f"{key}={value} is not an integer")
            number = int(number)
        high = self._high(depth)
        if ((self.low is not None and number < self.low)
                or (self.above is not None and number <= self.above)
                or (high is not None and number > high)
                or (self.odd and number % 2 == 0)):
            raise ConfigError(f"{key}={value} is out of range: {self.name} must be "
                              f"{self.rule(depth)}")
        return number


BLOCK_KNOBS = (
    Knob("residual", "bool", None, "add the attention output to the block input"),
    Knob("ffn", "bool", None, "apply the block's MLP (on x + o, or on o alone)"),
    Knob("alpha", "float", 1.0, "scale of the attention output o", above=0),
)
BLOCK_NAMES = tuple(k.name for k in BLOCK_KNOBS)
# What every variant accepts about the trunk it reads (null = the default): set by the
# presets of methods whose official code resizes the position table another way.
TRUNK_KNOBS = (
    Knob("pos_embed", "choice", DEFAULT_POS_EMBED, "how the position table is resized to "
         "another patch grid (docs/protocol.md §1)", choices=POS_EMBED_RULES),
)
TRUNK_NAMES = tuple(k.name for k in TRUNK_KNOBS)


@dataclass(frozen=True)
class BindContext:
    """What a variant's ``prepare`` hook may read beyond its own knobs."""

    attn: Any  # the last block's nn.MultiheadAttention (weights of W_q, W_k, …)
    projection: Mapping[str, Any] | None = None
    learned: tuple[Tensor, Tensor | None] | None = None


@dataclass(frozen=True)
class Variant:
    """A registered last-block variant.

    Attributes:
        name: registry key (``attention=<name>``).
        fn: ``(AttentionInputs, **knobs) -> (B, heads, N, N)`` attention matrix.
        knobs: its own declared knobs (the block knobs come on top).
        residual / ffn: the block around it by default (ClearCLIP and NACLIP drop both).
        doc: one line for listings.
        borrows: bound knobs -> blocks (1-indexed) whose vanilla maps it reads.
        hidden: (bound knobs, model depth D) -> trunk hidden states it reads (``h_l`` after
            block l, l ≤ D − 1; 0 is the embedding after ln_pre).
        prepare: bound knobs, context -> the keyword arguments of ``fn`` (cross-checks,
            weights such as CSA's projection set).
        projection: ``(projection section | None, bound knobs) -> spec`` for a variant that
            reads the ``projection`` group (CSA: ``ProjectionSpec``, with ``summary()`` and
            ``label()``), else None.
        pos_embed: the position-embedding rule of its official code (``TRUNK_KNOBS``).
        output: ``attention`` (fn returns A) or ``tokens`` (fn returns the last block's
            output ``(B, N, D)`` itself: multi-block paths such as CLIP Surgery's).
        readout: ``(feats (B, N, E) unit rows incl. CLS, queries (Q, E), **knobs) ->
            (B, h·w, Q)`` patch logits, instead of the patches' cosine (logit hooks); one
            that names ``query_class`` also gets the ``(Q,)`` class of each query.
        maps: for ``tokens`` variants, ``(inputs, **knobs) -> (B, heads, N, N)``: the last
            block's attention on their path, for figures.
        proxy: reads a proxy backbone's features (``AttentionInputs.proxy``, the ``proxy``
            group); its tokens, and so its logits, lie on the proxy's grid.
        features: bound knobs -> the named trunk features it reads (``kind`` or
            ``kind.arg``, each of a provider registered with ``sclip_lab.features``), found
            in ``AttentionInputs.named``.
        requires: what it needs of a backbone beyond the last block's q/k/v and the
            grid: ``cls`` (a CLS token), ``blocks`` (open_clip's residual blocks, for paths
            over several blocks), ``hidden``; each encoder's ``provides`` is checked against
            it when a head is built (``heads.last_block_of``).
    """

    name: str
    fn: Callable[..., Tensor]
    knobs: tuple[Knob, ...] = ()
    residual: bool = True
    ffn: bool = True
    doc: str = ""
    borrows: Callable[[Mapping[str, Any]], tuple[int, ...]] = field(default=lambda p: ())
    hidden: Callable[[Mapping[str, Any], int], tuple[int, ...]] = field(
        default=lambda p, depth: ())
    prepare: Callable[[dict, BindContext], dict] | None = None
    projection: Callable[[Mapping[str, Any] | None, Mapping[str, Any]], Any] | None = None
    output: str = "attention"
    readout: Callable[..., Tensor] | None = None
    maps: Callable[..., Tensor] | None = None
    proxy: bool = False
    features: Callable[[Mapping[str, Any]], tuple[str, ...]] = field(default=lambda p: ())
    pos_embed: str = DEFAULT_POS_EMBED
    requires: frozenset[str] = frozenset()

    def attention_map(self, inputs: Any, params: Mapping[str, Any]) -> Tensor:
        """``(B, heads, N, N)``: the last block's attention under this variant."""
        if self.output == "attention":
            return call_with(self.fn, inputs, knobs=params)
        if self.maps is None:
            raise ConfigError(f"attention={self.name} computes its output over several "
                              "blocks and draws no single attention map")
        return call_with(self.maps, inputs, knobs=params)

    def knob(self, key: str) -> Knob | None:
        for k in self.knobs:
            if key == k.name or key in k.aliases:
                return k
        return None

    def block_defaults(self) -> dict[str, Any]:
        return {"residual": self.residual, "ffn": self.ffn, "alpha": 1.0}

    def knob_list(self) -> str:
        own = ", ".join(k.describe() for k in self.knobs) or "none of its own"
        return f"{own}; every variant: residual, ffn, alpha, pos_embed"

    def unknown_knob(self, key: str) -> str:
        """The message for ``attention.<key>`` that this variant does not declare."""
        near = closest(key, [n for k in self.knobs for n in (k.name, *k.aliases)]
                       + [*BLOCK_NAMES, *TRUNK_NAMES])
        fix = f"; did you mean attention.{near}?" if near else f" (drop attention.{key})"
        return f"attention={self.name} has no knob {key!r}; its knobs: {self.knob_list()}{fix}"

    def bind(self, section: Mapping[str, Any], depth: int | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(knobs, block)`` of a config section (``name`` plus knobs; null = default)."""
        where = f"attention={self.name}"
        given = {k: v for k, v in section.items() if k != "name"}
        for key in given:
            if (self.knob(key) is None and key not in (*BLOCK_NAMES, *TRUNK_NAMES)
                    and given[key] is not None):
                raise ConfigError(self.unknown_knob(key))
        knobs = {}
        try:
            for k in self.knobs:
                keys = [key for key in (k.name, *k.aliases) if key in given]
                knobs[k.name] = k.bind(given[keys[0]] if keys else None, "attention", depth,
                                       keys[0] if keys else "")
            block = {k.name: k.bind(given.get(k.name), "attention") for k in BLOCK_KNOBS}
            for k in TRUNK_KNOBS:  # checked here; null is the variant's own (head_spec)
                k.bind(given.get(k.name), "attention")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        defaults = self.block_defaults()
        block = {name: defaults[name] if value is None else value
                 for name, value in block.items()}
        return knobs, block

    def key_section(self, section: Mapping[str, Any]) -> dict[str, Any]:
        """The attention part of a result key: the name, own knobs as configured (under
        their record names), block knobs only where they change this variant's block, trunk
        knobs only where they are not the default.

        Old records were keyed by the own knobs alone, so their keys stay valid."""
        out: dict[str, Any] = {"name": self.name}
        defaults = self.block_defaults()
        for key, value in section.items():
            knob = self.knob(key)
            if knob is not None:
                out[knob.field] = value
            elif key in BLOCK_NAMES and value is not None and (
                    float(value) != float(defaults[key]) if key == "alpha"
                    else value != defaults[key]):
                out[key] = value
        value = section.get("pos_embed") or self.pos_embed  # its own rule, unless overridden
        if value != TRUNK_KNOBS[0].default:
            out["pos_embed"] = value
        return out


def call_with(fn: Callable[..., Any], *args: Any, knobs: Mapping[str, Any]) -> Any:
    """``fn(*args, **knobs)`` restricted to the knobs ``fn`` names (all with ``**kwargs``),
    so a variant's attention function and its readout hook each take only their own."""
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        knobs = {k: v for k, v in knobs.items() if k in names}
    return fn(*args, **knobs)


def record_value(value: Any) -> Any:
    """A knob value as a flat record cell: lists join with ``+`` (``qq+kk``)."""
    if isinstance(value, (list, tuple)):
        return "+".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


def summary_fields(variants: Sequence[Variant]) -> tuple[str, ...]:
    """Every knob's record field, in registration order, then the block knobs."""
    names = dict.fromkeys(k.field for v in variants for k in v.knobs)
    return (*names, *BLOCK_NAMES)
