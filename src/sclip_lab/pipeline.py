"""Assemble the rooms into a segmenter: image -> windows -> trunk -> last block -> logits
-> post-process. ``build_*`` functions unpack config sections into explicit arguments;
nothing below them sees a config.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sclip_lab import attention as attn
from sclip_lab import segment
from sclip_lab.errors import ConfigError, integer
from sclip_lab.knobs import BindContext, bind_trunk
from sclip_lab.model import DenseEncoder, LastBlock, TrunkOutput, clip_from_section
from sclip_lab.pos_embed import DEFAULT_POS_EMBED
from sclip_lab.preprocess import Preprocess
from sclip_lab.proxy import ProxyBackbone, load_proxy, proxy_spec, window_features
from sclip_lab.text import classifier, split_queries
from sclip_lab.trunk_cache import TrunkCache

log = logging.getLogger(__name__)


def build_refine(section: Mapping[str, Any] | None) -> segment.Refine | None:
    name = (section or {}).get("name", "none")
    if name == "none":
        return None
    if name != "pamr":
        raise ConfigError(f"unknown postprocess={name!r}; choose none or pamr")
    steps = integer(section.get("steps", 10), "postprocess.steps")
    dil = tuple(integer(d, "postprocess.dilations") for d in section["dilations"] or ())
    if steps < 1 or not dil or min(dil) < 1:
        raise ConfigError("postprocess=pamr needs steps ≥ 1 and dilations ≥ 1 "
                          f"(got steps={steps}, dilations={list(dil)})")
    return segment.Refine(steps, dil)


def _variant(attention: Mapping[str, Any], projection: Mapping[str, Any] | None):
    variant = attn.get_variant(attention.get("name"))
    if projection is not None and not variant.projection:
        raise ConfigError(f"attention={variant.name} has no projection; projection="
                          f"{projection['name']} applies to attention=csa only (drop the "
                          "projection override)")
    return variant


def check_head(attention: Mapping[str, Any], projection: Mapping[str, Any] | None,
               postprocess: Mapping[str, Any] | None,
               proxy: Mapping[str, Any] | None = None) -> None:
    """What a head's config can be checked for before the model exists (knob types and
    ranges, the projection set, post-processing, the proxy): bad values fail in the first
    second."""
    variant = _variant(attention, projection)
    variant.bind(attention, None)
    if variant.projection:
        attn.check_projection(projection, attention.get("combine"))
    build_refine(postprocess)
    proxy_spec(variant, proxy)


def build_last_block(attention: Mapping[str, Any], projection: Mapping[str, Any] | None,
                     encoder: DenseEncoder,
                     learned: tuple[Tensor, Tensor | None] | None = None,
                     proxy: Mapping[str, Any] | None = None) -> LastBlock:
    """Validate an attention section against its variant's declared knobs and bind them.

    Args:
        attention: ``cfg.attention`` (``name``, the variant's knobs, the block knobs).
        projection: ``cfg.projection`` or None (variants that take one: csa).
        encoder: the dense encoder whose last block supplies W_q / W_k.
        learned: the trained (W, b) for ``projection=learned``.
        proxy: ``cfg.proxy``, read by proxy variants (ProxyCLIP).
    """
    variant = _variant(attention, projection)
    knobs, block = variant.bind(attention, encoder.depth)  # checks the trunk knobs too
    borrowed = tuple(variant.borrows(knobs))
    hidden = tuple(variant.hidden(knobs, encoder.depth))
    spec = proxy_spec(variant, proxy, encoder.depth)
    if spec is not None and spec.arch is None:  # clip_self: CLIP's own hidden state
        hidden = tuple(sorted({*hidden, spec.layer}))
    if variant.prepare is not None:
        block_attn = encoder.visual.transformer.resblocks[-1].attn
        knobs = variant.prepare(knobs, BindContext(block_attn, projection, learned))
    return LastBlock(variant, knobs, borrowed, hidden, **block, proxy=spec,
                     **bind_trunk(attention))


@dataclass(frozen=True)
class Head:
    """What differs between variants that share a trunk: the last block and refinement."""

    last: LastBlock
    refine: segment.Refine | None = None


def build_head(attention: Mapping[str, Any], projection: Mapping[str, Any] | None,
               postprocess: Mapping[str, Any] | None, encoder: DenseEncoder,
               learned: tuple[Tensor, Tensor | None] | None = None,
               proxy: Mapping[str, Any] | None = None) -> Head:
    """A variant's last block and refinement, validated."""
    return Head(build_last_block(attention, projection, encoder, learned, proxy),
                build_refine(postprocess))


@dataclass
class WindowGroup:
    """Equal-size windows of several images, through blocks 1…depth−1.

    Attributes:
        owners: per window, (image index, box ``(y1, y2, x1, x2)``).
        trunk: their trunk outputs, ``x`` of shape ``(len(owners), N, D)``.
    """

    owners: list[tuple[int, tuple[int, int, int, int]]]
    trunk: TrunkOutput


@dataclass
class Segmenter:
    """Image(s) -> logits and class maps, for one or several last-block variants.

    Blocks 1…depth−1 run once per window (``encode``); each variant's head then reuses
    them (``stitched``). ``heads[0]`` is the default variant of ``logits``/``predict``.
    """

    encoder: DenseEncoder
    heads: list[Head]
    queries: Tensor  # (Q, E) normalised text embeddings
    post: segment.PostProcess
    prep: Preprocess
    batch_size: int = 16
    trunk_cache: TrunkCache | None = None  # blocks 1…depth−1 on disk: speed only
    proxies: dict[Any, ProxyBackbone | None] = field(default_factory=dict)  # spec -> backbone
    # fp32 scratch for one image's stitched logits on CPU, reused (iter_class_maps)
    scratch: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def early_layers(self, heads: Sequence[Head]) -> tuple[int, ...]:
        """Trunk blocks whose attention maps some head borrows (the last block's is free)."""
        return tuple(sorted({i for h in heads for i in h.last.early_layers
                             if i < self.encoder.depth}))

    def hidden_layers(self, heads: Sequence[Head]) -> tuple[int, ...]:
        """Trunk hidden states some head reads (multi-block paths, mid-layer features)."""
        return tuple(sorted({i for h in heads for i in h.last.hidden_layers}))

    def add_proxy(self, head: Head) -> None:
        """Load the proxy backbone ``head`` reads (once per spec; heads share it)."""
        spec = head.last.proxy
        if spec is not None and spec not in self.proxies:
            self.proxies[spec] = load_proxy(spec, self.device, self.encoder.dtype)

    def head_trunks(self, images: Sequence[Tensor], heads: Sequence[Head]
                    ) -> Iterator[tuple[Head, list[WindowGroup]]]:
        """Each of ``heads`` in order with its trunk's window groups: one pass per
        position-embedding rule, shared by the heads of that rule and dropped after the
        last of them."""
        rules = [h.last.pos_embed for h in heads]
        passes: dict[str, list[WindowGroup]] = {}
        for i, (head, rule) in enumerate(zip(heads, rules)):
            if rule not in passes:
                passes[rule] = self.encode_heads(images, [h for h in heads
                                                          if h.last.pos_embed == rule])
            yield head, passes[rule]
            if rule not in rules[i + 1:]:
                del passes[rule]

    @torch.no_grad()
    def encode_heads(self, images: Sequence[Tensor], heads: Sequence[Head]
                     ) -> list[WindowGroup]:
        """``encode`` with everything ``heads`` (of one position-embedding rule) read:
        borrowed maps, hidden states and the proxies' window features (each proxy once per
        window, shared by its heads)."""
        (rule,) = {h.last.pos_embed for h in heads}
        groups = self.encode(images, self.early_layers(heads), self.hidden_layers(heads), rule)
        for spec in dict.fromkeys(h.last.proxy for h in heads if h.last.proxy is not None):
            for g in groups:
                g.trunk.proxy[spec] = window_features(
                    spec, self.proxies[spec], g.trunk, (
                        self.crops(images, g.owners[i:i + self.batch_size])
                        for i in range(0, len(g.owners), self.batch_size)))
        return groups

    def crops(self, images: Sequence[Tensor], owners: Sequence) -> Tensor:
        """``(B, 3, h, w)`` the windows ``owners`` (image index, box) on the device."""
        return torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2)
                            in owners]).to(self.device)

    @torch.no_grad()
    def encode(self, images: Sequence[Tensor], early_layers: Sequence[int] = (),
               hidden_layers: Sequence[int] = (), pos_embed: str = DEFAULT_POS_EMBED
               ) -> list[WindowGroup]:
        """Trunk outputs of every sliding window of ``images`` (each ``(3, Hr, Wr)``),
        batched across images by window size, keeping ``early_layers``' attention maps and
        ``hidden_layers``' hidden states, embedded by the rule ``pos_embed``. With a
        ``trunk_cache``, images met before are read from it (the same groups and values;
        each rule its own entries), the others computed and stored."""
        if self.trunk_cache is None:
            return self.trunk_pass(images, early_layers, hidden_layers, pos_embed)
        tag = "" if pos_embed == DEFAULT_POS_EMBED else f"pos_embed={pos_embed}"
        return [WindowGroup(owners, replace(trunk, pos_embed=pos_embed))
                for owners, trunk in self.trunk_cache.encode(
                    images, self.prep.boxes, early_layers, hidden_layers,
                    partial(self.trunk_pass, pos_embed=pos_embed), self.device, tag)]

    @torch.no_grad()
    def trunk_pass(self, images: Sequence[Tensor], early_layers: Sequence[int] = (),
                   hidden_layers: Sequence[int] = (), pos_embed: str = DEFAULT_POS_EMBED
                   ) -> list[WindowGroup]:
        """``encode`` without the cache: blocks 1…depth−1 on every window."""
        owners: dict[tuple[int, int], list] = {}
        for i, img in enumerate(images):
            boxes = self.prep.boxes(img.shape[1], img.shape[2])
            for size, group in segment.group_by_size(boxes).items():
                owners.setdefault(size, []).extend((i, box) for box in group)
        groups = []
        for members in owners.values():
            parts = []
            for start in range(0, len(members), self.batch_size):
                crops = self.crops(images, members[start:start + self.batch_size])
                parts.append(self.encoder.trunk(crops, early_layers, hidden_layers,
                                                pos_embed))
            groups.append(WindowGroup(members, TrunkOutput.cat(parts)))
        return groups

    @torch.no_grad()
    def window_logits(self, groups: Sequence[WindowGroup], num_images: int, head: Head
                      ) -> list[dict[tuple[int, int, int, int], Tensor]]:
        """Per image, box -> ``(Q, gh, gw)`` patch-grid logits under ``head``'s last block
        (``groups``: a trunk of its rule)."""
        windows: list[dict] = [{} for _ in range(num_images)]
        for g in groups:
            for start in range(0, len(g.owners), self.batch_size):
                chunk = g.owners[start:start + self.batch_size]
                trunk = g.trunk.select(start, start + len(chunk))
                logits = self.encoder.logits(trunk, head.last, self.queries,
                                             self.post.logit_scale, self.post.query_class)
                for (i, box), logit in zip(chunk, logits):
                    windows[i][box] = logit
        return windows

    @torch.no_grad()
    def stitched(self, groups: Sequence[WindowGroup], shapes: Sequence[tuple[int, int]],
                 sizes: Sequence[tuple[int, int]], head: Head) -> list[Tensor]:
        """Per image, ``(Q, H, W)`` window logits under ``head``'s last block, stitched over
        the resized ``shapes`` and resized to the original ``sizes``."""
        return [segment.stitch_windows(w, h, wd, tuple(size)) for w, (h, wd), size
                in zip(self.window_logits(groups, len(shapes), head), shapes, sizes)]

    def refined(self, logits: Tensor, resized: Tensor, refine: segment.Refine | None
                ) -> Tensor:
        """``(Q, H, W)`` logits at the original size, PAMR-refined if ``refine`` is on."""
        size = tuple(logits.shape[-2:])
        if refine is not None:
            guide = segment.upsample(resized.to(logits.device).float(), tuple(size))
            logits = segment.pamr(guide, logits, refine.steps, refine.dilations)
        return logits

    def iter_heads(self, resized: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
                   heads: Sequence[Head] | None = None) -> Iterator[list[Tensor]]:
        """Per head, ``[image] -> (Q, H, W)`` logits of preprocessed images; the trunk runs
        once (per position-embedding rule), and only one head's full-size logits are alive
        at a time."""
        heads = self.heads if heads is None else heads
        shapes = [tuple(r.shape[1:]) for r in resized]
        for head, groups in self.head_trunks(resized, heads):
            yield [self.refined(lg, r, head.refine)
                   for lg, r in zip(self.stitched(groups, shapes, sizes, head), resized)]

    @torch.no_grad()
    def iter_class_maps(self, resized: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
                        heads: Sequence[Head] | None = None) -> Iterator[list[Tensor]]:
        """Per head, ``[image] -> (H, W)`` int64 class maps: ``classes`` of ``iter_heads``'
        logits, bit for bit, for the evaluation loop. One image's ``(Q, H, W)`` logits are
        alive at a time, stitched (on CPU) into a scratch reused across images and calls,
        and reduced block by block without a second full-size tensor."""
        heads = self.heads if heads is None else heads
        for head, groups in self.head_trunks(resized, heads):
            maps = []
            for windows, r, size in zip(self.window_logits(groups, len(resized), head),
                                        resized, sizes):
                height, width = r.shape[1:]
                numel = next(iter(windows.values())).shape[0] * size[0] * size[1]
                logits = segment.stitch_windows(windows, height, width, tuple(size),
                                                self._scratch(numel))
                maps.append(self.classes(self.refined(logits, r, head.refine)))
            yield maps

    def _scratch(self, numel: int) -> Tensor | None:
        """A flat fp32 buffer of ≥ ``numel`` elements on CPU (None elsewhere: the CUDA
        caching allocator already reuses memory)."""
        if self.device.type != "cpu":
            return None
        if self.scratch is None or self.scratch.numel() < numel:
            self.scratch = None  # free the old one before allocating the larger
            self.scratch = torch.empty(numel)
        return self.scratch

    def classes(self, logits: Tensor) -> Tensor:
        """``(Q, H, W)`` logits -> ``(H, W)`` int64 class map: logit scale, synonym max,
        thresholds (the post-processing after any refinement)."""
        return segment.predict_classes(logits, self.post)

    def logits_many(self, resized: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
                    heads: Sequence[Head] | None = None) -> list[list[Tensor]]:
        """``[head][image] -> (Q, H, W)`` for preprocessed images, one shared trunk pass."""
        return list(self.iter_heads(resized, sizes, heads))

    def logits(self, image: np.ndarray | None = None, *, resized: Tensor | None = None,
               size: tuple[int, int] | None = None) -> Tensor:
        """``(Q, H, W)`` stitched cosine logits of one image under the default head.

        Pass either the ``(H, W, 3)`` uint8 image, or its preprocessed ``(3, Hr, Wr)`` tensor
        (``resized``, e.g. from a DataLoader worker) together with the original ``size``.
        """
        if resized is None:
            size = image.shape[:2]
            resized = self.prep(image)
        return self.logits_many([resized], [tuple(size)], self.heads[:1])[0][0]

    @torch.no_grad()
    def class_map(self, image: np.ndarray) -> Tensor:
        """``classes(logits(image))``, ``(H, W)`` int64, without the full-size logits: they
        are stitched and reduced in row blocks (``segment.stitch_blocks``; bit for bit up to
        ``STITCH_ELEMENTS`` logits), so memory grows with the image only as the class map
        does. PAMR mixes pixels across rows, so with it the full-size path runs."""
        head = self.heads[0]
        if head.refine is not None:
            return self.classes(self.logits(image))
        resized = self.prep(image)
        _, groups = next(self.head_trunks([resized], [head]))
        windows = self.window_logits(groups, 1, head)[0]
        q, size = next(iter(windows.values())).shape[0], tuple(image.shape[:2])
        return segment.classes_of_blocks(
            lambda: segment.stitch_blocks(windows, *resized.shape[1:], size),
            (q, *size), self.post, self.device)



