"""Load any open_clip model (hub tag, open_clip or OpenAI file: ``load_clip``) and run its
ViT densely: blocks 1…depth−1 unchanged (``DenseEncoder.trunk``), the last block with a
registered attention variant (``head``), ``ln_post`` and ``proj`` on every token (§1–2).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sclip_lab.attention import (
    AttentionInputs,
    around,
    attention_qkv,
    merge_heads,
    softmax_attention,
)
from sclip_lab.backbones import looks_like, weights_signature, weights_unavailable
from sclip_lab.checkpoint import load_state
from sclip_lab.console import quiet_open_clip
from sclip_lab.errors import UserError, brief
from sclip_lab.features import TrunkOutput, check_names, compute, context
from sclip_lab.files import file_digest
from sclip_lab.knobs import Variant, call_with
from sclip_lab.pos_embed import DEFAULT_POS_EMBED, interpolate_pos_embed
from sclip_lab.precision import resolve

log = logging.getLogger(__name__)

# Buffers OpenAI's TorchScript CLIP carries beside its weights; their presence marks the format.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
# What open_clip's own ViT hands a method (``Variant.requires``): a CLS token, per-head q/k/v
# of the last block, hidden states, the patch grid, open_clip residual blocks (multi-block paths).
CLIP_PROVIDES = frozenset({"cls", "qkv", "hidden", "grid", "blocks"})


class ModelError(UserError):
    """A model or checkpoint problem, with the fix in the message."""


# ----------------------------------------------------------------------------- loading


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"device={device!r} is not one of auto|cpu|cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("device=cuda but no CUDA device is visible; use device=cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device, notes: str | None = None) -> str:
    """``auto`` -> fp16 on CUDA, fp32 on CPU (``precision.resolve``, as a ModelError)."""
    return resolve(precision, device, ModelError, None if notes is None else Path(notes))


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], bool]:
    """Read a checkpoint file -> (state dict, is_openai_format).

    Accepts safetensors, ``torch.save`` dicts (optionally under ``state_dict`` with a
    ``module.`` prefix) and OpenAI's TorchScript archives.
    """
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; set model.pretrained to a file "
                         "or a hub tag such as 'openai'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd, jit = load_file(str(path)), False
        elif zipfile.is_zipfile(path) and _is_torchscript(path):
            sd, jit = torch.jit.load(str(path), map_location="cpu").state_dict(), True
        else:
            sd, jit = torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as e:  # noqa: BLE001 - any decoding failure means "not a checkpoint"
        raise ModelError(f"{path} is not a readable checkpoint ({brief(e)}); pass an "
                         "open_clip or OpenAI CLIP ViT weights file", detail=str(e)) from None
    if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelError(f"{path} holds no state dict of tensors; pass a CLIP ViT checkpoint")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if weights_signature(sd) is None:
        alone = "patch_embed.proj.weight" in sd or "transformer.resblocks.0.ln_1.weight" in sd
        raise ModelError(f"{path} is not a CLIP checkpoint (" + (
            "an image tower alone, no text tower" if alone else "no visual.conv1 or "
            "visual.trunk keys") + "); pass an open_clip or OpenAI CLIP weights file (for a "
            "hub model its open_clip_model.safetensors / open_clip_pytorch_model.bin)")
    openai = jit or any(k in sd for k in OPENAI_META_KEYS)
    return {k: v for k, v in sd.items() if k not in OPENAI_META_KEYS}, openai


def check_family(state: Mapping[str, Tensor], path: Path, model: nn.Module, arch: str) -> None:
    """A file of another tower than the built ``model`` (kind, width, patch, size, blocks,
    text side) is named in one line with the presets that fit it, before any loading."""
    if weights_signature(state) == weights_signature(model.state_dict()):
        return
    words, fits = looks_like(state)
    raise ModelError(f"{path} does not fit model.arch={arch}: it looks like {words}; " + (
        f"use model={'|'.join(fits)}" if fits else "set model.arch (and model.config_file) to "
        "its architecture"))


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def quickgelu_arch(arch: str) -> str:
    """The QuickGELU twin of an open_clip config name (OpenAI weights need it)."""
    if arch.endswith("-quickgelu"):
        return arch
    twin = f"{arch}-quickgelu"
    return twin if twin in open_clip.list_models() else arch


def load_clip(arch: str, pretrained: str, precision: str = "auto", device: str = "auto",
              quick_gelu: bool | None = None, config_file: str | None = None,
              cache_dir: str | None = None) -> tuple[nn.Module, dict]:
    """Build an open_clip CLIP ViT with weights.

    Args:
        arch: open_clip config name (``ViT-B-16-quickgelu``, ``ViT-L-14``…).
        pretrained: a hub tag (``openai``, ``laion2b_s34b_b88k``…), a local checkpoint
            path, or ``none`` for random weights (tests).
        precision: ``auto`` (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16 (emulated,
            slow, on CPUs without AMX/AVX-512: ``sclip_lab.precision``).
        device: ``auto`` | cpu | cuda.
        quick_gelu: force the activation; None = QuickGELU exactly for OpenAI weights.
        config_file: an extra open_clip model-config JSON to register first (custom arch).
        cache_dir: where tips already given are marked (the precision tip, once per cache).

    Returns:
        ``(model in eval mode, info)`` where info records what was resolved.
    """
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ModelError(f"model.config_file={path} does not exist")
        open_clip.add_model_config(path)
    if arch not in open_clip.list_models():
        near = [m for m in open_clip.list_models() if m.lower().startswith(arch[:5].lower())]
        raise ModelError(f"unknown model.arch={arch!r}; open_clip has e.g. {near[:12]}")
    quiet_open_clip()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, cache_dir)
    path = Path(os.path.expanduser(pretrained))
    is_file = pretrained not in ("", "none") and (path.suffix != "" or path.exists())
    state, openai = (read_checkpoint(path) if is_file
                     else (None, pretrained == "openai"))
    if quick_gelu is None:
        quick_gelu = openai or arch.endswith("-quickgelu")
    built = quickgelu_arch(arch) if quick_gelu else arch
    if quick_gelu and built != arch:
        log.info("OpenAI weights: building %s (QuickGELU) instead of %s", built, arch)
    tag = pretrained if not is_file and pretrained not in ("", "none") else None
    try:
        model = open_clip.create_model(built, pretrained=tag, precision=prec, device=dev,
                                       force_quick_gelu=quick_gelu and built == arch
                                       and not arch.endswith("-quickgelu"))
    except RuntimeError as e:
        raise ModelError(weights_unavailable(arch, built, pretrained, brief(e)),
                         detail=str(e)) from None
    if not isinstance(getattr(model, "visual", None), (open_clip.transformer.VisionTransformer,
                                                       open_clip.timm_model.TimmModel)):
        raise ModelError(f"{arch} has no open_clip VisionTransformer or timm tower; use a ViT "
                         "config")
    if state is not None:
        check_family(state, path, model, built)
        load_state(model, state, path, f"model.arch={built}",
                   "set model.arch to the checkpoint's architecture", error=ModelError)
    model.eval().requires_grad_(False)
    info = {"arch": built, "pretrained": pretrained, "precision": prec, "device": str(dev),
            "quick_gelu": bool(quick_gelu), "openai_format": bool(openai),
            "weights_sha256": file_digest(path) if state is not None else None}
    return model, info


def clip_from_section(model: Mapping[str, Any], precision: str = "auto", device: str = "auto",
                      cache_dir: str | None = None) -> tuple[nn.Module, dict]:
    """``load_clip`` for a ``model`` section (arch, pretrained, quick_gelu, config_file)."""
    return load_clip(model["arch"], str(model["pretrained"]), precision, device,
                     model.get("quick_gelu"), model.get("config_file"), cache_dir)


# ------------------------------------------------------------------------ dense forward


@dataclass(frozen=True)
class LastBlock:
    """A built last-block variant: the registered attention with its knobs bound, and the
    block around it (``sclip_lab.knobs``: residual, MLP, output scale alpha)."""

    variant: Variant
    params: Mapping
    early_layers: tuple[int, ...] = ()
    hidden_layers: tuple[int, ...] = ()
    residual: bool | None = None  # None: the variant's own
    ffn: bool | None = None
    alpha: float = 1.0
    proxy: Any = None  # the proxy spec whose features it reads (TrunkOutput.proxy key)
    pos_embed: str = DEFAULT_POS_EMBED  # the trunk it reads: its position-embedding rule
    features: tuple[str, ...] = ()  # the named trunk features it reads (features.py)

    def __post_init__(self):
        check_names(self.features)  # a provider for each, registered before it is built

    @property
    def keeps_residual(self) -> bool:
        return self.variant.residual if self.residual is None else self.residual

    @property
    def keeps_ffn(self) -> bool:
        return self.variant.ffn if self.ffn is None else self.ffn

    def attention(self, inputs: AttentionInputs) -> Tensor:
        """``(B, heads, N, N)``: the last block's attention matrix."""
        return self.variant.attention_map(inputs, self.params)


class DenseEncoder(nn.Module):
    """open_clip visual tower -> L2-normalised dense features ``(B, h·w, E)``."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None:
            raise ModelError("towers with attentional pooling (e.g. SigLIP) are not supported")
        self.visual = visual
        self.depth = len(visual.transformer.resblocks)
        self.patch = visual.conv1.kernel_size[0]
        self.prefix = 1  # the CLS token precedes the grid
        self.width = int(visual.transformer.width)
        self.provides = CLIP_PROVIDES

    @property
    def bind_attn(self) -> nn.Module:
        """The last block's attention, as a variant's ``prepare`` reads it (``BindContext``)."""
        return self.visual.transformer.resblocks[-1].attn

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def embed(self, images: Tensor, pos_embed: str = DEFAULT_POS_EMBED
              ) -> tuple[Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` -> tokens ``(B, 1 + h·w, D)`` after ln_pre, and the grid; the
        position table resized to the grid by the rule ``pos_embed``."""
        v = self.visual
        x = v.conv1(images.to(self.dtype))  # (B, D, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, h·w, D)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(
            v.positional_embedding, grid, pos_embed).to(x.dtype)
        return v.ln_pre(x), grid

    def trunk(self, images: Tensor, early_layers: Sequence[int] = (),
              hidden_layers: Sequence[int] = (), pos_embed: str = DEFAULT_POS_EMBED,
              features: Sequence[str] = ()) -> TrunkOutput:
        """Blocks 1…depth−1 on ``(B, 3, H, W)``, keeping the attention maps of ``early_layers``
        (1-indexed; ``depth`` means the last block's own vanilla map, computed in ``head``)
        and the stream after each of ``hidden_layers`` (0: the embedding after ln_pre), then
        the named ``features`` of their providers (``sclip_lab.features``)."""
        x, grid = self.embed(images, pos_embed)
        return run_blocks(self, images, x, grid, self.visual.transformer.resblocks,
                          lambda block, x: attention_qkv(block, block.ln_1(x)), early_layers,
                          hidden_layers, pos_embed, features)

    def head(self, trunk: TrunkOutput, last: LastBlock) -> Tensor:
        """``(B, h·w, E)`` L2-normalised patch features (CLS dropped) after ``last``'s block."""
        return self.features(self.last_block(trunk, last))[:, 1:]

    def features(self, tokens: Tensor) -> Tensor:
        """``(B, N, D)`` block output -> ``(B, N, E)`` unit features (ln_post, proj)."""
        return F.normalize((self.visual.ln_post(tokens) @ self.visual.proj).float(), dim=-1)

    def last_inputs(self, trunk: TrunkOutput, last: LastBlock, queries: Tensor | None = None,
                    logit_scale: float | None = None) -> AttentionInputs:
        """What the last block's attention variant sees: LN1 output, per-head q/k/v with
        in_proj biases, the grid, borrowed maps (the last block's own vanilla map too),
        hidden states, the blocks, its named features, and for two-pass methods the text
        queries, the segmenter's logit scale, the windows' pixels and the readout."""
        block = self.visual.transformer.resblocks[-1]
        z = block.ln_1(trunk.x)
        return head_inputs(self, trunk, last, z, attention_qkv(block, z),
                           self.visual.transformer.resblocks, queries, logit_scale)

    def last_attention(self, trunk: TrunkOutput, last: LastBlock) -> Tensor:
        """``(B, heads, N, N)``: the last block's attention map under ``last``."""
        return last.attention(self.last_inputs(trunk, last))

    def last_block(self, trunk: TrunkOutput, last: LastBlock, queries: Tensor | None = None,
                   logit_scale: float | None = None) -> Tensor:
        """``(B, N, D)`` output of the last block under ``last``'s attention (before ln_post);
        ``queries`` ``(Q, E)`` and ``logit_scale`` reach variants that read the text
        (two-pass methods)."""
        block = self.visual.transformer.resblocks[-1]
        x = trunk.x
        inputs = self.last_inputs(trunk, last, queries, logit_scale)
        if last.variant.output == "tokens":  # a multi-block path computes its own output
            return call_with(last.variant.fn, inputs, knobs=last.params)
        attn = last.attention(inputs)
        out = block.attn.out_proj(merge_heads(attn.to(inputs.v.dtype) @ inputs.v))
        return around(block, x, out, last.keeps_residual, last.keeps_ffn, last.alpha)

    def logits(self, trunk: TrunkOutput, last: LastBlock, queries: Tensor,
               logit_scale: float | None = None, query_class: Tensor | None = None) -> Tensor:
        """``(B, Q, h, w)`` patch logits (a proxy variant's on its proxy's grid): the cosine
        with ``queries`` ``(Q, E)``, or the variant's own readout of every token (CLS too).
        ``logit_scale``: the segmenter's, for variants that classify inside the block;
        ``query_class`` ``(Q,)``: each query's class, for readouts over classes."""
        feats = self.features(self.last_block(trunk, last, queries, logit_scale))
        grid = trunk.proxy[last.proxy].shape[-2:] if last.variant.proxy else trunk.grid
        if last.variant.readout is None:
            return patch_logits(feats[:, 1:], queries, grid)
        scores = call_with(last.variant.readout, feats, queries.float(),
                           knobs={**last.params, "query_class": query_class})  # (B, h·w, Q)
        return scores.transpose(1, 2).reshape(scores.shape[0], -1, *grid)

    def trunk_for(self, images: Tensor, last: LastBlock) -> TrunkOutput:
        """``trunk`` with everything ``last`` reads, by its position-embedding rule."""
        return self.trunk(images, last.early_layers, last.hidden_layers, last.pos_embed,
                          last.features)

    def forward(self, images: Tensor, last: LastBlock) -> Tensor:
        return self.head(self.trunk_for(images, last), last)

    def pooled(self, images: Tensor, last: LastBlock) -> Tensor:
        """``(B, E)`` CLS output, the quantity open_clip's ``encode_image`` returns."""
        tokens = self.last_block(self.trunk_for(images, last), last)
        return self.visual.ln_post(tokens[:, 0]) @ self.visual.proj


