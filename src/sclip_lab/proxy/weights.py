"""Proxy weights: a local file in its official layout (DINO, DINOv2, MAE, SAM) or a timm
state dict, converted by timm's ``checkpoint_filter_fn`` of the family, or timm's hub; a
file of another architecture is named for what it seems to be."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import vision_transformer as timm_vit
from timm.models import vision_transformer_sam as timm_sam
from torch import Tensor, nn

from sclip_lab.checkpoint import load_state
from sclip_lab.errors import message_of
from sclip_lab.proxy.spec import FAMILIES, ProxyError, ProxySpec


def hub_tag(spec: ProxySpec) -> str:
    return f"timm:{spec.arch}" if spec.pretrained == "timm" else spec.pretrained


def from_hub(spec: ProxySpec, kwargs: dict) -> nn.Module:
    """timm's own download and conversion (``pretrained=True``)."""
    name = spec.arch if spec.pretrained == "timm" else spec.pretrained
    fam = FAMILIES[spec.name]
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, bad file: all "no weights"
        raise ProxyError(f"could not get proxy weights '{spec.pretrained}' for {spec.arch} "
                         f"({type(e).__name__}: {_short(e)}); without hub access pass a local "
                         f"file: proxy.pretrained=/path/{fam.file}") from None
    _check_built(spec, model, spec.pretrained)
    return model


def _check_built(spec: ProxySpec, model: nn.Module, source: str) -> None:
    """The model is of the proxy's family and patch size (a hub repo can be anything)."""
    fam = FAMILIES[spec.name]
    want = timm_sam.VisionTransformerSAM if fam.rule == "sam" else timm_vit.VisionTransformer
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    patch = proj.kernel_size[-1] if proj is not None else None
    if not isinstance(model, want) or patch != spec.patch:
        raise ProxyError(f"{source} is a {type(model).__name__} with {patch}-pixel patches, not "
                         f"proxy={spec.name} ({spec.arch}, {spec.patch}-pixel patches); "
                         "use that proxy's weights")
    if fam.rule == "dinov2_reg" and getattr(model, "reg_token", None) is None:
        raise ProxyError(f"{source} has no register tokens; proxy={spec.name} needs DINOv2 "
                         "with registers")


def read_weights(path: Path) -> tuple[dict[str, Tensor], str | None]:
    """A weights file -> (flat state dict, the wrapper key it was under or None).

    Accepts safetensors and ``torch.save`` files: a plain state dict (DINO, DINOv2, timm),
    one under ``model`` (MAE) or ``state_dict``, a DINO training checkpoint (``teacher``:
    its ``backbone.`` weights), with ``module.`` prefixes removed. Loaded with
    ``weights_only`` (``argparse.Namespace`` allowed: official checkpoints keep their
    training args beside the weights).
    """
    if not path.is_file():
        raise ProxyError(f"proxy.pretrained={path} does not exist; pass the proxy weights "
                         "file (or proxy.pretrained=timm)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure means "not a checkpoint"
        raise ProxyError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{_short(e)}); pass proxy.pretrained=<a .pth/.safetensors weights "
                         "file>") from None
    wrapper = None
    if isinstance(raw, Mapping):
        for key in ("teacher", "model", "state_dict"):
            if isinstance(raw.get(key), Mapping):
                raw, wrapper = raw[key], key
                break
    if not isinstance(raw, Mapping) or not raw or not all(
            isinstance(v, Tensor) for v in raw.values()):
        raise ProxyError(f"{path} holds no state dict of tensors; pass a proxy weights file")
    sd = {str(k).removeprefix("module."): v for k, v in raw.items()}
    if wrapper == "teacher":  # DINO's MultiCropWrapper: the ViT under backbone., DINOHead beside
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if not k.startswith("head.")}
    return sd, wrapper


