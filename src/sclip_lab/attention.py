"""Last-block attention variants (docs/protocol.md §2–3), one small function each, in a registry.

Every variant maps the last block's per-head tensors to an attention matrix::

    fn(inputs: AttentionInputs, **params) -> A   # (B, heads, N, N), N = 1 + h·w

The block then computes ``out_proj(merge_heads(A @ v))`` and, when the variant keeps the
residual (``Variant.residual``), adds it to the block input and applies the MLP as CLIP
does. A new variant is one decorated function here plus ``conf/attention/<name>.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

HEAD_TEMPERATURE = 8.0  # √d_h for the 64-wide heads of every CLIP ViT
# CSA as published: the projection set {W_q, W_k}, their attentions summed, τ = 8.
DEFAULT_PROJECTION = "qk"
DEFAULT_COMBINE = "sum"


@dataclass(frozen=True)
class AttentionInputs:
    """What a variant may look at.

    Attributes:
        z: ``(B, N, D)`` the last block's LN1 output (input of its attention).
        q, k, v: ``(B, heads, N, d_h)`` per-head projections of ``z`` incl. in_proj biases.
        grid: ``(h, w)`` patch grid; tokens are CLS then the grid row-major.
        early: layer (1-indexed) -> ``(B, heads, N, N)`` vanilla attention that block
            computed on this same input (only the layers a variant asked for).
    """

    z: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    grid: tuple[int, int]
    early: Mapping[int, Tensor] = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return self.q.shape[1]


@dataclass(frozen=True)
class Variant:
    """A registered attention variant.

    Attributes:
        name: registry key (= ``attention=<name>``).
        fn: ``(AttentionInputs, **params) -> (B, heads, N, N)``.
        residual: keep CLIP's ``x + attn`` and MLP after the attention (False for the
            ClearCLIP/NACLIP decoders that output ``out_proj(A v)`` alone).
        params: the keyword parameters ``fn`` accepts (validated at build time).
    """

    name: str
    fn: Callable[..., Tensor]
    residual: bool
    params: tuple[str, ...]


ATTENTIONS: dict[str, Variant] = {}


def register_attention(name: str, *, residual: bool = True, params: Sequence[str] = ()):
    """Decorator adding ``fn`` to ``ATTENTIONS`` under ``name``; duplicates are an error."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in ATTENTIONS:
            raise KeyError(f"attention '{name}' is already registered")
        ATTENTIONS[name] = Variant(name, fn, residual, tuple(params))
        return fn

    return wrap


def get_variant(name: str) -> Variant:
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention '{name}'; registered: {sorted(ATTENTIONS)}")
    return ATTENTIONS[name]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, D) -> (B, heads, N, D/heads)``."""
    B, N, D = x.shape
    return x.view(B, N, heads, D // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, heads, N, d_h) -> (B, N, heads·d_h)``."""
    B, heads, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, heads * d)


def softmax_attention(a: Tensor, b: Tensor, temperature: float = HEAD_TEMPERATURE) -> Tensor:
    """``softmax(a bᵀ / τ)`` over the last axis: ``(B, heads, N, d)`` twice ->
    ``(B, heads, N, N)``.

    The softmax runs in fp32 so that fp16 models do not saturate at small τ.
    """
    scores = (a @ b.transpose(-2, -1)).float() / temperature
    return scores.softmax(-1).to(a.dtype)


def hard_max_attention(a: Tensor, b: Tensor) -> Tensor:
    """τ → 0 limit of ``softmax(a bᵀ/τ)``: one-hot at each row's argmax (ties → lowest)."""
    scores = a @ b.transpose(-2, -1)
    return F.one_hot(scores.argmax(-1), scores.shape[-1]).to(a.dtype)


