"""What a backbone is, read from open_clip's own registry (docs/protocol.md "Backbones").

A preset in ``conf/model/`` names only what the user chooses (arch, pretrained tag,
activation override). Everything else — mean/std, native resolution, patch size, context
length, tokenizer, activation, tower kind — is read here from open_clip's model configs
(``open_clip.get_model_config``) and pretrained registry (``open_clip.get_pretrained_cfg``),
offline and without building the model, so that a preset can never drift from open_clip.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from .errors import ConfigError

log = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
DEFAULT_WINDOW = 224  # SCLIP's window and stride (docs/protocol.md §5), the fallback sizes
DEFAULT_STRIDE = 112
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_*
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_WARNED: set[str] = set()  # the fallback warning once per process and arch


@dataclass(frozen=True)
class BackboneFacts:
    """One backbone as open_clip registers it.

    ``image_size`` and ``patch_size`` are pixels (the native grid is image_size/patch_size
    patches a side); ``tower`` is ``"open_clip"`` (open_clip's own ``VisionTransformer``) or
    ``"timm"`` (a ``TimmModel`` tower, ``timm_model_name`` set); ``pool`` is the image
    readout (``"tok"`` = CLS token, ``"map"`` = attention-pooling head, …); ``tokenizer`` is
    the hub tokenizer name, or ``"clip"`` for open_clip's built-in BPE tokenizer;
    ``sigmoid`` marks a SigLIP-style text head (a ``logit_bias``)."""

    arch: str
    pretrained: str
    tower: str
    timm_model_name: str | None
    image_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int
    tokenizer: str
    quick_gelu: bool
    pool: str
    sigmoid: bool

    @property
    def grid(self) -> int:
        """Patches a side at the native resolution (e.g. 336/14 = 24)."""
        return self.image_size // self.patch_size


@cache
def presets() -> dict[str, tuple[str, str]]:
    """``{preset name: (arch, pretrained)}`` of every ``conf/model/*.yaml``."""
    found = {}
    for path in sorted(MODEL_DIR.glob("*.yaml")):
        section = yaml.safe_load(path.read_text()) or {}
        found[path.stem] = (str(section.get("arch")), str(section.get("pretrained")))
    return found


def preset_of(arch: str) -> str | None:
    """The first preset (sorted by name) whose arch is ``arch``, or None."""
    return next((name for name, (a, _) in presets().items() if a == arch), None)


def _square(size) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"model.arch image_size={tuple(size)} is not square; the lab's "
                             "windows are square: register a square model config")
        size = size[0]
    return int(size)


def backbone_facts(arch: str, pretrained: str = "") -> BackboneFacts:
    """The facts of ``arch`` (an open_clip model name) with weights ``pretrained`` (a hub
    tag; a local file or an unknown tag keeps the model config's own mean/std)."""
    cfg = _model_config(arch)
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    timm_name = vision.get("timm_model_name")
    patch = vision.get("patch_size")
    if patch is None and timm_name:  # timm towers carry the patch in their name only
        match = re.search(r"patch(\d+)", timm_name)
        patch = int(match.group(1)) if match else None
    if patch is None:
        raise ConfigError(f"model.arch={arch}: its open_clip config names no patch size; the "
                         "lab's dense readout needs a ViT (patch_size or a timm *_patchN_* tower)")
    tag = _pretrained_cfg(arch, pretrained)
    mean = tag.get("mean") or vision.get("image_mean") or _OPENAI_MEAN
    std = tag.get("std") or vision.get("image_std") or _OPENAI_STD
    if timm_name:
        pool = str(vision.get("timm_pool") or "token")
    else:
        pool = "attn" if vision.get("attentional_pool") else str(vision.get("pool_type", "tok"))
    return BackboneFacts(
        arch=arch, pretrained=pretrained, tower="timm" if timm_name else "open_clip",
        timm_model_name=timm_name, image_size=_square(vision.get("image_size", 224)),
        patch_size=int(patch), mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std), context_length=int(text.get("context_length", 77)),
        tokenizer=str(text.get("hf_tokenizer_name") or "clip"),
        quick_gelu=bool(cfg.get("quick_gelu") or tag.get("quick_gelu")),
        pool=pool, sigmoid="init_logit_bias" in cfg)


def _model_config(arch: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        names = ", ".join(presets())
        raise ConfigError(f"model.arch={arch} is not an open_clip model config; use a preset "
                         f"(model=<name>: {names})"[:300])
    return cfg


def _pretrained_cfg(arch: str, pretrained: str) -> dict:
    import open_clip

    if not pretrained or pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        return {}  # a local file or another tag: no registry entry
    return dict(open_clip.get_pretrained_cfg(arch, pretrained))


def hub_offline() -> bool:
    """Whether Hugging Face's hub is switched off (``HF_HUB_OFFLINE``, read as the hub
    library reads it): its cache is then the only source of weights and tokenizers."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def weights_unavailable(arch: str, built: str, pretrained: str, cause: str) -> str:
    """The one line for hub weights that open_clip could not get: a tag the arch does not
    have (its tags listed), weights not cached while the hub is offline, or a failed
    download; each names the file to pass instead."""
    import open_clip

    file = f"model.pretrained=/path/to/{arch.removesuffix('-quickgelu')}.pt"
    tags = open_clip.list_pretrained_tags_by_model(built)
    if pretrained not in tags:
        return (f"model.pretrained={pretrained} is not a hub tag of {built} (its tags: "
                f"{', '.join(tags) or 'none'}); pass one, or a weights file: {file}")[:300]
    if hub_offline():
        return (f"weights '{pretrained}' are not in the local cache and the hub is offline: "
                f"pass {file} or go online")
    return (f"could not get weights '{pretrained}' for {built} ({cause}); without hub access "
            f"pass a local file: {file}")


def native_window(arch: str) -> int:
    """The window of ``preprocess=native``: the backbone's native resolution (e.g. 336 for
    ViT-L/14-336, 224 for B/16); SCLIP's 224 when ``arch`` has no preset (warned once)."""
    facts = _preset_facts(arch)
    return DEFAULT_WINDOW if facts is None else facts.image_size


def native_stride(arch: str) -> int:
    """The stride of ``preprocess=native``: half the native window (SCLIP's 224/112 ratio),
    so each pixel is seen by up to four windows on every backbone."""
    facts = _preset_facts(arch)
    return DEFAULT_STRIDE if facts is None else facts.image_size // 2


def _preset_facts(arch: str) -> BackboneFacts | None:
    name = preset_of(arch)
    if name is None:
        if arch not in _WARNED:
            _WARNED.add(arch)
            log.warning("model.arch=%s matches no preset in conf/model; the protocol falls "
                        "back to the default sizes (window %d, stride %d)", arch,
                        DEFAULT_WINDOW, DEFAULT_STRIDE)
        return None
    return backbone_facts(arch, presets()[name][1])


def backbone_dir(arch: str, pretrained: str) -> str:
    """A sweep folder name of one backbone: ``arch`` for OpenAI weights and local files (the
    layout sweeps always had), ``arch-tag`` for another hub tag, so that MetaCLIP's and
    OpenAI's ``ViT-B-16-quickgelu`` sweeps never share a folder."""
    import open_clip

    if pretrained == "openai" or pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        return arch
    return f"{arch}-{pretrained}"


# ------------------------------------------------------------ what a weights file holds

# timm tower names carry the size as a word: (width, blocks) of each.
_TIMM_SIZES = {"tiny": (192, 12), "small": (384, 12), "base": (768, 12), "large": (1024, 24),
               "so400m": (1152, 27), "huge": (1280, 32), "giant": (1408, 40)}
_SIZE_LETTERS = {768: "B", 1024: "L", 1280: "H", 1152: "So400m", 1408: "g", 1664: "G"}
_FAMILIES = (("SigLIP2", "SigLIP 2"), ("SigLIP", "SigLIP"), ("PE-Core", "PE-Core"),
             ("EVA02", "EVA-02"))


def config_signature(arch: str) -> dict:
    """What a state dict of ``arch`` must show (``weights_signature``'s keys), read from its
    open_clip config: tower kind, width, patch, native size, blocks (None where a timm
    name does not say), text context and vocabulary, sigmoid head."""
    cfg = _model_config(arch)
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    timm_name = vision.get("timm_model_name")
    facts = backbone_facts(arch)
    if timm_name:
        word = next((w for w in _TIMM_SIZES if f"_{w}_" in f"_{timm_name}_"), None)
        width, layers = _TIMM_SIZES.get(word, (None, None))
    else:
        width, layers = vision.get("width"), vision.get("layers")
    return {"tower": facts.tower, "width": width, "patch": facts.patch_size,
            "image_size": facts.image_size, "layers": layers,
            "context": facts.context_length, "vocab": int(text.get("vocab_size", 49408)),
            "sigmoid": facts.sigmoid}


def weights_signature(state) -> dict | None:
    """``config_signature``'s keys read from a CLIP state dict (open_clip's layout, either
    tower kind), or None when it holds no CLIP image tower."""
    if "visual.conv1.weight" in state:
        tower, patch_key, pos_key, block = ("open_clip", "visual.conv1.weight",
                                            "visual.positional_embedding",
                                            "visual.transformer.resblocks.")
    elif "visual.trunk.patch_embed.proj.weight" in state:
        tower, patch_key, pos_key, block = ("timm", "visual.trunk.patch_embed.proj.weight",
                                            "visual.trunk.pos_embed", "visual.trunk.blocks.")
    else:
        return None
    width, _, patch, _ = state[patch_key].shape
    rows = state[pos_key].shape[-2] if pos_key in state else None
    grid = None if rows is None else next(
        (g for g in (int(round((rows - p) ** 0.5)) for p in (0, 1)) if g * g in (rows, rows - 1)),
        None)
    blocks = {k[len(block):].split(".")[0] for k in state if k.startswith(block)}
    text_pos = state.get("positional_embedding", state.get("text.positional_embedding"))
    vocab = state.get("token_embedding.weight", state.get("text.token_embedding.weight"))
    return {"tower": tower, "width": int(width), "patch": int(patch),
            "image_size": None if grid is None else grid * int(patch), "layers": len(blocks),
            "context": None if text_pos is None else int(text_pos.shape[0]),
            "vocab": None if vocab is None else int(vocab.shape[0]),
            "sigmoid": "logit_bias" in state}


def looks_like(state) -> tuple[str, list[str]]:
    """What a CLIP state dict is, in a few words, and the presets that fit it, e.g.
    ``("a SigLIP 2 B/16 tower at 256 px", ["siglip2_b16_256"])``."""
    sig = weights_signature(state)
    if sig is None:
        return "no CLIP image tower", []
    fits = [name for name, (arch, _) in presets().items()
            if all(v is None or sig.get(k) == v for k, v in config_signature(arch).items())]
    if fits:
        arch = presets()[fits[0]][0]
        family = next((words for key, words in _FAMILIES if key in arch), "CLIP")
        size = _SIZE_LETTERS.get(sig["width"], f"width-{sig['width']}")
        words = f"{family} {size}/{sig['patch']} tower at {sig['image_size']} px"
    else:
        kind = "SigLIP-style timm" if sig["sigmoid"] else (
            "timm" if sig["tower"] == "timm" else "open_clip ViT")
        words = (f"{kind} tower of width {sig['width']}, {sig['layers']} blocks, "
                 f"{sig['patch']}-pixel patches at {sig['image_size']} px")
    return ("an " if words[0] in "AEIOUaeiou" else "a ") + words, fits