def head_inputs(encoder: Any, trunk: TrunkOutput, last: LastBlock, z: Tensor,
                qkv: tuple[Tensor, Tensor, Tensor], blocks: Sequence[nn.Module],
                queries: Tensor | None, logit_scale: float | None) -> AttentionInputs:
    """``AttentionInputs`` of any tower's last block from its LN1 output ``z`` and per-head
    ``qkv``: the trunk's maps, states and named features, the last block's own vanilla map
    where ``last`` borrows it, the block knobs."""
    if trunk.pos_embed != last.pos_embed:  # a bug of the caller, never a user's input
        raise ValueError(f"a head of pos_embed={last.pos_embed} was given a trunk embedded "
                         f"by {trunk.pos_embed}; run the trunk with its rule")
    if missing := [n for n in last.features if n not in trunk.named]:  # a caller's bug too
        raise ValueError(f"a head reading the features {missing} was given a trunk "
                         "without them; run the trunk with them (trunk_for, encode_heads)")
    q, k, v = qkv
    early = dict(trunk.early)
    if encoder.depth in last.early_layers:
        early[encoder.depth] = softmax_attention(q, k)
    block_knobs = {"residual": last.keeps_residual, "ffn": last.keeps_ffn, "alpha": last.alpha}
    return AttentionInputs(
        z=z, q=q, k=k, v=v, grid=trunk.grid, early=early, x=trunk.x, hidden=trunk.hidden,
        blocks=blocks, block=block_knobs, queries=queries, images=trunk.images,
        features=encoder.features, proxy=trunk.proxy.get(last.proxy), logit_scale=logit_scale,
        named={n: trunk.named[n] for n in last.features}, depth=encoder.depth)


