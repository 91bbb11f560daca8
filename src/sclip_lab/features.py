"""What the trunk hands a head: ``TrunkOutput`` and the named features beyond it.

A head reads, besides the last block's input ``x``, features of the same windows that
blocks 1…depth−1 or their output give. Three kinds are built in: ``early`` (a block's
vanilla attention map, ``early.<l>``) and ``hidden`` (the stream after block l,
``hidden.<l>``) are kept inside the block loop, since they need the blocks' inputs;
``proxy`` features come from a second backbone the segmenter loads. Any other kind is a
**feature provider**, registered beside the method that needs it::

    @register_feature("patch_norm")
    def patch_norm(ctx: FeatureContext, arg: str | None) -> Tensor:
        return ctx.x.norm(dim=-1)  # (B, N)

A feature is named ``kind`` or ``kind.arg`` (``patch_norm``, ``patch_norm.2``: the provider
gets ``arg``, a string or None). A variant declares the names it reads
(``register_attention(..., features=lambda knobs: ("patch_norm",))``) and finds them in
``AttentionInputs.named``. The segmenter computes each name once per window batch for all
heads that declare it, and only then; the trunk cache stores it as ``g.<name>`` (a provider
registered with ``cache=False`` is recomputed on every run).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from sclip_lab.pos_embed import DEFAULT_POS_EMBED

BUILTIN_KINDS = ("early", "hidden", "proxy")
RESERVED = ("x", *BUILTIN_KINDS)  # names an entry of the trunk cache already uses
_NAME = re.compile(r"[A-Za-z_]\w*(\.[\w+=-]+)*")  # kind[.arg]; also a safetensors key part


@dataclass
class TrunkOutput:
    """Blocks 1…depth−1 applied to a window batch.

    Attributes:
        x: ``(B, N, D)`` input of the last block.
        grid: ``(h, w)`` patch grid.
        early: layer (1-indexed) -> ``(B, heads, N, N)`` vanilla attention map of that block.
        hidden: layer l -> ``(B, N, D)`` stream after block l (0: after ln_pre).
        images: ``(B, 3, H, W)`` the normalised windows themselves (crop-level refinement).
        proxy: proxy spec -> ``(B, C, Hv, Wv)`` that proxy backbone's window features.
        pos_embed: the position-embedding rule it was embedded by (heads read their own).
        named: feature name -> ``(B, ...)`` a provider's feature of these windows.
    """

    x: Tensor
    grid: tuple[int, int]
    early: dict[int, Tensor] = field(default_factory=dict)
    hidden: dict[int, Tensor] = field(default_factory=dict)
    images: Tensor | None = None
    proxy: dict[Any, Tensor] = field(default_factory=dict)
    pos_embed: str = DEFAULT_POS_EMBED
    named: dict[str, Tensor] = field(default_factory=dict)

    def select(self, start: int, stop: int) -> TrunkOutput:
        """Windows ``start:stop`` of the batch (every per-window tensor alike)."""
        rows = {f: {k: v[start:stop] for k, v in getattr(self, f).items()} for f in _MAPS}
        images = None if self.images is None else self.images[start:stop]
        return replace(self, x=self.x[start:stop], images=images, **rows)

    @staticmethod
    def cat(parts: Sequence[TrunkOutput]) -> TrunkOutput:
        """Window batches of the same grid, concatenated."""
        maps = {f: {k: torch.cat([getattr(p, f)[k] for p in parts])
                    for k in getattr(parts[0], f)} for f in _MAPS}
        images = None if any(p.images is None for p in parts) else torch.cat(
            [p.images for p in parts])
        return replace(parts[0], x=torch.cat([p.x for p in parts]), images=images, **maps)


_MAPS = ("early", "hidden", "proxy", "named")  # TrunkOutput's per-window mappings


@dataclass(frozen=True)
class FeatureContext:
    """What a provider sees of a window batch after blocks 1…depth−1.

    Attributes:
        x: ``(B, N, D)`` the last block's input.
        grid: ``(h, w)`` patch grid; tokens are CLS then the grid row-major.
        hidden: layer l -> ``(B, N, D)``: the hidden states the trunk kept (those some head
            declared with ``hidden=``).
        images: ``(B, 3, H, W)`` the normalised windows, or None.
        encoder: the ``DenseEncoder`` (its ``visual`` tower: blocks, ln_post, proj).
    """

    x: Tensor
    grid: tuple[int, int]
    hidden: Mapping[int, Tensor]
    images: Tensor | None
    encoder: Any


@dataclass(frozen=True)
class FeatureProvider:
    """A registered kind: ``fn(ctx, arg) -> (B, ...)``; ``cache``: the trunk cache stores it."""

    kind: str
    fn: Callable[[FeatureContext, str | None], Tensor]
    cache: bool = True


PROVIDERS: dict[str, FeatureProvider] = {}


def register_feature(kind: str, fn: Callable | None = None, *, cache: bool = True):
    """Register the provider of the features named ``kind`` / ``kind.<arg>``: as a call
    (``register_feature("toy", fn)``) or a decorator (``@register_feature("toy")``).

    ``fn(ctx: FeatureContext, arg: str | None) -> (B, ...)`` runs on a window batch after
    blocks 1…depth−1; a floating result is cast to the trunk's dtype (as ``x``), so that a
    feature read from the trunk cache equals a computed one. ``cache=False``: never stored
    (a feature cheaper to compute than to read, or one that must stay fresh).

    Example:
        >>> _ = register_feature("doc_mean", lambda ctx, arg: ctx.x.mean(-1))
        >>> provider("doc_mean").cache
        True
        >>> del PROVIDERS["doc_mean"]
    """
    if kind in RESERVED or not re.fullmatch(r"[A-Za-z_]\w*", kind):
        raise ValueError(f"feature kind {kind!r}: an identifier other than {list(RESERVED)}")

    def wrap(f: Callable) -> Callable:
        if kind in PROVIDERS:
            raise KeyError(f"feature '{kind}' is already registered")
        PROVIDERS[kind] = FeatureProvider(kind, f, cache)
        return f

    return wrap if fn is None else wrap(fn)


def split_name(name: str) -> tuple[str, str | None]:
    """``"kind.arg"`` -> ``("kind", "arg")``; ``"kind"`` -> ``("kind", None)``."""
    kind, _, arg = name.partition(".")
    return kind, arg or None


def provider(name: str) -> FeatureProvider:
    """The provider of a feature name (``kind`` or ``kind.arg``).

    Raises:
        ValueError: a built-in kind (declared with ``borrows=``/``hidden=``/``proxy=``),
            a malformed name, or no provider of that kind registered.
    """
    kind, _ = split_name(name)
    if kind in BUILTIN_KINDS:
        raise ValueError(f"feature {name!r} is built in: declare it with register_attention's "
                         "borrows= / hidden= / proxy=, not features=")
    if not _NAME.fullmatch(name) or kind not in PROVIDERS:
        raise ValueError(f"no feature provider for {name!r}; registered kinds: "
                         f"{sorted(PROVIDERS)} (register_feature beside the method)")
    return PROVIDERS[kind]


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    """Declared feature names, each with a provider, without repeats, in order."""
    names = tuple(dict.fromkeys(names))
    for name in names:
        provider(name)
    return names


def cached_names(names: Iterable[str]) -> tuple[str, ...]:
    """Those of ``names`` the trunk cache stores: of a provider registered here with
    ``cache=True`` (an entry's names of other providers are left out)."""
    return tuple(n for n in names if getattr(PROVIDERS.get(split_name(n)[0]), "cache", False))


def compute(names: Iterable[str], ctx: FeatureContext) -> dict[str, Tensor]:
    """name -> ``(B, ...)`` its provider's feature of the batch in ``ctx``.

    Raises:
        ValueError: a provider's result is not batch-aligned with ``ctx.x``.
    """
    out = {}
    for name in names:
        value = provider(name).fn(ctx, split_name(name)[1])
        if not isinstance(value, Tensor) or value.ndim == 0 or len(value) != len(ctx.x):
            raise ValueError(f"feature provider {name!r} must return a (B, ...) tensor with "
                             f"B={len(ctx.x)} windows, got {getattr(value, 'shape', value)}")
        out[name] = value.to(ctx.x.dtype) if value.is_floating_point() else value
    return out


def context(trunk: TrunkOutput, encoder: Any) -> FeatureContext:
    """A provider's view of ``trunk``'s windows."""
    return FeatureContext(trunk.x, trunk.grid, trunk.hidden, trunk.images, encoder)


def add_features(trunk: TrunkOutput, names: Sequence[str], encoder: Any, batch: int
                 ) -> None:
    """Compute ``names`` (those ``trunk`` lacks) on its windows, ``batch`` at a time, into
    ``trunk.named``: the features the trunk cache does not hold."""
    todo = [n for n in names if n not in trunk.named]
    if not todo:
        return
    parts = [compute(todo, context(trunk.select(s, s + batch), encoder))
             for s in range(0, len(trunk.x), batch)]
    trunk.named.update({n: torch.cat([p[n] for p in parts]) for n in todo})
