"""Proxy backbones for ProxyCLIP: vision-only ViTs whose patch features give the last CLIP
block its attention (mc-lan/ProxyCLIP @e7b767f, ``proxyclip_segmentor.py`` L44–77 loading,
L106–186 features; docs/protocol.md §16).

Each proxy is a timm model loaded from the researcher's own file (the official checkpoint
formats of DINO, DINOv2, MAE and SAM, or a timm state dict; timm's ``checkpoint_filter_fn``
of the model family converts them) or from a hub tag through timm. ``ProxyBackbone`` takes
the windows exactly as CLIP gets them (CLIP-normalised), re-normalises them for the proxy
and returns its patch features on the window's own (rows, cols) grid, as the official code
takes them:

============================  ==============================================================
proxy                         features (official path)
============================  ==============================================================
``dino_vitb8``/``_vitb16``    torch.hub ``dino_vitb8``: ``get_intermediate_layers(x)[0]``:
                              the last block after the final norm, CLS dropped; pos-embed
                              bicubic with ``scale_factor=(n + 0.1)/N`` (DINO's rule)
``dinov2_vitb14_reg``         torch.hub ``dinov2_vitb14_reg``: ``get_intermediate_layers(x,
                              reshape=True)[0]``, CLS and 4 registers dropped; that hub
                              entry sets ``interpolate_offset=0, interpolate_antialias=True``:
                              pos-embed bicubic to the exact size, antialiased
``mae_vitb16``                ``mae/models_vit.py`` ``forward_features``: ``norm(x[:, 1:])``
                              after all blocks; pos-embed resized once, bicubic to a size
                              (``mae/pos_embed.py``); the crop is resized to ``slide_crop``²
``sam_vitb``                  ``image_encoder`` (SAM ViT-B): the crop resized bilinearly to
                              1024², the 256-d neck output on a 64×64 grid
``clip_self``                 no backbone: CLIP's own hidden state after block ``layer``
                              (the pipeline reads it; ``load_proxy`` returns None)
============================  ==============================================================

Windows may be non-square: grids are (H // patch, W // patch) as (rows, cols); the official
code takes both sides from H, which only square crops hide.

Attention is explicit, softmax(q kᵀ·d_h^-1/2) v, as in every official code (ProxyCLIP pins
torch 1.13, which has no fused kernel), never timm's ``F.scaled_dot_product_attention``
(``explicit_attention``).
"""


from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sclip_lab.errors import ConfigError
from sclip_lab.files import file_digest
from sclip_lab.pos_embed import interpolate_pos_embed
from sclip_lab.precision import PRECISIONS, resolve
from sclip_lab.proxy.spec import (
    CLIP_MEAN,
    CLIP_STD,
    FAMILIES,
    HUB_TAGS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NAMES,
    ProxyError,
    ProxySpec,
    proxy_spec,
)
from sclip_lab.proxy.weights import describe_weights, from_file, from_hub, hub_tag, read_weights

__all__ = ["CLIP_MEAN", "CLIP_STD", "FAMILIES", "IMAGENET_MEAN", "IMAGENET_STD", "NAMES",
           "ProxyBackbone", "ProxyError", "ProxySpec", "describe_weights", "explicit_attention",
           "load_proxy", "official_pos_embed", "proxy_identity", "proxy_spec", "read_weights",
           "window_features"]


# ------------------------------------------------------------------------ pos-embedding


# Each family's official resize as a rule of ``sclip_lab.pos_embed``, the functions CLIP's
# rules are: DINO's +0.1 scale factor is SCLIP's default, DINOv2's the antialiased GEM one.
POS_EMBED_OF = {"dino": "bicubic_scale", "dinov2_reg": "bicubic_antialias", "mae": "bicubic"}


def official_pos_embed(table: Tensor, grid: tuple[int, int], rule: str,
                       square_input: bool = True) -> Tensor:
    """A square ``(1, g·g, D)`` patch pos-embed table (prefix rows removed) -> ``(1, rows·
    cols, D)`` for another grid, as each official repository resizes it.

    Args:
        table: the patch rows of the checkpoint's table, a g×g grid in row-major order.
        grid: (rows, cols) of the input's patches.
        rule: the family (``POS_EMBED_OF``): ``dino`` (facebookresearch/dino
            ``vision_transformer.py`` ``interpolate_pos_encoding``: bicubic with
            ``scale_factor = (n + 0.1)/g`` per side, no antialias; DINOv2's default),
            ``dinov2_reg`` (dinov2 ``hub/backbones.py`` ``dinov2_vitb14_reg``:
            ``interpolate_offset=0.0, interpolate_antialias=True``, i.e. bicubic to the
            exact size with antialias), ``mae`` (ProxyCLIP ``mae/pos_embed.py``
            ``interpolate_pos_embed``: bicubic to the exact size, ``align_corners=False``,
            no antialias).
        square_input: the input image was square. DINO/DINOv2 skip the resize only when the
            patch count matches and the image is square; MAE when the grid matches.

    Returns:
        The table in ``table``'s dtype (computed in float32, as DINOv2 and timm do).
    """
    if rule not in POS_EMBED_OF:
        raise ValueError(f"unknown pos-embed rule {rule!r}")
    rows, cols = grid
    n = table.shape[1]
    if rule == "mae":
        unchanged = rows == cols and rows * cols == n
    else:
        unchanged = rows * cols == n and square_input
    if unchanged:
        return table
    return interpolate_pos_embed(table[0], grid, POS_EMBED_OF[rule], prefix=0, force=True)[None]


