"""Dense forward of open_clip's timm towers (``TimmModel``: SigLIP, SigLIP 2; PE-Core and
EVA-02 through ``EvaDenseEncoder``), and the one dispatch from a visual tower to its dense
encoder (docs/protocol.md "Dense features of MAP towers").

A timm ``VisionTransformer`` differs from open_clip's own tower in its names (``norm1``,
fused ``attn.qkv``, ``ls1``, ``norm2``, ``norm``), its token layout and its readout:

* tokens are the prefix tokens (``num_prefix_tokens``: a CLS and registers where the tower
  has them; none for SigLIP) then the patch grid row-major, so ``N = prefix + h·w``;
* a MAP tower (``global_pool="map"``) pools with ``AttentionPoolLatent``: a learned latent
  query attends over every token, then ``proj`` and a residual MLP. Each token's dense
  feature is read out through the pool's value path alone, as TextRegion does for SigLIP 2:
  ``fc_norm(proj(v(norm(x_t))))`` then open_clip's head, L2-normalised.

``TimmDenseEncoder`` keeps ``DenseEncoder``'s contract (``embed``, ``trunk``, ``last_inputs``,
``last_block``, ``features``, ``head``, ``logits``, ``pooled``), so the Segmenter, the
trunk cache and the heads run unchanged; ``provides`` says what a method may ask of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sclip_lab.attention import AttentionInputs, merge_heads, split_heads
from sclip_lab.features import TrunkOutput
from sclip_lab.knobs import call_with
from sclip_lab.model import (
    CLIP_PROVIDES,
    DenseEncoder,
    LastBlock,
    ModelError,
    head_inputs,
    patch_logits,
    run_blocks,
)
from sclip_lab.pos_embed import DEFAULT_POS_EMBED, interpolate_pos_embed

# What a MAP tower without a CLS hands a method: per-head q/k/v of its last block, the
# hidden states and the patch grid; no CLS token and no open_clip residual blocks.
TIMM_PROVIDES = frozenset({"qkv", "hidden", "grid"})


def dense_encoder(visual: nn.Module) -> DenseEncoder:
    """The dense encoder of an open_clip visual tower: ``DenseEncoder`` for open_clip's
    ``VisionTransformer``, ``TimmDenseEncoder`` for a ``TimmModel`` ViT."""
    from open_clip.timm_model import TimmModel

    if isinstance(visual, TimmModel):
        from timm.models.eva import Eva

        return (EvaDenseEncoder if isinstance(visual.trunk, Eva) else TimmDenseEncoder)(visual)
    return DenseEncoder(visual)


def timm_qkv(block: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head q, k, v ``(B, heads, N, d_h)`` of a timm block's fused ``attn.qkv`` on its
    norm1 output ``z``, with the block's q/k norms applied (as timm's ``Attention``)."""
    attn = block.attn
    q, k, v = attn.qkv(z).chunk(3, dim=-1)
    q, k, v = (split_heads(t, attn.num_heads) for t in (q, k, v))
    return attn.q_norm(q), attn.k_norm(k), v


def timm_around(block: nn.Module, x: Tensor, o: Tensor, residual: bool, ffn: bool,
                alpha: float = 1.0) -> Tensor:
    """``(B, N, D)``: a timm block around its attention output ``o`` (after ``attn.proj``),
    with the block knobs of ``attention.around`` (timm's names: ls1, norm2, mlp, ls2)."""
    if alpha != 1:
        o = o * alpha
    y = x + block.ls1(o) if residual else o
    return y + block.ls2(block.mlp(block.norm2(y))) if ffn else y


