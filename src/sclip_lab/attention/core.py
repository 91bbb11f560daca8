"""Last-block attention variants (docs/protocol.md §2–3), one small function each, in a registry.

Every variant maps the last block's per-head tensors to an attention matrix::

    fn(inputs: AttentionInputs, **knobs) -> A   # (B, heads, N, N), N = 1 + h·w

and declares its knobs beside it (``register_attention(..., knobs=[Knob(...)])``); the block
around it (residual, MLP, output scale) is the same for all (``sclip_lab.knobs``). Most
named methods are presets of one recipe, ``score_attention``: a sum or mean of softmax
score terms (q-k, q-q, k-k, v-v, identity, NACLIP's neighbourhood-only), each optionally
biased by NACLIP's Gaussian. A new variant is one decorated function here plus
``conf/attention/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sclip_lab.errors import ConfigError
from sclip_lab.knobs import DEPTH, BindContext, Knob, Variant

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
        x: ``(B, N, D)`` the last block's input (= ``h_{D−1}``).
        hidden: layer l -> ``(B, N, D)`` the vanilla stream after block l (0: after
            ln_pre), the layers a variant declared (``hidden=``).
        blocks: every residual block of the tower (multi-block variants run their own
            path over the last ones).
        block: the bound block knobs ``residual``, ``ffn``, ``alpha``.
        queries: ``(Q, E)`` unit text embeddings (every query, synonyms not merged), when
            the caller computes logits (two-pass methods such as ResCLIP's SFR).
        images: ``(B, 3, H, W)`` the normalised windows (crop-level refinement).
        features: ``(B, N, D)`` block output -> ``(B, N, E)`` unit features (the readout).
        proxy: ``(B, C, Hv, Wv)`` a proxy backbone's features of the same windows, for
            variants registered with ``proxy=True`` (ProxyCLIP; the ``proxy`` group).
        logit_scale: the segmenter's logit scale (the dataset's or protocol's), when the
            caller classifies: two-pass methods that classify inside the block use it.
        named: feature name -> ``(B, ...)`` the named trunk features the variant declared
            (``features=``; each computed by its provider, ``sclip_lab.features``).
        depth: D, the tower's block count (0 where unknown: inputs built by hand).
    """

    z: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    grid: tuple[int, int]
    early: Mapping[int, Tensor] = field(default_factory=dict)
    x: Tensor | None = None
    hidden: Mapping[int, Tensor] = field(default_factory=dict)
    blocks: Sequence = ()
    block: Mapping = field(default_factory=dict)
    queries: Tensor | None = None
    images: Tensor | None = None
    features: Callable[[Tensor], Tensor] | None = None
    proxy: Tensor | None = None
    logit_scale: float | None = None
    named: Mapping[str, Tensor] = field(default_factory=dict)
    depth: int = 0

    @property
    def heads(self) -> int:
        return self.q.shape[1]


ATTENTIONS: dict[str, Variant] = {}


def register_attention(name: str, *, knobs: Sequence[Knob] = (), residual: bool = True,
                       ffn: bool = True, borrows=None, hidden=None, prepare=None,
                       projection=None, output: str = "attention", readout=None,
                       maps=None, proxy: bool = False, features=None, pos_embed=None,
                       requires: Sequence[str] = ()):
    """Decorator adding ``fn`` to ``ATTENTIONS`` under ``name`` with its declared knobs and
    hooks (``sclip_lab.knobs.Variant``); the first docstring line is its listing.
    Duplicates are an error."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in ATTENTIONS:
            raise KeyError(f"attention '{name}' is already registered")
        if output not in ("attention", "tokens"):
            raise ValueError(f"attention '{name}': output must be attention or tokens")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        extra = {k: v for k, v in (("borrows", borrows), ("hidden", hidden),
                                   ("features", features), ("pos_embed", pos_embed))
                 if v is not None}
        ATTENTIONS[name] = Variant(name, fn, tuple(knobs), residual, ffn, doc,
                                   prepare=prepare, projection=projection, output=output,
                                   readout=readout, maps=maps, proxy=proxy,
                                   requires=frozenset(requires), **extra)
        return fn

    return wrap


def get_variant(name: str) -> Variant:
    if name not in ATTENTIONS:
        raise ConfigError(f"unknown attention={name!r}; registered: {sorted(ATTENTIONS)}")
    return ATTENTIONS[name]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, D) -> (B, heads, N, D/heads)``."""
    B, N, D = x.shape
    return x.view(B, N, heads, D // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, heads, N, d_h) -> (B, N, heads·d_h)``."""
    B, heads, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, heads * d)