# ----------------------------------------------------------------------------- attention


def explicit_attention(model: nn.Module) -> int:
    """Make every timm attention module of ``model`` compute softmax(q kᵀ·scale) v itself
    instead of calling the fused ``F.scaled_dot_product_attention``; returns how many.

    The official DINO, DINOv2 (without xformers), MAE (timm 0.4.12) and SAM code all compute
    attention explicitly. The fused kernel sums in another order: on a photo the DINO
    features move by ~2e-4, enough for ProxyCLIP's hard ``S < 0`` mask to flip pairs and
    move logits by up to 2e-3 (docs/protocol.md §16). timm's explicit order ``(q·s) kᵀ``
    equals DINO's and MAE's ``(q kᵀ)·s`` bitwise when s = d_h^-1/2 is a power of two
    (d_h = 64 in every ViT-B); SAM and DINOv2 scale q first, as timm does. Set per model,
    never through timm's process-wide ``set_fused_attn``.
    """
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    if not modules:  # a timm that renamed the switch would silently fuse again
        raise AssertionError(f"{type(model).__name__} has no timm attention with fused_attn")
    for m in modules:
        m.fused_attn = False
    return len(modules)


# ----------------------------------------------------------------------------- backbone


class ProxyBackbone(nn.Module):
    """A loaded proxy: CLIP-normalised windows -> the proxy's patch features.

    Attributes:
        spec: what was asked for.
        model: the timm model (``VisionTransformer`` or ``VisionTransformerSAM``), its
            attention explicit (``explicit_attention``).
        layer: the block used, 1-indexed (resolved: the last when ``spec.layer`` is None).
        identity: ``{proxy, arch, weights (sha256 of the file or the hub tag), layer,
            input_size}`` for records.
        out_channels: C of the features (768 for the ViT-Bs, 256 for SAM's neck).
    """

    def __init__(self, spec: ProxySpec, model: nn.Module, identity: dict) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        explicit_attention(model)
        self.rule = FAMILIES[spec.name].rule
        depth = len(model.blocks)
        self.layer = depth if spec.layer is None else spec.layer
        if not 1 <= self.layer <= depth:
            raise ConfigError(f"proxy.layer={spec.layer} is impossible for {spec.arch}: use a "
                              f"block 1…{depth} (or null for the last)")
        self.identity = {**identity, "layer": self.layer, "input_size": spec.input_size}
        self.out_channels = (model.neck[-1].weight.shape[0] if self.rule == "sam"
                             else model.embed_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the features of a ``height × width`` window."""
        return self.spec.grid(height, width)

    def prepare(self, windows: Tensor) -> Tensor:
        """``(B, 3, H, W)`` CLIP-normalised -> the proxy's input ``(B, 3, H', W')``: back to
        [0, 1] with CLIP's statistics, normalised with the proxy's (in float32, as the
        official code before its ``.half()``), then resized bilinearly to ``input_size``²
        if set (SAM: L120, MAE: L163; resizing commutes with the per-channel affine map)."""
        x = windows.float()
        cm, cs, m, s = (torch.tensor(v, device=x.device).view(1, 3, 1, 1)
                        for v in (CLIP_MEAN, CLIP_STD, self.spec.mean, self.spec.std))
        x = (x * cs + cm - m) / s
        if self.spec.input_size is not None:
            size = (self.spec.input_size, self.spec.input_size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.to(self.dtype)

    def forward(self, windows: Tensor) -> Tensor:
        """``(B, 3, H, W)`` CLIP-normalised windows -> ``(B, C, rows, cols)`` proxy features,
        not L2-normalised, (rows, cols) = ``grid(H, W)``."""
        x = self.prepare(windows)
        if self.rule == "sam":
            return self._sam(x)
        return self._vit(x)

    def _vit(self, x: Tensor) -> Tensor:
        """timm ViT pieces in the official order: patch conv, official pos-embed resize,
        blocks 1…layer, final norm, prefix tokens (CLS, registers) dropped."""
        m = self.model
        square = x.shape[-2] == x.shape[-1]
        # The conv drops a remainder that is not a whole patch, as the official PatchEmbeds.
        t = m.patch_embed.proj(x)
        b, _, rows, cols = t.shape
        t = m.patch_embed.norm(t.flatten(2).transpose(1, 2))
        pos = m.pos_embed
        n_pos_prefix = 0 if m.no_embed_class else m.num_prefix_tokens
        patch_pos = official_pos_embed(pos[:, n_pos_prefix:], (rows, cols), self.rule, square)
        prefix = [p.expand(b, -1, -1) for p in (m.cls_token, m.reg_token) if p is not None]
        if m.no_embed_class:
            # timm's DINOv2-with-registers layout: CLS's pos row is folded into cls_token
            # at conversion and registers have none, the official sequence exactly.
            t = torch.cat([*prefix, t + patch_pos], dim=1)
        else:
            t = torch.cat([*prefix, t], dim=1) + torch.cat([pos[:, :n_pos_prefix], patch_pos],
                                                           dim=1)
        t = m.norm_pre(t)
        for blk in m.blocks[:self.layer]:
            t = blk(t)
        t = m.norm(t)[:, m.num_prefix_tokens:]
        return t.transpose(1, 2).reshape(b, -1, rows, cols)

    def _sam(self, x: Tensor) -> Tensor:
        """SAM's image encoder: patch conv (channels last), absolute pos-embed, blocks
        1…layer (windowed/global attention with relative positions), the conv neck. At
        the checkpoint's own input size (1024) the pos-embed is added as it is, as SAM
        does; another ``input_size`` resizes it with timm's rule (``resample_abs_pos_embed_
        nhwc``: bicubic to the size, antialiased, i.e. ``bicubic_antialias``), and
        the global blocks' relative positions linearly, as SAM's ``get_rel_pos`` would."""
        m = self.model
        t = m.patch_embed.proj(x).permute(0, 2, 3, 1)
        if m.pos_embed is not None:  # (1, g, g, D), channels last
            rows, cols, dim = t.shape[1:]
            pos = interpolate_pos_embed(m.pos_embed.reshape(-1, dim), (rows, cols),
                                        "bicubic_antialias", prefix=0)
            t = t + pos.reshape(1, rows, cols, dim)
        t = m.norm_pre(t)
        for blk in m.blocks[:self.layer]:
            t = blk(t)
        return m.neck(t.permute(0, 3, 1, 2))


# ------------------------------------------------------------------------------ loading


def load_proxy(section: Mapping[str, Any] | ProxySpec | None,
               device: torch.device | str = "cpu",
               precision: str | torch.dtype = "fp32", *,
               arch_kwargs: Mapping[str, Any] | None = None) -> ProxyBackbone | None:
    """Build a proxy backbone with its weights, in eval mode without gradients.

    Args:
        section: the ``proxy`` config section (or a ``ProxySpec``); ``none`` and
            ``clip_self`` give None (no backbone to load).
        device: where it runs.
        precision: fp32 | fp16 | bf16 | auto (fp16 on CUDA, as the official code) or one
            of their torch dtypes (e.g. the CLIP encoder's): ``precision.resolve``.
        arch_kwargs: extra ``timm.create_model`` arguments (reduced test models; a file
            must then fit that model).

    Raises:
        ConfigError: invalid section or precision.
        ProxyError: missing/unreadable file, a file of another architecture, no hub access.
    """
    if section is None or (not isinstance(section, ProxySpec)
                           and section.get("name", "none") in (None, "none")):
        return None
    spec = section if isinstance(section, ProxySpec) else ProxySpec.from_section(section)
    if spec.arch is None:
        return None
    dev = torch.device(device)
    dtype = PRECISIONS[resolve(precision, dev)]
    kwargs = dict(arch_kwargs or {})
    if spec.pretrained.startswith(HUB_TAGS):
        model, weights = from_hub(spec, kwargs), hub_tag(spec)
    else:
        path = Path(spec.pretrained)
        model = from_file(spec, path, kwargs)
        weights = file_digest(path)
    model.eval().requires_grad_(False).to(device=dev, dtype=dtype)
    identity = {"proxy": spec.name, "arch": spec.arch, "weights": weights}
    return ProxyBackbone(spec, model, identity).eval()


# ------------------------------------------------------------------------ in the pipeline


def window_features(spec: ProxySpec, backbone: ProxyBackbone | None, trunk: Any,
                    crops: Iterable[Tensor]) -> Tensor:
    """``(B, C, Hv, Wv)`` a proxy's features of one window group: ``backbone`` on the
    ``crops`` (batches of the group's CLIP-normalised windows, in order), or for clip_self
    (no backbone) the patch tokens of CLIP's stream after block ``spec.layer`` on the CLIP
    grid, from the group's trunk output (``model.TrunkOutput``)."""
    if backbone is None:
        h = trunk.hidden[spec.layer][:, 1:]  # (B, h·w, D)
        return h.transpose(1, 2).reshape(h.shape[0], -1, *trunk.grid)
    return torch.cat([backbone(batch) for batch in crops])


def proxy_identity(spec: ProxySpec | None, backbone: ProxyBackbone | None
                   ) -> dict[str, Any] | None:
    """What a head's proxy is, for records and the banner: the backbone's identity (name,
    arch, weights sha256 or hub tag, layer, input size), clip_self's layer, or None."""
    if spec is None:
        return None
    if backbone is None:
        return {"proxy": spec.name, "arch": None, "layer": spec.layer}
    return dict(backbone.identity)