def describe_weights(sd: Mapping[str, Tensor], wrapper: str | None = None
                     ) -> tuple[str | None, str]:
    """What a (raw, official or timm) state dict seems to be -> (proxy name or None, a few
    words), judged by its keys and shapes."""
    sam = any(k.startswith("image_encoder.") or "rel_pos_h" in k for k in sd) or (
        "neck.0.weight" in sd)
    w = sd.get("image_encoder.patch_embed.proj.weight", sd.get("patch_embed.proj.weight"))
    if w is None or w.dim() != 4:
        if "visual.conv1.weight" in sd or "conv1.weight" in sd:
            return None, "a CLIP image tower"
        return None, "no ViT (no patch_embed.proj.weight)"
    width, patch = w.shape[0], w.shape[-1]
    size = {384: "S", 768: "B", 1024: "L", 1280: "H"}.get(width, f" of width {width}")
    words = f"a ViT-{size}/{patch}" if len(size) == 1 else f"a ViT{size}, {patch}-pixel patches"
    if sam:
        return ("sam_vitb" if (width, patch) == (768, 16) else None), f"a SAM encoder ({words})"
    if "register_tokens" in sd or "reg_token" in sd:
        name = "dinov2_vitb14_reg" if (width, patch) == (768, 14) else None
        return name, f"DINOv2 with registers ({words})"
    if "mask_token" in sd:
        return None, f"DINOv2 without registers ({words})"
    if width != 768:
        return None, words
    if patch == 8:
        return "dino_vitb8", f"{words} (DINO ViT-B/8)"
    if patch == 16:
        name = "mae_vitb16" if wrapper == "model" else "dino_vitb16"
        return name, f"{words} (DINO or MAE ViT-B/16)"
    return None, words


def _native_grid(spec: ProxySpec, sd: Mapping[str, Tensor]) -> int | None:
    """The square grid side of a file's own pos-embed (the model is built at it, so that
    every resize starts from the checkpoint's table, as the official code's)."""
    pos = sd.get("image_encoder.pos_embed", sd.get("pos_embed"))
    if pos is None:
        return None
    if pos.dim() == 4:  # SAM: (1, g, g, D)
        return int(pos.shape[1])
    n = pos.shape[1]
    for prefix in (0, 1):  # timm DINOv2 / official tables with a CLS row
        g = math.isqrt(n - prefix)
        if g * g == n - prefix:
            return g
    return None


def from_file(spec: ProxySpec, path: Path, kwargs: dict) -> nn.Module:
    fam = FAMILIES[spec.name]
    sd, wrapper = read_weights(path)
    guess, words = describe_weights(sd, wrapper)
    w = sd.get("image_encoder.patch_embed.proj.weight", sd.get("patch_embed.proj.weight"))
    patch = w.shape[-1] if w is not None and w.dim() == 4 else None
    family_of = {None: None, **{n: f.rule for n, f in FAMILIES.items()}}
    same_family = family_of[guess] in (fam.rule, None) or (
        {guess, spec.name} == {"dino_vitb16", "mae_vitb16"})
    if patch != spec.patch or not same_family or (fam.rule == "sam") != words.startswith(
            "a SAM"):
        hint = f"use proxy={guess}" if guess else "pass a file of this proxy"
        raise ProxyError(f"{path} does not fit proxy={spec.name} ({spec.arch}): it looks like "
                         f"{words}; {hint} (or proxy.pretrained=<the official {fam.file}>)")
    grid = _native_grid(spec, sd)
    if grid is not None and "img_size" not in kwargs:
        kwargs["img_size"] = grid * spec.patch
    if fam.rule == "sam" and "blocks.0.mlp.lin1.weight" in sd:
        # SAM's encoder saved on its own (no image_encoder. prefix): timm's filter renames
        # only prefixed keys, so give them the prefix of the full SAM checkpoint.
        sd = {f"image_encoder.{k}": v for k, v in sd.items()}
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
    _check_built(spec, model, str(path))
    convert = timm_sam.checkpoint_filter_fn if fam.rule == "sam" else (
        timm_vit.checkpoint_filter_fn)
    try:
        state = convert(dict(sd), model)
    except Exception as e:  # noqa: BLE001 - timm's converter on a foreign layout
        raise ProxyError(f"{path} does not fit proxy={spec.name} ({spec.arch}): timm cannot "
                         f"convert it ({type(e).__name__}: {_short(e)}); pass the official "
                         f"{fam.file} or a timm {spec.arch} state dict") from None
    # assign: the meta-built model takes the file's tensors (load_proxy casts them).
    load_state(model, state, path, f"proxy={spec.name} ({spec.arch})",
               f"it looks like {words}; pass the official {fam.file} or a timm {spec.arch} "
               "state dict", error=ProxyError, assign=True)
    return model


def _short(error: BaseException, limit: int = 160) -> str:
    text = message_of(error)
    return text if len(text) <= limit else text[:limit - 1] + "…"