def run_blocks(encoder: Any, images: Tensor, x: Tensor, grid: tuple[int, int],
               blocks: Sequence[nn.Module], qkv: Any, early_layers: Sequence[int],
               hidden_layers: Sequence[int], pos_embed: str, features: Sequence[str],
               call: Any = None) -> TrunkOutput:
    """Blocks 1…D−1 of any tower on its embedded tokens ``x`` ``(B, N, D)``: the vanilla
    maps of ``early_layers`` (``qkv(block, x) -> q, k, v`` per head of the block's attention
    input), the stream after ``hidden_layers`` (0: ``x`` itself), then the named
    ``features`` of their providers. ``call(block, x)`` runs a block (default ``block(x)``;
    EVA passes its rotary table)."""
    early, hidden = {}, {}
    if 0 in hidden_layers:
        hidden[0] = x
    for i, block in enumerate(blocks[:-1], start=1):
        if i in early_layers:
            q, k, _ = qkv(block, x)
            early[i] = softmax_attention(q, k)
        x = block(x) if call is None else call(block, x)
        if i in hidden_layers:
            hidden[i] = x
    out = TrunkOutput(x, grid, early, hidden, images, pos_embed=pos_embed)
    out.named.update(compute(features, context(out, encoder)))
    return out


def patch_logits(feats: Tensor, queries: Tensor, grid: tuple[int, int]) -> Tensor:
    """Dense features ``(B, h·w, E)`` -> cosine logits ``(B, Q, h, w)`` on the patch grid."""
    return (feats @ queries.float().T).transpose(1, 2).reshape(feats.shape[0], -1, *grid)
