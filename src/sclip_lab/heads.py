"""A validated head on a model: ``HeadSpec`` + ``DenseEncoder`` -> ``Head`` (the last block
with its knobs bound and prepared, and the refinement). ``build_last_block`` / ``build_head``
go straight from config sections, through ``head_spec``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from sclip_lab import refine
from sclip_lab.errors import ConfigError
from sclip_lab.head_spec import HeadSpec, head_spec
from sclip_lab.knobs import BindContext
from sclip_lab.model import DenseEncoder, LastBlock

# Why a backbone cannot host a method, per missing need (Variant.requires).
NEED_WORDS = {"cls": "reads the CLS token", "blocks": "runs its own path over open_clip's "
              "residual blocks", "hidden": "reads the trunk's hidden states",
              "qkv": "reads the last block's per-head q/k/v", "grid": "needs a patch grid"}


def check_backbone(spec: HeadSpec, encoder: DenseEncoder) -> None:
    """One ConfigError line where ``encoder`` lacks what ``spec``'s variant requires."""
    provides = getattr(encoder, "provides", None)
    if provides is None:
        return
    missing = sorted(spec.variant.requires - provides)
    if missing:
        tower = getattr(encoder, "kind", type(encoder.visual).__name__)
        why = "; ".join(NEED_WORDS.get(m, m) for m in missing)
        raise ConfigError(f"attention={spec.variant.name} {why}, which the {tower} tower lacks "
                          f"(no {', '.join(missing)}); run it on an OpenAI/OpenCLIP ViT preset "
                          "(model=vit_b16_openai)")


def last_block_of(spec: HeadSpec, encoder: DenseEncoder,
                  learned: tuple[Tensor, Tensor | None] | None = None) -> LastBlock:
    """A validated head's last block on ``encoder``: its depth-bounded knobs checked
    against the model, its ``needs`` of the trunk, the variant's ``prepare`` hook run
    (CSA's projection matrices; ``learned``: the trained (W, b) of ``projection=learned``)."""
    check_backbone(spec, encoder)
    spec.check_depth(encoder.depth)
    needs = spec.needs(encoder.depth)
    knobs = spec.params
    if spec.variant.prepare is not None:
        block_attn = encoder.bind_attn
        knobs = spec.variant.prepare(knobs, BindContext(block_attn, spec.projection, learned))
    return LastBlock(spec.variant, knobs, needs.early, needs.hidden, **spec.blocks,
                     proxy=needs.proxy, pos_embed=needs.pos_embed, features=needs.features)


@dataclass(frozen=True)
class Head:
    """What differs between variants that share a trunk: the last block and refinement,
    and the validated spec they were built from."""

    last: LastBlock
    refine: refine.Refinement | None = None
    spec: HeadSpec | None = None


def head_of(spec: HeadSpec, encoder: DenseEncoder,
            learned: tuple[Tensor, Tensor | None] | None = None) -> Head:
    """``spec``'s head on ``encoder``."""
    return Head(last_block_of(spec, encoder, learned), spec.refine, spec)


def build_last_block(attention: Mapping[str, Any], projection: Mapping[str, Any] | None,
                     encoder: DenseEncoder,
                     learned: tuple[Tensor, Tensor | None] | None = None,
                     proxy: Mapping[str, Any] | None = None) -> LastBlock:
    """``last_block_of(head_spec(attention, projection, proxy=proxy))``: a last block
    straight from config sections (tests, figures)."""
    return last_block_of(head_spec(attention, projection, proxy=proxy, depth=encoder.depth),
                         encoder, learned)


def build_head(attention: Mapping[str, Any], projection: Mapping[str, Any] | None,
               postprocess: Mapping[str, Any] | None, encoder: DenseEncoder,
               learned: tuple[Tensor, Tensor | None] | None = None,
               proxy: Mapping[str, Any] | None = None) -> Head:
    """``head_of(head_spec(...))``: a head straight from config sections."""
    return head_of(head_spec(attention, projection, postprocess, proxy, depth=encoder.depth),
                   encoder, learned)


def trunk_needs(lasts: Iterable[LastBlock], depth: int
                ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]:
    """What one trunk pass must keep for all of ``lasts`` on a ``depth``-block tower, each
    once: the borrowed maps of blocks before the last (the last block's own is computed
    with the head), the hidden states, the named features."""
    lasts = list(lasts)
    early = sorted({i for last in lasts for i in last.early_layers if i < depth})
    hidden = sorted({i for last in lasts for i in last.hidden_layers})
    names = sorted({n for last in lasts for n in last.features})
    return tuple(early), tuple(hidden), tuple(names)


__all__ = ["Head", "build_head", "build_last_block", "check_backbone", "head_of",
           "last_block_of"]