class TimmDenseEncoder(DenseEncoder):
    """open_clip ``TimmModel`` ViT tower -> L2-normalised dense features ``(B, h·w, E)``.

    Token layout: ``N = prefix + h·w`` (``prefix`` = the trunk's ``num_prefix_tokens``,
    0 for SigLIP); ``head`` and ``logits`` drop the prefix rows.
    """

    def __init__(self, visual: nn.Module):  # noqa: D107 - no DenseEncoder.__init__: other names
        nn.Module.__init__(self)
        vit = visual.trunk
        name = type(vit).__name__
        if not isinstance(vit, self.towers()):
            raise ModelError(f"the timm tower {name} has no dense encoder here; use a "
                             "SigLIP / SigLIP 2, EVA-02, PE-Core or open_clip ViT preset")
        first = vit.blocks[0]
        if not hasattr(first, "norm1") or getattr(first.attn, "gate", None) is not None:
            raise ModelError(f"the timm ViT blocks of {name} ({type(first).__name__}) are not "
                             "pre-norm attention blocks; use a SigLIP or an open_clip ViT preset")
        pool = vit.attn_pool
        if pool is not None and (pool.pos_embed is not None or pool.latent_len != 1):
            raise ModelError("the MAP head has its own position table or several latents; "
                             "its dense readout is not defined here")
        self.visual = visual
        self.vit = vit
        self.depth = len(vit.blocks)
        self.patch = vit.patch_embed.patch_size[0]
        self.prefix = vit.num_prefix_tokens
        self.width = vit.embed_dim
        self.kind = f"timm {name}" + (" (MAP head)" if pool is not None else "")
        self.provides = TIMM_PROVIDES | ({"cls"} if vit.cls_token is not None else set())

    @staticmethod
    def towers() -> tuple[type, ...]:
        """The timm trunk classes this encoder transcribes."""
        from timm.models.vision_transformer import VisionTransformer

        return (VisionTransformer,)

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.patch_embed.proj.weight.dtype

    @property
    def bind_attn(self) -> SimpleNamespace:
        """The last block's attention as CSA's ``prepare`` reads it: ``embed_dim``,
        ``num_heads`` and the fused ``in_proj_weight`` / ``in_proj_bias`` (q, k, v rows)."""
        attn = self.vit.blocks[-1].attn
        bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros_like(
            attn.qkv.weight[:, 0])
        return SimpleNamespace(embed_dim=self.width, num_heads=attn.num_heads,
                               in_proj_weight=attn.qkv.weight, in_proj_bias=bias)

    def pos_table(self, grid: tuple[int, int], pos_embed: str) -> Tensor:
        """``(1, rows, D)`` the trunk's position table on ``grid``: timm's own resize
        (``resample_abs_pos_embed``, bicubic with antialias, what the tower does with
        ``dynamic_img_size``) for the default rule, else the head's rule."""
        from timm.layers import resample_abs_pos_embed

        vit = self.vit
        prefix = 0 if vit.no_embed_class else self.prefix
        if pos_embed == DEFAULT_POS_EMBED:
            return resample_abs_pos_embed(vit.pos_embed, list(grid),
                                          list(vit.patch_embed.grid_size),
                                          num_prefix_tokens=prefix)
        return interpolate_pos_embed(vit.pos_embed[0], grid, pos_embed, prefix=prefix,
                                     force=False)[None]

    def embed(self, images: Tensor, pos_embed: str = DEFAULT_POS_EMBED
              ) -> tuple[Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` -> tokens ``(B, prefix + h·w, D)`` after ``norm_pre``, and the grid
        (timm's ``_pos_embed`` order: add-then-concat where ``no_embed_class``)."""
        vit = self.vit
        x = vit.patch_embed.proj(images.to(self.dtype))  # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))  # (B, h·w, D)
        prefix = [t.expand(x.shape[0], -1, -1).to(x.dtype)
                  for t in (vit.cls_token, vit.reg_token) if t is not None]
        pos = self.pos_table(grid, pos_embed).to(x.dtype)
        if vit.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return vit.norm_pre(vit.pos_drop(x)), grid

    def trunk(self, images: Tensor, early_layers: Sequence[int] = (),
              hidden_layers: Sequence[int] = (), pos_embed: str = DEFAULT_POS_EMBED,
              features: Sequence[str] = ()) -> TrunkOutput:
        """Blocks 1…depth−1, as ``DenseEncoder.trunk`` (early maps of τ = 8, hidden states,
        named features)."""
        x, grid = self.embed(images, pos_embed)
        return run_blocks(self, images, x, grid, self.vit.blocks,
                          lambda block, x: timm_qkv(block, block.norm1(x)), early_layers,
                          hidden_layers, pos_embed, features)

    def features(self, tokens: Tensor) -> Tensor:
        """``(B, N, D)`` block output -> ``(B, N, E)`` unit features: the final ``norm``,
        then for a MAP tower each token through the pool's value path (``kv``'s v half,
        ``proj``; no attention, no MLP: TextRegion), then ``fc_norm`` and open_clip's head."""
        vit = self.vit
        t = vit.norm(tokens)
        pool = vit.attn_pool
        if pool is not None:
            v = pool.kv(t)[..., pool.kv.out_features // 2:]  # (B, N, C): kv is [k | v]
            t = pool.proj_drop(pool.proj(v))
        t = self.visual.head(vit.head_drop(vit.fc_norm(t)))
        return F.normalize(t.float(), dim=-1)

    def head(self, trunk: TrunkOutput, last: LastBlock) -> Tensor:
        """``(B, h·w, E)`` unit patch features (prefix tokens dropped) after ``last``."""
        return self.features(self.last_block(trunk, last))[:, self.prefix:]

    def last_inputs(self, trunk: TrunkOutput, last: LastBlock, queries: Tensor | None = None,
                    logit_scale: float | None = None) -> AttentionInputs:
        """As ``DenseEncoder.last_inputs``, on the timm block (norm1, fused qkv, q/k norms);
        ``blocks`` is empty: multi-block paths are open_clip-only (``provides``)."""
        block = self.vit.blocks[-1]
        z = block.norm1(trunk.x)
        return head_inputs(self, trunk, last, z, self.qkv_of(block, z, trunk.grid), (),
                           queries, logit_scale)

    def last_block(self, trunk: TrunkOutput, last: LastBlock, queries: Tensor | None = None,
                   logit_scale: float | None = None) -> Tensor:
        """``(B, N, D)`` output of the last timm block under ``last``'s attention (before
        the final norm): A·v, the attention's output norm, ``proj``, then the block."""
        block = self.vit.blocks[-1]
        inputs = self.last_inputs(trunk, last, queries, logit_scale)
        if last.variant.output == "tokens":
            return call_with(last.variant.fn, inputs, knobs=last.params)
        attn = last.attention(inputs)
        o = merge_heads(attn.to(inputs.v.dtype) @ inputs.v)
        o = block.attn.proj_drop(block.attn.proj(block.attn.norm(o)))
        return self.around(block, trunk.x, o, last.keeps_residual, last.keeps_ffn, last.alpha)

    def qkv_of(self, block: nn.Module, z: Tensor, grid: tuple[int, int]
               ) -> tuple[Tensor, Tensor, Tensor]:
        """The last block's per-head q, k, v on ``z`` (its LN1 output) on ``grid``."""
        return timm_qkv(block, z)

    def around(self, block: nn.Module, x: Tensor, o: Tensor, residual: bool, ffn: bool,
               alpha: float) -> Tensor:
        """The last block around its attention output ``o`` (the block knobs)."""
        return timm_around(block, x, o, residual, ffn, alpha)

    def logits(self, trunk: TrunkOutput, last: LastBlock, queries: Tensor,
               logit_scale: float | None = None, query_class: Tensor | None = None) -> Tensor:
        """``(B, Q, h, w)`` patch cosine logits; a readout variant gets every token (the
        prefix first), as on open_clip towers."""
        feats = self.features(self.last_block(trunk, last, queries, logit_scale))
        if last.variant.readout is None:
            return patch_logits(feats[:, self.prefix:], queries, trunk.grid)
        scores = call_with(last.variant.readout, feats, queries.float(),
                           knobs={**last.params, "query_class": query_class})
        return scores.transpose(1, 2).reshape(scores.shape[0], -1, *trunk.grid)

    def pooled(self, images: Tensor, last: LastBlock) -> Tensor:
        """``(B, E)`` the tower's own pooled output (MAP head, or its pool) after ``last``:
        with vanilla attention, what open_clip's ``encode_image`` returns."""
        tokens = self.last_block(self.trunk_for(images, last), last)
        return self.visual.head(self.vit.forward_head(self.vit.norm(tokens)))


class EvaDenseEncoder(TimmDenseEncoder):
    """timm ``Eva`` towers (EVA-02, PE-Core): ``TimmDenseEncoder`` with rotary embeddings on
    the grid tokens of every block (timm's ``rope.get_embed(shape=grid)``, as the tower does
    with ``dynamic_img_size``), the attention's q/k/v biases, and the blocks' ``gamma``
    layer scales; the readout is the same (MAP value path, or ``fc_norm`` then the head)."""

    def __init__(self, visual: nn.Module):  # noqa: D107
        super().__init__(visual)
        attn = self.vit.blocks[0].attn
        if getattr(self.vit, "rope_mixed", False) or getattr(attn, "num_kv_groups", 1) > 1:
            raise ModelError("this EVA tower's mixed rotary embeddings or grouped k/v heads "
                             "have no dense encoder yet; use a SigLIP or an open_clip ViT preset")

    @staticmethod
    def towers() -> tuple[type, ...]:
        from timm.models.eva import Eva

        return (Eva,)

    def rope(self, grid: tuple[int, int]) -> Tensor | None:
        """The rotary table of ``grid`` (None for a tower without rotary embeddings)."""
        rope = self.vit.rope
        if rope is None:
            return None
        if not getattr(rope, "_use_cached_embed", False):  # bands mode: built per shape
            return rope.get_embed(shape=list(grid))
        if tuple(rope.feat_shape) == tuple(grid):
            return rope.get_embed()
        # a cached table of the native grid: rebuilt from the tower's bands for this grid, as
        # timm's set_input_size does (_update_cached_embed)
        return rope._build_embed_cat(list(grid), rope.bands, dtype=rope.pos_embed.dtype)

    def qkv_weights(self, attn: nn.Module) -> tuple[Tensor, Tensor]:
        """The fused ``(3·D, D)`` weight and ``(3·D,)`` bias of q, k, v (zeros where none)."""
        if attn.qkv is not None:
            weight = attn.qkv.weight
            bias, q_bias = attn.qkv.bias, getattr(attn, "q_bias", None)
            if q_bias is not None:  # EVA's separate q/v biases; k has none (None or zeros)
                extra = torch.cat([torch.zeros_like(q_bias) if t is None else t
                                   for t in (q_bias, attn.k_bias, attn.v_bias)])
                bias = extra if bias is None else bias + extra
        else:
            layers = (attn.q_proj, attn.k_proj, attn.v_proj)
            weight = torch.cat([m.weight for m in layers])
            bias = torch.cat([torch.zeros_like(m.weight[:, 0]) if m.bias is None else m.bias
                              for m in layers])  # EVA-02: k_proj has no bias
        return weight, torch.zeros_like(weight[:, 0]) if bias is None else bias

    @property
    def bind_attn(self) -> SimpleNamespace:
        attn = self.vit.blocks[-1].attn
        weight, bias = self.qkv_weights(attn)
        return SimpleNamespace(embed_dim=self.width, num_heads=attn.num_heads,
                               in_proj_weight=weight, in_proj_bias=bias)

    def qkv_of(self, block: nn.Module, z: Tensor, grid: tuple[int, int]
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q, k, v ``(B, heads, N, d_h)``: biases, q/k norms, then the rotary
        embedding on the grid tokens (timm ``EvaAttention`` / ``AttentionRope``)."""
        from timm.layers import apply_rot_embed_cat

        attn = block.attn
        weight, bias = self.qkv_weights(attn)
        q, k, v = (split_heads(t, attn.num_heads)
                   for t in F.linear(z, weight, bias).chunk(3, dim=-1))
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = self.rope(grid)
        if rope is not None:
            n, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q, k = (torch.cat([t[:, :, :n], apply_rot_embed_cat(t[:, :, n:], rope, half=half)],
                              dim=2).type_as(v) for t in (q, k))
        return q, k, v

    def embed(self, images: Tensor, pos_embed: str = DEFAULT_POS_EMBED
              ) -> tuple[Tensor, tuple[int, int]]:
        vit = self.vit
        if vit.pos_embed is not None:
            return super().embed(images, pos_embed)
        x = vit.patch_embed.proj(images.to(self.dtype))
        grid = (x.shape[2], x.shape[3])
        x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = [t.expand(x.shape[0], -1, -1).to(x.dtype)
                  for t in (vit.cls_token, vit.reg_token) if t is not None]
        return vit.norm_pre(vit.pos_drop(torch.cat(prefix + [x], dim=1))), grid

    def trunk(self, images: Tensor, early_layers: Sequence[int] = (),
              hidden_layers: Sequence[int] = (), pos_embed: str = DEFAULT_POS_EMBED,
              features: Sequence[str] = ()) -> TrunkOutput:
        x, grid = self.embed(images, pos_embed)
        rope = self.rope(grid)
        return run_blocks(self, images, x, grid, self.vit.blocks,
                          lambda block, x: self.qkv_of(block, block.norm1(x), grid),
                          early_layers, hidden_layers, pos_embed, features,
                          call=lambda block, x: block(x, rope=rope))

    def around(self, block: nn.Module, x: Tensor, o: Tensor, residual: bool, ffn: bool,
               alpha: float) -> Tensor:
        """EVA's block around ``o``: ``gamma_1``/``gamma_2`` are its layer scales."""
        g1, g2 = block.gamma_1, block.gamma_2
        o = o * alpha if alpha != 1 else o
        o = o if g1 is None else g1 * o
        y = x + o if residual else o
        if not ffn:
            return y
        m = block.mlp(block.norm2(y))
        return y + (m if g2 is None else g2 * m)



__all__ = ["CLIP_PROVIDES", "TIMM_PROVIDES", "EvaDenseEncoder", "TimmDenseEncoder",
           "dense_encoder", "timm_around", "timm_qkv"]
