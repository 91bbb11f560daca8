"""SCLIP's correlative self-attention (docs/protocol.md §3) and its projection sets (Table 2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sclip_lab.attention.core import (
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_PROJECTION,
    HEAD_TEMPERATURE,
    AttentionInputs,
    register_attention,
    softmax_attention,
    split_heads,
)
from sclip_lab.errors import ConfigError, integer
from sclip_lab.knobs import BindContext, Knob

PROJECTIONS = ("qk", "q", "k", "identity", "random", "learned")
Projection = tuple[Tensor, Tensor | None] | str


def project(x: AttentionInputs, p: Projection) -> Tensor:
    """``R = z Wᵀ + b`` split into heads; ``"q"``/``"k"`` name the block's own q/k, which
    are exactly z W_qᵀ + b_q and z W_kᵀ + b_k, so they are reused instead of recomputed."""
    if isinstance(p, str):
        return {"q": x.q, "k": x.k}[p]
    w, b = p
    return split_heads(F.linear(x.z, w, b), x.heads)


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


def check_projection(projection: Mapping[str, Any] | None, combine: str | None = None
                     ) -> tuple[str, int, int, str]:
    """``(mode, n, trial, combine)`` of a projection section (None: the default set),
    checked without the model; ``combine`` is the attention's, which wins."""
    proj = dict(projection or {"name": DEFAULT_PROJECTION})
    mode = proj.get("name")
    if mode not in PROJECTIONS:
        raise ConfigError(f"unknown projection={mode!r}; choose one of {list(PROJECTIONS)}")
    n = integer(proj.get("n", 1), "n", 1) if mode == "random" else 1
    trial = integer(proj.get("trial", 0), "trial", 0) if mode == "random" else 0
    combine = combine or proj.get("combine") or DEFAULT_COMBINE
    if combine not in COMBINES:
        raise ConfigError(f"combine={combine!r}; choose one of {list(COMBINES)}")
    return mode, n, trial, combine


@dataclass(frozen=True)
class ProjectionSpec:
    """CSA's projection set, bound from the ``projection`` group (Table 2; §3).

    Attributes:
        mode: qk | q | k | identity | random | learned.
        n, trial: the number and seed of random projections (1 and 0 otherwise).
        combine: sum | mean: the attention's ``combine``, else the set's own.
    """

    mode: str = DEFAULT_PROJECTION
    n: int = 1
    trial: int = 0
    combine: str = DEFAULT_COMBINE

    def summary(self) -> dict[str, Any]:
        """Its summary fields (``n``/``trial`` only for random sets)."""
        random = self.mode == "random"
        return {"projection": self.mode, "n": self.n if random else None,
                "trial": self.trial if random else None, "combine": self.combine}

    def label(self) -> list[str]:
        """Its words in a variant label: nothing for the default set, ``random n=16``."""
        if self.mode == DEFAULT_PROJECTION:
            return []
        if self.mode != "random":
            return [self.mode]
        return ["random", f"n={self.n}"] + ([f"trial={self.trial}"] if self.trial else [])


def bind_projection(projection: Mapping[str, Any] | None, knobs: Mapping[str, Any]
                    ) -> ProjectionSpec:
    """The ``projection`` section (None: the default set) checked and bound, before any
    model exists; the attention's own ``combine`` knob wins over the set's."""
    return ProjectionSpec(*check_projection(projection, knobs.get("combine")))


def prepare_csa(knobs: dict, ctx: BindContext) -> dict:
    """The projection matrices of the bound set (docs/protocol.md §3), with its combine."""
    spec = ctx.projection if isinstance(ctx.projection, ProjectionSpec) else bind_projection(
        ctx.projection, knobs)
    mode, n, trial, combine = spec.mode, spec.n, spec.trial, spec.combine
    width = ctx.attn.embed_dim
    if mode == "learned" and ctx.learned is not None and tuple(ctx.learned[0].shape) != (
            width, width):
        raise ConfigError(f"the learned projection is {tuple(ctx.learned[0].shape)} but this "
                          f"model's last block is {width} wide; train one for this model "
                          "with python -m sclip_lab.learn")
    projections = csa_projections(mode, ctx.attn, n=n, trial=trial, learned=ctx.learned)
    return {"projections": projections, "combine": combine,
            "temperature": knobs["temperature"]}


@register_attention("csa", projection=bind_projection, prepare=prepare_csa, knobs=[
    Knob("temperature", "float", HEAD_TEMPERATURE, "τ of every map (0 = hard max is "
         "attention=sharpen)", above=0),
    Knob("combine", "choice", None, "sum | mean; null = the projection set's own",
         choices=COMBINES, nullable=True),
])
def csa(
    x: AttentionInputs,
    projections: Sequence[Projection] = ("q", "k"),
    combine: str = DEFAULT_COMBINE,
    temperature: float = HEAD_TEMPERATURE,
) -> Tensor:
    """SCLIP's correlative self-attention: Σ/mean over W of softmax(R_h R_hᵀ / τ), R = z Wᵀ + b.

    ``projections`` come from the ``projection`` group (``prepare_csa``); the default
    {W_q, W_k} sums (docs/protocol.md §3), which is recipe scores=[qq,kk].
    """
    maps = [softmax_attention(r, r, temperature) for r in (project(x, p) for p in projections)]
    total = torch.stack(maps).sum(0)
    return total / len(maps) if combine == "mean" else total