def grid_coords(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """``(h·w, 2)`` (row, col) of every patch token, row-major."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=1)


# --------------------------------------------------------------------------- variants


@register_attention("vanilla")
def vanilla(x: AttentionInputs) -> Tensor:
    """CLIP's own attention, ``softmax(q kᵀ / 8)``."""
    return softmax_attention(x.q, x.k)


@register_attention("sharpen", params=("temperature",))
def sharpen(x: AttentionInputs, temperature: float = HEAD_TEMPERATURE) -> Tensor:
    """``softmax(q kᵀ / τ)``; τ = 8 is vanilla, τ = 0 the hard max (Table 3)."""
    if temperature == 0:
        return hard_max_attention(x.q, x.k)
    return softmax_attention(x.q, x.k, temperature)


@register_attention("local", params=("kernel",))
def local(x: AttentionInputs, kernel: int = 3) -> Tensor:
    """Vanilla attention restricted to patch keys in the k×k neighbourhood (Table 3).

    Patch queries see only patch keys at Chebyshev grid distance ≤ (k − 1)/2 (not the
    CLS key); the CLS query row is unrestricted.
    """
    pos = grid_coords(x.grid, x.q.device)
    near = (pos[:, None, :] - pos[None, :, :]).abs().amax(-1) <= (kernel - 1) // 2
    allowed = torch.ones(x.q.shape[2], x.q.shape[2], dtype=torch.bool, device=x.q.device)
    allowed[1:, 0] = False
    allowed[1:, 1:] = near
    scores = (x.q @ x.k.transpose(-2, -1)).float() / HEAD_TEMPERATURE
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(x.q.dtype)


@register_attention("early", params=("layer",))
def early(x: AttentionInputs, layer: int = 1) -> Tensor:
    """Block ``layer``'s vanilla attention map, reused with the last block's v (Table 3)."""
    return x.early[layer]


@register_attention("maskclip")
def maskclip(x: AttentionInputs) -> Tensor:
    """Identity attention: every token keeps its own value (MaskCLIP; local with k = 1)."""
    B, heads, N, _ = x.q.shape
    return torch.eye(N, dtype=x.q.dtype, device=x.q.device).expand(B, heads, N, N)


@register_attention("clearclip", residual=False)
def clearclip(x: AttentionInputs) -> Tensor:
    """ClearCLIP's decoder: ``softmax(q qᵀ / 8)``, no residual, no MLP."""
    return softmax_attention(x.q, x.q)


def gaussian_grid_bias(grid: tuple[int, int], sigma: float, device=None) -> Tensor:
    """``(N, N)`` NACLIP neighbourhood bias: exp(−dist²/2σ²) over grid positions, peak 1,
    zero on the CLS row and column."""
    pos = grid_coords(grid, device).float()
    dist2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    n = pos.shape[0] + 1
    bias = torch.zeros(n, n, device=device)
    bias[1:, 1:] = torch.exp(-dist2 / (2 * sigma**2))
    return bias


@register_attention("naclip", residual=False, params=("sigma",))
def naclip(x: AttentionInputs, sigma: float = 5.0) -> Tensor:
    """NACLIP's decoder: ``softmax(k kᵀ / 8 + G)``, G a Gaussian over grid distance."""
    scores = (x.k @ x.k.transpose(-2, -1)).float() / HEAD_TEMPERATURE
    scores = scores + gaussian_grid_bias(x.grid, sigma, x.k.device)
    return scores.softmax(-1).to(x.k.dtype)


Projection = tuple[Tensor, Tensor | None] | str


def project(x: AttentionInputs, p: Projection) -> Tensor:
    """``R = z Wᵀ + b`` split into heads; ``"q"``/``"k"`` name the block's own q/k, which
    are exactly z W_qᵀ + b_q and z W_kᵀ + b_k, so they are reused instead of recomputed."""
    if isinstance(p, str):
        return {"q": x.q, "k": x.k}[p]
    w, b = p
    return split_heads(F.linear(x.z, w, b), x.heads)


@register_attention("csa", params=("projections", "combine", "temperature"))
def csa(
    x: AttentionInputs,
    projections: Sequence[Projection] = ("q", "k"),
    combine: str = DEFAULT_COMBINE,
    temperature: float = HEAD_TEMPERATURE,
) -> Tensor:
    """SCLIP's correlative self-attention: Σ or mean over W of ``softmax(R_h R_hᵀ / τ)``,
    ``R = z Wᵀ + b`` split into heads (docs/protocol.md §3; the default {W_q, W_k} sums)."""
    maps = [softmax_attention(r, r, temperature) for r in (project(x, p) for p in projections)]
    total = torch.stack(maps).sum(0)
    return total / len(maps) if combine == "mean" else total


# ----------------------------------------------------------------- CSA projections

PROJECTIONS = ("qk", "q", "k", "identity", "random", "learned")
COMBINES = ("sum", "mean")


def qkv_weights(attn: torch.nn.MultiheadAttention) -> list[tuple[Tensor, Tensor]]:
    """The (weight ``(D, D)``, bias ``(D,)``) of q, k, v from a fused in_proj."""
    ws = attn.in_proj_weight.chunk(3)
    bs = attn.in_proj_bias.chunk(3)
    return list(zip(ws, bs))


def random_projections(n: int, dim: int, trial: int, dtype: torch.dtype = torch.float32
                       ) -> list[tuple[Tensor, None]]:
    """``n`` matrices with i.i.d. N(0, 1/dim) entries, drawn from a generator seeded by
    ``trial`` (the same trial always gives the same matrices)."""
    gen = torch.Generator().manual_seed(trial)
    return [((torch.randn(dim, dim, generator=gen) / math.sqrt(dim)).to(dtype), None)
            for _ in range(n)]


def csa_projections(
    mode: str,
    attn: torch.nn.MultiheadAttention,
    *,
    n: int = 1,
    trial: int = 0,
    learned: tuple[Tensor, Tensor | None] | None = None,
) -> list[Projection]:
    """The projection set P of a CSA mode (docs/protocol.md §3): ``F.linear`` (weight, bias) pairs,
    or "q"/"k" for the block's own (biased) query/key projections."""
    (wq, _), _, _ = qkv_weights(attn)
    dim, dtype, device = wq.shape[1], wq.dtype, wq.device
    if mode in ("qk", "q", "k"):
        return list(mode)
    if mode == "identity":
        return [(torch.eye(dim, dtype=dtype, device=device), None)]
    if mode == "random":
        return [(w.to(device), None) for w, _ in random_projections(n, dim, trial, dtype)]
    if mode == "learned":
        if learned is None:
            raise ValueError("projection=learned needs a trained matrix (see sclip_lab.learn)")
        w, b = learned
        return [(w.to(device=device, dtype=dtype),
                 None if b is None else b.to(device=device, dtype=dtype))]
    raise ValueError(f"unknown projection '{mode}'; choose one of {list(PROJECTIONS)}")
