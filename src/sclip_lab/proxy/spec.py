"""The ``proxy`` config group as a validated, hashable spec: which backbone, which weights,
which layer, its normalisation and input size (``ProxySpec``), and which proxy a last-block
variant reads (``proxy_spec``). Checked before any model loads."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm

from sclip_lab.errors import ConfigError, UserError, integer, number

# OpenAI CLIP's normalisation, at full precision: ProxyCLIP un-normalises the crops with these
# (proxyclip_segmentor.py L79), although its data preprocessor normalised with the 3-decimal
# ×255 values (segment.PIXEL_MEAN here too). Same pair, same small mismatch.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# All four VFMs are re-normalised with ImageNet's statistics (L80; SAM's own pixel_mean/std
# are the same values ×255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

HUB_TAGS = ("timm", "hf-hub:")  # proxy.pretrained values that mean "through timm's hub"
SECTION_KEYS = ("name", "arch", "pretrained", "layer", "patch", "mean", "std", "input_size")


@dataclass(frozen=True)
class _Family:
    """What a proxy name fixes: its timm model, the official pos-embed rule and file name."""

    arch: str | None
    patch: int
    rule: str  # dino | dinov2_reg | mae | sam | clip
    depth: int
    file: str  # the official weights file, for messages
    input_size: int | None = None


FAMILIES: dict[str, _Family] = {
    "dino_vitb8": _Family("vit_base_patch8_224.dino", 8, "dino", 12,
                          "dino_vitbase8_pretrain.pth"),
    "dino_vitb16": _Family("vit_base_patch16_224.dino", 16, "dino", 12,
                           "dino_vitbase16_pretrain.pth"),
    "dinov2_vitb14_reg": _Family("vit_base_patch14_reg4_dinov2.lvd142m", 14, "dinov2_reg", 12,
                                 "dinov2_vitb14_reg4_pretrain.pth"),
    "mae_vitb16": _Family("vit_base_patch16_224.mae", 16, "mae", 12, "mae_pretrain_vit_base.pth"),
    "sam_vitb": _Family("samvit_base_patch16.sa1b", 16, "sam", 12, "sam_vit_b_01ec64.pth",
                        input_size=1024),
    "clip_self": _Family(None, 0, "clip", 0, ""),
}
NAMES = ("none", *FAMILIES)


class ProxyError(UserError):
    """A proxy weights problem (missing, unreadable, wrong architecture), fix in the message."""


# --------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ProxySpec:
    """One proxy backbone, as the ``proxy`` config section gives it (hashable: the pipeline
    keys features by it).

    Attributes:
        name: dino_vitb8 | dino_vitb16 | dinov2_vitb14_reg | mae_vitb16 | sam_vitb | clip_self.
        arch: timm model name (None for clip_self).
        pretrained: a local weights file, ``timm`` (timm's tag of ``arch``) or
            ``hf-hub:timm/<repo>``; None only for clip_self.
        layer: block whose output is used, 1-indexed; None = the last (ProxyCLIP). ViTs:
            that block's tokens after the final norm; SAM: that block's output through the
            neck; clip_self: CLIP's hidden state after that block (required).
        patch: the proxy's patch size (0 for clip_self: CLIP's own grid is used).
        mean, std: the proxy's input normalisation (ImageNet for all four VFMs).
        input_size: resize every window to this square first (SAM: 1024, as the official
            code; MAE: the official ``slide_crop``); None = the window as it is.
    """

    name: str
    arch: str | None
    pretrained: str | None
    layer: int | None
    patch: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int | None = None

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> ProxySpec:
        """Validate a ``proxy`` config section (fields it lacks take the name's defaults).

        Raises:
            ConfigError: unknown name or key, bad layer/patch/normalisation/input size, no
                weights source, or a weights file that does not exist.
        """
        if not isinstance(section, Mapping):
            raise ConfigError(f"proxy must be a config section, not {section!r}; use proxy=<"
                              f"{'|'.join(NAMES)}>")
        unknown = sorted(str(k) for k in section if k not in SECTION_KEYS)
        if unknown:
            raise ConfigError(f"proxy.{unknown[0]} is not a proxy option; the options are "
                              f"{', '.join(SECTION_KEYS)}")
        name = section.get("name")
        if name == "none":
            raise ConfigError("proxy=none has no backbone; choose one of "
                              f"{'|'.join(FAMILIES)} for attention=proxy")
        if name not in FAMILIES:
            raise ConfigError(f"unknown proxy={name!r}; choose one of {'|'.join(NAMES)} "
                              "(conf/proxy)")
        fam = FAMILIES[name]
        mean = _triple(section.get("mean"), "proxy.mean", IMAGENET_MEAN if fam.arch else CLIP_MEAN)
        std = _triple(section.get("std"), "proxy.std", IMAGENET_STD if fam.arch else CLIP_STD)
        if min(std) <= 0:
            raise ConfigError(f"proxy.std={list(std)} is impossible: use positive values")
        pretrained = _source(section.get("pretrained"))
        if fam.arch is None:  # clip_self
            for key in ("arch", "pretrained", "input_size"):
                if section.get(key) not in (None, "none", ""):
                    raise ConfigError(f"proxy=clip_self reads CLIP's own hidden state; drop "
                                      f"proxy.{key}={section.get(key)}")
            layer = integer(section.get("layer"), "proxy.layer", 1, optional=True)
            if layer is None:
                raise ConfigError("proxy=clip_self needs proxy.layer=<CLIP block 1…D−1> "
                                  "whose hidden state gives the similarities (conf: 9)")
            return cls(name, None, None, layer, 0, mean, std, None)
        arch = str(section.get("arch") or fam.arch)
        if arch != fam.arch and not timm.is_model(arch):
            raise ConfigError(f"proxy.arch={arch!r} is not a timm model; use {fam.arch} "
                              f"(or another timm {fam.rule} model)")
        patch = integer(section.get("patch", fam.patch), "proxy.patch", 1)
        # Another arch may be deeper; load_proxy checks the layer against the real model.
        layer = integer(section.get("layer"), "proxy.layer", 1,
                        fam.depth if arch == fam.arch else None, optional=True)
        size = section.get("input_size", fam.input_size)
        size = integer(size, "proxy.input_size", patch, optional=True)
        if pretrained is None:
            raise ConfigError(f"proxy={name} needs weights: add proxy.pretrained=/path/"
                              f"{fam.file} (the official file) or proxy.pretrained=timm "
                              "(timm's hub weights, needs network)")
        if not pretrained.startswith(HUB_TAGS) and not Path(pretrained).is_file():
            raise ConfigError(f"proxy.pretrained={pretrained} does not exist; pass the "
                              f"{name} weights file (e.g. proxy.pretrained=/path/{fam.file}) "
                              "or proxy.pretrained=timm")
        return cls(name, arch, pretrained, layer, patch, mean, std, size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the features of a ``height × width`` window (clip_self: None of
        this applies, the CLIP grid is used)."""
        if self.input_size is not None:
            height = width = self.input_size
        return height // self.patch, width // self.patch


def _triple(value: Any, name: str, default: tuple[float, float, float]
            ) -> tuple[float, float, float]:
    if value is None:
        return default
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"{name}={value} must be three numbers (R, G, B)")
    return tuple(number(v, name) for v in values)  # type: ignore[return-value]


