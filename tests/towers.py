"""Small random towers of every timm family, registered with timm under test names, and a
stand-in for the hub tokenizers: shared by the tower, text and family run tests."""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

SIGLIP_TIMM = "sclip_test_siglip_tiny"
SIGLIP_WIDTH = 128  # two 64-wide heads: τ = 8 is the tower's own scale


@register_model
def sclip_test_siglip_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 3-block SigLIP-shaped timm ViT: no CLS, MAP head (vit_base_patch16_siglip_224's
    arguments with smaller width and depth)."""
    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    kwargs["global_pool"] = kwargs.get("global_pool") or "map"
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=SIGLIP_WIDTH, depth=3,
                             num_heads=2, class_token=False, **kwargs)


@register_model
def sclip_test_pe_tiny(pretrained: bool = False, **kwargs):
    """timm's PE-Core ViT (an ``Eva``: rotary embeddings, a CLS, a MAP head), one small block."""
    import timm

    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return timm.create_model("vit_pe_core_base_patch16_224", depth=2, embed_dim=64,
                             num_heads=1, **kwargs)


@register_model
def sclip_test_eva02_tiny(pretrained: bool = False, **kwargs):
    """timm's EVA-02 CLIP ViT (``Eva``: rotary embeddings, SwiGLU, q/v biases), two blocks."""
    import timm

    kwargs = {k: v for k, v in kwargs.items()
              if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return timm.create_model("eva02_base_patch16_clip_224", depth=2, embed_dim=128,
                             num_heads=2, **kwargs)


class TinyTokenizer:
    """Deterministic stand-in for the hub's SigLIP tokenizer: same call signature as
    open_clip's ``HFTokenizer`` (``list[str]`` -> ``(B, context_length)`` long, 0-padded)."""

    name = "test/tiny-sentencepiece"

    def __init__(self, context_length: int = 16, vocab: int = 100):
        self.context_length, self.vocab = context_length, vocab

    def __call__(self, texts, context_length=None):
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [sum(map(ord, w)) % (self.vocab - 1) + 1 for w in t.split()][:n]
            out[i, :len(ids)] = torch.tensor(ids)
        return out
