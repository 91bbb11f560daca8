"""Analytic FLOPs of the image encoder under a preprocessing protocol (the paper's Table 4).

FLOPs are 2 × multiply-accumulates of the matrix products of one forward of an open_clip
ViT visual tower: the patch-embedding convolution, per block the qkv and output projections,
the attention scores ``q kᵀ`` and the weighted sum ``A v``, the MLP, and the dense path's
final ``@ proj`` applied to every token (docs/protocol.md §1). LayerNorms, softmaxes, activations,
residual adds and biases are element-wise and left out, as fvcore and
``torch.utils.flop_counter`` do. The attention products are counted explicitly because
``FlopCounterMode`` misses them inside fused attention kernels. With these conventions
ViT-B/16 at 224 × 224 is 17.56 GMAC without the final projection, the figure usually quoted.

The decoding-layer variants (CSA, sharpening, ...) change block 12's attention by at most a
second ``T × T`` map; that is ignored here, as it is in the paper's "~4×" column.
"""

from __future__ import annotations

from sclip_lab.segment import resized_shape, window_boxes

# OpenAI CLIP ViT-B/16, the paper's backbone (docs/protocol.md §1).
VIT_B16: dict[str, int] = {"width": 768, "layers": 12, "heads": 12, "patch": 16,
                           "output_dim": 512}


def vit_flops_breakdown(width: int, layers: int, heads: int, patch: int, height: int,
                        width_px: int, mlp_ratio: float = 4.0, output_dim: int = 512
                        ) -> dict[str, int]:
    """FLOPs per part of one ViT forward on a ``height × width_px`` crop.

    Args:
        width: token dimension d.
        layers: number of residual blocks.
        heads: attention heads (they split d, so they do not change the count; checked only).
        patch: patch size p; the grid is ``(height // p) × (width_px // p)`` as the stride-p
            convolution floors.
        height, width_px: crop size in pixels.
        mlp_ratio: hidden width of the MLP over d.
        output_dim: columns of ``proj``; 0 leaves the final projection out.

    Returns:
        ``{"patch_embed", "qkv", "attn_scores", "attn_values", "out_proj", "mlp", "proj"}`` → int.
    """
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    grid = (height // patch) * (width_px // patch)
    if grid < 1:
        raise ValueError(f"a {height}×{width_px} crop holds no {patch}×{patch} patch")
    T, d = grid + 1, width  # tokens incl. CLS
    hidden = int(d * mlp_ratio)
    return {
        "patch_embed": 2 * grid * (3 * patch * patch) * d,  # conv1 has no bias
        "qkv": layers * 2 * T * d * 3 * d,
        # Per head (T, dh) x (dh, T) and (T, T) x (T, dh); over heads dh sums to d.
        "attn_scores": layers * 2 * T * T * d,
        "attn_values": layers * 2 * T * T * d,
        "out_proj": layers * 2 * T * d * d,
        "mlp": layers * 2 * T * d * hidden * 2,
        "proj": 2 * T * d * output_dim,
    }


def vit_encoder_flops(width: int, layers: int, heads: int, patch: int, height: int,
                      width_px: int, mlp_ratio: float = 4.0, output_dim: int = 512) -> int:
    """Total FLOPs (2 × MACs) of one dense ViT forward; see :func:`vit_flops_breakdown`."""
    return sum(vit_flops_breakdown(width, layers, heads, patch, height, width_px, mlp_ratio,
                                   output_dim).values())


def protocol_flops(image_hw: tuple[int, int], short_side: int, crop: int, stride: int,
                   **vit: float) -> int:
    """Encoder FLOPs to segment one image under a (short side, window, stride) protocol.

    The image is resized as the pipeline does (``segment.resized_shape``), cut into the
    sliding windows of ``segment.window_boxes`` and every window costs one forward at its
    own size (windows of a side shorter than ``crop`` are smaller). The text classifier is
    cached and the per-window cosine logits are negligible, so neither is counted.

    Args:
        image_hw: original ``(height, width)`` in pixels.
        short_side, crop, stride: the preprocessing mode (docs/protocol.md §5, §9).
        **vit: keyword arguments of :func:`vit_encoder_flops` overriding ViT-B/16's.

    Returns:
        Total FLOPs over all windows.
    """
    arch = {**VIT_B16, **vit}
    height, width = resized_shape(image_hw[0], image_hw[1], short_side)
    return sum(vit_encoder_flops(height=y2 - y1, width_px=x2 - x1, **arch)
               for y1, y2, x1, x2 in window_boxes(height, width, crop, stride))


def open_clip_vit(name: str) -> dict[str, float]:
    """The ``vit`` keyword arguments of an open_clip model config name (e.g. ``ViT-B-16``).

    Raises:
        ValueError: the name is unknown to open_clip or is not a plain ViT tower.
    """
    import open_clip  # heavy (torch); only needed when counting another architecture

    cfg = open_clip.get_model_config(name)
    vision = (cfg or {}).get("vision_cfg") or {}
    if not cfg or "timm_model_name" in vision or isinstance(vision.get("layers"), list | tuple):
        known = [m for m in open_clip.list_models() if m.startswith("ViT")]
        raise ValueError(f"{name!r} is not an open_clip ViT config; known ViTs: {known}")
    width = int(vision["width"])
    return {"width": width, "layers": int(vision["layers"]),
            "heads": width // int(vision.get("head_width", 64)),
            "patch": int(vision["patch_size"]), "mlp_ratio": float(vision.get("mlp_ratio", 4.0)),
            "output_dim": int(cfg["embed_dim"])}