def _source(value: Any) -> str | None:
    """``proxy.pretrained`` as a hub tag, an expanded path, or None (not given)."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    text = str(value).strip()
    return text if text.startswith(HUB_TAGS) else os.path.expanduser(text)


def proxy_spec(variant: Any, section: Mapping[str, Any] | None, depth: int | None = None
               ) -> ProxySpec | None:
    """The proxy a last-block variant reads, validated (before any model exists).

    Args:
        variant: a registered attention variant (``variant.proxy``: it reads one).
        section: ``cfg.proxy`` or None; ``name: none`` = no proxy.
        depth: CLIP's depth once known; clip_self's layer must be 1…depth−1 (the trunk's
            hidden states).

    Returns:
        The spec for proxy variants; None for the others (a given section is still
        validated, so that a typo fails in any run).

    Raises:
        ConfigError: a proxy variant without a proxy, or an invalid section.
    """
    wants = bool(getattr(variant, "proxy", False))
    if section is None or section.get("name", "none") in (None, "none"):
        if wants:
            raise ConfigError(f"attention={getattr(variant, 'name', '?')} needs a proxy "
                              "backbone: add proxy=dino_vitb8 proxy.pretrained=/path/"
                              "dino_vitbase8_pretrain.pth (or another conf/proxy option), or "
                              "proxy=clip_self")
        return None
    spec = ProxySpec.from_section(section)
    if spec.arch is None and depth is not None and not 1 <= spec.layer <= depth - 1:
        raise ConfigError(f"proxy.layer={spec.layer} is impossible for proxy=clip_self: use a "
                          f"CLIP block 1…{depth - 1} (the last block is the one it replaces)")
    return spec if wants else None