def build_segmenter(
    *,
    model: Mapping[str, Any],
    attention: Mapping[str, Any],
    projection: Mapping[str, Any] | None,
    preprocess: Mapping[str, Any] | Preprocess,
    postprocess: Mapping[str, Any] | None,
    classes: Sequence[str],
    logit_scale: float,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    templates: str = "openai_imagenet",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    cache_dir: str | None = None,
    learned: tuple[Tensor, Tensor | None] | None = None,
    proxy: Mapping[str, Any] | None = None,
) -> tuple[Segmenter, dict]:
    """Load the model and text queries, validate the variant -> (segmenter, model info)."""
    prep = Preprocess.from_section(preprocess)
    batch_size = integer(batch_size, "batch_size", 1)
    if not classes:
        raise ConfigError("the vocabulary is empty; give dataset=<name> or classes=[...]")
    check_head(attention, projection, postprocess, proxy)  # before the (slow) model load
    clip, info = clip_from_section(model, precision, device)
    encoder = DenseEncoder(clip.visual)
    if prep.window is not None and prep.window < encoder.patch:
        raise ConfigError(f"preprocess.window={prep.window} is smaller than one "
                          f"{encoder.patch}-pixel patch of {info['arch']}")
    head = build_head(attention, projection, postprocess, encoder, learned, proxy)
    names, owner = split_queries(classes)
    dev = torch.device(info["device"])
    queries = classifier(clip, info["arch"], names, templates, dev, cache_dir).to(dev)
    post = segment.PostProcess(torch.tensor(owner), len(classes), float(logit_scale),
                               float(prob_thd or 0.0),
                               None if area_thd is None else float(area_thd))
    info.update(num_queries=len(names), depth=encoder.depth)
    segmenter = Segmenter(encoder, [head], queries, post, prep, batch_size)
    segmenter.add_proxy(head)
    return segmenter, info
