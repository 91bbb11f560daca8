"""Assemble the rooms into a segmenter: image -> windows -> trunk -> last block -> logits
-> post-process. ``build_*`` functions unpack config sections into explicit arguments;
nothing below them sees a config.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sclip_lab import refine, segment, text
from sclip_lab.errors import ConfigError, UserError, integer
from sclip_lab.features import add_features
from sclip_lab.head_spec import HeadSpec, head_spec
from sclip_lab.heads import Head, build_head, build_last_block, head_of, trunk_needs
from sclip_lab.images import ImageLike, as_rgb, is_many
from sclip_lab.model import DenseEncoder, TrunkOutput, clip_from_section
from sclip_lab.pos_embed import DEFAULT_POS_EMBED
from sclip_lab.preprocess import Preprocess
from sclip_lab.proxy import ProxyBackbone, load_proxy, window_features
from sclip_lab.timm_tower import dense_encoder
from sclip_lab.trunk_cache import TrunkCache, open_cache

log = logging.getLogger(__name__)


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
    # heads the builder could not build on this model (keep_going): index -> why
    skipped: dict[int, UserError] = field(default_factory=dict)
    # fp32 scratch for one image's stitched logits on CPU, reused (iter_class_maps)
    scratch: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def early_layers(self, heads: Sequence[Head]) -> tuple[int, ...]:
        """Trunk blocks whose attention maps some head borrows (the last block's is free)."""
        return trunk_needs([h.last for h in heads], self.encoder.depth)[0]

    def hidden_layers(self, heads: Sequence[Head]) -> tuple[int, ...]:
        """Trunk hidden states some head reads (multi-block paths, mid-layer features)."""
        return trunk_needs([h.last for h in heads], self.encoder.depth)[1]

    def feature_names(self, heads: Sequence[Head]) -> tuple[str, ...]:
        """Named trunk features some head reads (``sclip_lab.features``), each once."""
        return trunk_needs([h.last for h in heads], self.encoder.depth)[2]

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
        borrowed maps, hidden states, named features and the proxies' window features (each
        once per window, shared by the heads that read it)."""
        (rule,) = {h.last.pos_embed for h in heads}
        groups = self.encode(images, self.early_layers(heads), self.hidden_layers(heads), rule,
                             self.feature_names(heads))
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
               hidden_layers: Sequence[int] = (), pos_embed: str = DEFAULT_POS_EMBED,
               features: Sequence[str] = ()) -> list[WindowGroup]:
        """Trunk outputs of every sliding window of ``images`` (each ``(3, Hr, Wr)``),
        batched across images by window size, keeping ``early_layers``' attention maps,
        ``hidden_layers``' hidden states and the named ``features``, embedded by the rule
        ``pos_embed``. With a ``trunk_cache``, images met before are read from it (the same
        groups and values; each rule its own entries), the others computed and stored."""
        if self.trunk_cache is None:
            return self.trunk_pass(images, early_layers, hidden_layers, pos_embed, features)
        tag = "" if pos_embed == DEFAULT_POS_EMBED else f"pos_embed={pos_embed}"
        groups = [WindowGroup(owners, replace(trunk, pos_embed=pos_embed))
                  for owners, trunk in self.trunk_cache.encode(
                      images, self.prep.boxes, early_layers, hidden_layers,
                      partial(self.trunk_pass, pos_embed=pos_embed), self.device, tag, features)]
        for g in groups:  # what the cache does not store (providers with cache=False)
            add_features(g.trunk, features, self.encoder, self.batch_size)
        return groups

    @torch.no_grad()
    def trunk_pass(self, images: Sequence[Tensor], early_layers: Sequence[int] = (),
                   hidden_layers: Sequence[int] = (), pos_embed: str = DEFAULT_POS_EMBED,
                   features: Sequence[str] = ()) -> list[WindowGroup]:
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
                                                pos_embed, features))
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

    def refined(self, logits: Tensor, resized: Tensor, rule: refine.Refinement | None
                ) -> Tensor:
        """``(Q, H, W)`` logits at the original size, refined by ``rule`` if on (PAMR, TLP:
        the resized image brought to that size as its guide, the text queries)."""
        size = tuple(logits.shape[-2:])
        if rule is not None:
            guide = segment.upsample(resized.to(logits.device).float(), tuple(size))
            logits = rule(guide, logits, self.queries)
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

    def logits(self, image: ImageLike | Sequence[ImageLike] | None = None, *,
               resized: Tensor | None = None, size: tuple[int, int] | None = None
               ) -> Tensor | list[Tensor]:
        """``(Q, H, W)`` stitched cosine logits of one image under the default head (a list
        of images gives a list), before the logit scale; Q queries, one per synonym.

        Pass either the image (a path, an ``(H, W, 3)`` uint8 array, a PIL image or a
        ``(3, H, W)`` tensor: ``images.as_rgb``), or its preprocessed ``(3, Hr, Wr)`` tensor
        (``resized``, e.g. from a DataLoader worker) together with the original ``size``.
        """
        if resized is None:
            if is_many(image):
                return [self.logits(one) for one in image]
            image = as_rgb(image)
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

    def segment(self, image: ImageLike | Sequence[ImageLike]) -> np.ndarray | list[np.ndarray]:
        """The ``(H, W)`` int64 numpy class map of an image under the default head (a list
        of images gives a list): indices into the vocabulary's classes. ``image``: a path,
        an ``(H, W, 3)`` uint8 array, a PIL image or a ``(3, H, W)`` tensor (uint8, or
        float in 0…1); ``class_map`` of ``images.as_rgb(image)``."""
        if is_many(image):
            return [self.segment(one) for one in image]
        return self.class_map(as_rgb(image)).cpu().numpy()



def build_segmenter(
    *,
    model: Mapping[str, Any],
    heads: Sequence[HeadSpec] | None = None,
    preprocess: Mapping[str, Any] | Preprocess,
    classes: Sequence[str] | None,
    logit_scale: float,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    templates: str = "openai_imagenet",
    text_scores: str = "softmax",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    cache_dir: str | None = None,
    learned: Sequence[tuple[Tensor, Tensor | None] | None] | None = None,
    trunk_cache: str | None = None,
    trunk_cache_dtype: str = "fp32",
    keep_going: bool = False,
    attention: Mapping[str, Any] | None = None,
    projection: Mapping[str, Any] | None = None,
    postprocess: Mapping[str, Any] | None = None,
    proxy: Mapping[str, Any] | None = None,
) -> tuple[Segmenter, dict]:
    """The one builder: model, text queries, every head, their proxy backbones and the
    trunk cache -> ``(segmenter, model info)``; nothing is added to it afterwards.

    Args:
        model: the ``model`` section (arch, pretrained, quick_gelu, config_file).
        heads: validated heads (``head_spec``), ``heads[0]`` the default one; or give one
            head's sections as ``attention`` / ``projection`` / ``postprocess`` / ``proxy``.
        classes: the vocabulary's class lines (synonyms as ``"person, man"``); None for a
            segmenter without text (attention maps only: no logits).
        text_scores: ``softmax`` over queries at ``logit_scale`` (the protocol's rule), or
            ``sigmoid``, the model's own head (SigLIP; docs/protocol.md §4).
        learned: per head, the trained (W, b) of ``projection=learned`` (or None).
        trunk_cache: a folder for blocks 1…D−1 (``trunk_cache=DIR``), or None.
        keep_going: a head that cannot be built on this model (a borrowed block deeper
            than it, a learned matrix of another width) is left out and its error kept in
            ``segmenter.skipped``, instead of raising.

    Example::

        seg, info = build_segmenter(model={"arch": "ViT-B-16", "pretrained": "openai"},
                                    heads=[head_spec({"name": "csa"})],
                                    preprocess=Preprocess(336), classes=["cat", "dog"],
                                    logit_scale=40.0)
    """
    prep = Preprocess.from_section(preprocess)
    batch_size = integer(batch_size, "batch_size", 1)
    text.check_scores(text_scores)
    if classes is not None and not classes:
        raise ConfigError("the vocabulary is empty; give dataset=<name> or classes=[...]")
    if heads is None:  # before the (slow) model load: bad values fail in the first second
        heads = [head_spec(attention or {"name": "csa"}, projection, postprocess, proxy)]
    learned = list(learned or [None] * len(heads))
    clip, info = clip_from_section(model, precision, device, cache_dir)
    encoder = dense_encoder(clip.visual)  # open_clip's ViT or a timm tower (timm_tower.py)
    if prep.window is not None and prep.window < encoder.patch:
        raise ConfigError(f"preprocess.window={prep.window} is smaller than one "
                          f"{encoder.patch}-pixel patch of {info['arch']}")
    built, skipped = [], {}
    for i, (spec, weights) in enumerate(zip(heads, learned)):
        try:
            built.append(head_of(spec, encoder, weights))
        except UserError as e:
            if not keep_going:
                raise
            log.error("variant [%s] skipped: %s", spec.label(), e)
            skipped[i] = e
    if not built:
        raise next(iter(skipped.values()))
    names, owner = text.split_queries(classes or [])
    dev = torch.device(info["device"])
    queries = (text.classifier(clip, info["arch"], names, templates, dev, cache_dir).to(dev)
               if names else torch.empty(0, clip.visual.output_dim, device=dev))
    sigmoid = text.score_rule(text_scores, clip, info["arch"])
    post = segment.PostProcess(torch.tensor(owner, dtype=torch.long), len(names and classes),
                               float(logit_scale),
                               float(prob_thd or 0.0),
                               None if area_thd is None else float(area_thd),
                               None if sigmoid is None else (sigmoid.scale, sigmoid.bias))
    info.update(num_queries=len(names), depth=encoder.depth,
                backbone=backbone_of(clip, encoder, info["arch"], text_scores, sigmoid))
    proxies = {h.last.proxy: load_proxy(h.last.proxy, dev, encoder.dtype)  # once per backbone
               for h in built if h.last.proxy is not None}
    cache = None if not trunk_cache else open_cache(trunk_cache, trunk_cache_dtype, encoder,
                                                    info, asdict(prep))
    segmenter = Segmenter(encoder, built, queries, post, prep, batch_size, cache, proxies,
                          skipped)
    return segmenter, info


def backbone_of(clip: Any, encoder: Any, arch: str, text_scores: str, sigmoid: Any
                ) -> dict[str, Any]:
    """What the record keeps of the built backbone (its ``model.backbone`` section): the
    tower as built (kind, patch, native size, prefix tokens, what it provides to methods)
    and the text side (tokenizer, context length, score rule and a sigmoid head's values)."""
    size = getattr(clip.visual, "image_size", None)
    return {"tower": getattr(encoder, "kind", "open_clip VisionTransformer"),
            "patch": int(encoder.patch), "width": int(encoder.width),
            "native_size": int(size[0] if isinstance(size, (tuple, list)) else size or 0),
            "prefix_tokens": int(encoder.prefix), "provides": sorted(encoder.provides),
            **text.tokenizer_identity(arch), "text_scores": text_scores,
            "sigmoid_head": None if sigmoid is None else asdict(sigmoid)}


# The assembly's names in one place: heads (``sclip_lab.heads``) and preprocessing too.
__all__ = ["ConfigError", "Head", "Preprocess", "Segmenter", "WindowGroup", "build_head",
           "build_last_block", "build_segmenter"]