def attention_qkv(block: torch.nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head q, k, v ``(B, heads, N, d_h)`` of a block's MHA on its LN1 output z."""
    attn = block.attn
    q, k, v = F.linear(z, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(split_heads(t, attn.num_heads) for t in (q, k, v))


def around(block: torch.nn.Module, x: Tensor, o: Tensor, residual: bool, ffn: bool,
           alpha: float = 1.0) -> Tensor:
    """``(B, N, D)``: the block around its attention output ``o``: α·o, plus the input ``x``
    where ``residual`` (CLIP's layer scale goes with it), then + MLP(LN2(·)) where ``ffn``
    (docs/protocol.md §2; every method's block knobs)."""
    if alpha != 1:
        o = o * alpha
    y = x + block.ls_1(o) if residual else o
    return y + block.ls_2(block.mlp(block.ln_2(y))) if ffn else y


def softmax_attention(a: Tensor, b: Tensor, temperature: float = HEAD_TEMPERATURE) -> Tensor:
    """``softmax(a bᵀ / τ)`` over the last axis: ``(B, heads, N, d)`` twice ->
    ``(B, heads, N, N)``.

    The softmax runs in fp32 so that fp16 models do not saturate at small τ.
    """
    scores = (a @ b.transpose(-2, -1)).float() / temperature
    return scores.softmax(-1).to(a.dtype)


def argmax_rows(scores: Tensor, dtype: torch.dtype) -> Tensor:
    """One-hot at each row's argmax (ties → lowest): the τ → 0 limit of a softmax."""
    return F.one_hot(scores.argmax(-1), scores.shape[-1]).to(dtype)


def hard_max_attention(a: Tensor, b: Tensor) -> Tensor:
    """τ → 0 limit of ``softmax(a bᵀ/τ)``: one-hot at each row's argmax (ties → lowest)."""
    return argmax_rows(a @ b.transpose(-2, -1), a.dtype)


def grid_coords(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """``(h·w, 2)`` (row, col) of every patch token, row-major."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=1)


# ---------------------------------------------------------------------------- recipe

TERMS = ("qk", "qq", "kk", "vv", "id", "nonly")
COMBINES = ("sum", "mean")


def gaussian_grid_bias(grid: tuple[int, int], sigma: float, device=None,
                       prefix: int = 1) -> Tensor:
    """``(N, N)`` NACLIP neighbourhood bias: exp(−dist²/2σ²) over grid positions, peak 1,
    zero on the rows and columns of the ``prefix`` tokens (the CLS; 0 on a MAP tower)."""
    pos = grid_coords(grid, device).float()
    dist2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
    n = pos.shape[0] + prefix
    bias = torch.zeros(n, n, device=device)
    bias[prefix:, prefix:] = torch.exp(-dist2 / (2 * sigma**2))
    return bias


def neighbourhood_mask(grid: tuple[int, int], kernel: int, device=None,
                       prefix: int = 1) -> Tensor:
    """``(N, N)`` bool, True where a query may look: patch queries see only patch keys at
    Chebyshev grid distance ≤ (k − 1)/2 (not the ``prefix`` keys, the CLS); the prefix rows
    see everything."""
    pos = grid_coords(grid, device)
    near = (pos[:, None, :] - pos[None, :, :]).abs().amax(-1) <= (kernel - 1) // 2
    n = pos.shape[0] + prefix
    allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    allowed[prefix:, :prefix] = False
    allowed[prefix:, prefix:] = near
    return allowed


def neighbourhood_scale(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """``(B, 1, 1, 1)``: NACLIP's N-only logit scale, the mean over heads and token pairs
    of ‖q_i‖·‖k_j‖, divided by τ (per window, so batching never changes it)."""
    qn, kn = q.float().norm(dim=-1), k.float().norm(dim=-1)  # (B, heads, N)
    return (qn.mean(-1) * kn.mean(-1)).mean(-1).view(-1, 1, 1, 1) / temperature


def score_term(x: AttentionInputs, term: str, temperature: float, sigma: float | None,
               kernel: int | None = None) -> Tensor:
    """One term ``(B, heads, N, N)`` of the recipe: softmax(a bᵀ/τ [+ G_σ]) for the pairs
    q-k, q-q, k-k, v-v; the identity for ``id``; softmax(G_σ · c) for ``nonly``; a
    ``kernel`` keeps each patch query's softmax inside its k×k neighbourhood."""
    B, heads, N, _ = x.q.shape
    prefix = N - x.grid[0] * x.grid[1]  # tokens before the grid: 1 (CLS), 0 on a MAP tower
    if term == "id":
        return torch.eye(N, dtype=x.q.dtype, device=x.q.device).expand(B, heads, N, N)
    if term == "nonly":
        logits = gaussian_grid_bias(x.grid, sigma, x.q.device, prefix) * neighbourhood_scale(
            x.q, x.k, temperature)
        return logits.expand(B, heads, N, N).softmax(-1).to(x.q.dtype)
    a, b = {"qk": (x.q, x.k), "qq": (x.q, x.q), "kk": (x.k, x.k), "vv": (x.v, x.v)}[term]
    if temperature == 0 and kernel is None:
        return hard_max_attention(a, b)
    if sigma is None and kernel is None:
        return softmax_attention(a, b, temperature)
    scores = (a @ b.transpose(-2, -1)).float()
    scores = scores / temperature if temperature else scores
    if sigma is not None and temperature:
        scores = scores + gaussian_grid_bias(x.grid, sigma, a.device, prefix)
    if kernel is not None:
        scores = scores.masked_fill(~neighbourhood_mask(x.grid, kernel, a.device, prefix),
                                    float("-inf"))
        if temperature == 0:  # the hard max inside the neighbourhood
            return argmax_rows(scores, a.dtype)
    return scores.softmax(-1).to(a.dtype)


def score_attention(x: AttentionInputs, scores: Sequence[str] = ("qk",),
                    temperature: float | Sequence[float] = HEAD_TEMPERATURE,
                    combine: str = "sum", sigma: float | None = None,
                    kernel: int | None = None) -> Tensor:
    """Σ (or mean) over ``scores`` of ``score_term``; ``temperature``: one τ, or one per term."""
    taus = ([temperature] * len(scores) if isinstance(temperature, (int, float))
            else list(temperature))
    maps = [score_term(x, t, tau, sigma, kernel) for t, tau in zip(scores, taus)]
    total = maps[0] if len(maps) == 1 else torch.stack(maps).sum(0)
    return total / len(maps) if combine == "mean" and len(maps) > 1 else total


def check_recipe(knobs: dict, ctx: BindContext) -> dict:
    """Cross-knob rules of ``recipe``: one τ per term, N-only needs σ, τ = 0 only for
    q-k/q-q/k-k/v-v terms (the hard max)."""
    scores, tau = knobs["scores"], knobs["temperature"]
    if not isinstance(tau, (int, float)) and len(tau) != len(scores):
        raise ConfigError(f"attention.temperature has {len(tau)} values for {len(scores)} "
                          f"scores {list(scores)}; give one τ, or one per term")
    if "nonly" in scores and knobs["sigma"] is None:
        raise ConfigError("the nonly term is a Gaussian over the grid: set attention.sigma "
                          "(NACLIP uses 5)")
    taus = [tau] * len(scores) if isinstance(tau, (int, float)) else tau
    if any(t == 0 and s in ("nonly",) for s, t in zip(scores, taus)):
        raise ConfigError("temperature=0 (the hard max) is for q-k/q-q/k-k/v-v terms; "
                          "give nonly a τ > 0")
    if knobs["kernel"] is not None and {"id", "nonly"} & set(scores):
        raise ConfigError("attention.kernel masks softmax scores; the id and nonly terms "
                          "have none (drop attention.kernel or those terms)")
    return knobs


SCORE_KNOBS = (
    Knob("scores", "terms", ("qk",), "score terms summed or averaged", choices=TERMS),
    Knob("temperature", "floats", HEAD_TEMPERATURE, "τ of every term, or one per term; "
         "0 = hard max", low=0),
    Knob("combine", "choice", "sum", "how the terms' maps combine", choices=COMBINES),
    Knob("sigma", "float", None, "NACLIP Gaussian bias σ in patches (null = none)",
         above=0, nullable=True),
    Knob("kernel", "int", None, "k×k neighbourhood of each patch query (null = all)",
         low=1, odd=True, nullable=True),
)


@register_attention("recipe", knobs=SCORE_KNOBS, prepare=check_recipe)
def recipe(x: AttentionInputs, scores: Sequence[str] = ("qk",),
           temperature: float | Sequence[float] = HEAD_TEMPERATURE, combine: str = "sum",
           sigma: float | None = None, kernel: int | None = None) -> Tensor:
    """Composable scores: Σ/mean of softmax(a bᵀ/τ [+ G_σ]) terms (ClearCLIP/NACLIP grids)."""
    return score_attention(x, scores, temperature, combine, sigma, kernel)


# ---------------------------------------------------------------- named variants


@register_attention("vanilla")
def vanilla(x: AttentionInputs) -> Tensor:
    """CLIP's own attention, softmax(q kᵀ / 8) (recipe scores=[qk])."""
    return score_attention(x, ("qk",))


@register_attention("sharpen", knobs=[Knob("temperature", "float", HEAD_TEMPERATURE,
                                           "τ; 8 = vanilla, 0 = hard max", low=0)])
def sharpen(x: AttentionInputs, temperature: float = HEAD_TEMPERATURE) -> Tensor:
    """softmax(q kᵀ / τ); τ = 8 is vanilla, τ = 0 the hard max (Table 3)."""
    return score_attention(x, ("qk",), temperature)


@register_attention("local", knobs=[Knob("kernel", "int", 3, "k×k patch neighbourhood",
                                         low=1, odd=True, record_as="window",
                                         aliases=("window",))])
def local(x: AttentionInputs, kernel: int = 3) -> Tensor:
    """Vanilla attention restricted to the k×k patch neighbourhood (Table 3; recipe
    scores=[qk] kernel=k): see ``neighbourhood_mask``."""
    return score_attention(x, ("qk",), kernel=kernel)


@register_attention("early", knobs=[Knob("layer", "int", 1, "borrowed block, 1..depth",
                                         low=1, high=DEPTH)],
                    borrows=lambda knobs: (knobs["layer"],))
def early(x: AttentionInputs, layer: int = 1) -> Tensor:
    """Block ``layer``'s vanilla attention map, reused with the last block's v (Table 3)."""
    return x.early[layer]


@register_attention("maskclip")
def maskclip(x: AttentionInputs) -> Tensor:
    """Identity attention: every token keeps its own value (MaskCLIP; recipe scores=[id])."""
    return score_attention(x, ("id",))


@register_attention("clearclip", residual=False, ffn=False)
def clearclip(x: AttentionInputs) -> Tensor:
    """ClearCLIP: softmax(q qᵀ / 8), no residual, no MLP (recipe scores=[qq])."""
    return score_attention(x, ("qq",))


@register_attention("naclip", residual=False, ffn=False,
                    knobs=[Knob("sigma", "float", 5.0, "Gaussian σ in patches", above=0)])
def naclip(x: AttentionInputs, sigma: float = 5.0) -> Tensor:
    """NACLIP: softmax(k kᵀ / 8 + G_σ), no residual, no MLP (recipe scores=[kk] sigma=σ)."""
    return score_attention(x, ("kk",), sigma=sigma)
