"""Many prompts through CLIP's causal text tower, fast and exact (docs/protocol.md §4).

Under the causal mask a position sees only the positions before it. Hence

1. a prompt can stop at its end-of-text (EOT) token, whose state CLIP pools, and
2. the tokens that all prompts of one template share at the front ("<sot> a photo of a")
   have the same states in every prompt: they run once per template, and each prompt runs
   only its own suffix (name, tail, EOT) against the cached prefix keys and values.

Suffixes are sorted by length and encoded in large batches, each cut at its own longest
suffix, so little is padded. For the 80 OpenAI templates the suffixes hold ~2.5× fewer
tokens than the prompts. Towers this does not fit (no causal mask, other pooling, other
blocks: SigLIP's bidirectional, last-token-pooled one) run ``model.encode_text`` in
batches instead, each prompt whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sclip_lab.attention.core import around, attention_qkv, merge_heads

KV = list[tuple[Tensor, Tensor]]  # per block: keys and values, each (B, heads, N, d_h)


def text_module(model: nn.Module) -> nn.Module:
    """The module that holds the text transformer: ``model.text`` of open_clip's
    ``CustomTextCLIP`` (SigLIP, PE, EVA), else ``model`` itself (``CLIP``, same names)."""
    text = getattr(model, "text", None)
    return text if hasattr(text, "token_embedding") else model


def causal_clip_text(model: nn.Module) -> bool:
    """True for a CLIP-style text transformer (``CLIP`` or the ``TextTransformer`` of
    ``text_module``): causal mask, EOT (argmax) pooling, no padding mask or CLS token,
    plain MHA blocks. SigLIP's (no mask, last-token pooling) is not one."""
    mask = getattr(model, "attn_mask", None)
    pool = getattr(model, "text_pool_type", getattr(model, "pool_type", None))
    if (pool != "argmax" or mask is None or not hasattr(model, "token_embedding")
            or getattr(model, "cls_emb", None) is not None
            or getattr(model, "use_pad_mask", False)):
        return False
    causal = torch.full_like(mask, float("-inf")).triu(1)
    return torch.equal(mask, causal) and all(
        isinstance(b.attn, nn.MultiheadAttention) and b.attn.in_proj_weight is not None
        and b.attn.bias_k is None and not b.attn.add_zero_attn and not hasattr(b, "ln_1_kv")
        for b in model.transformer.resblocks)


def common_prefix(tokens: Tensor) -> int:
    """``(N, L)`` token rows -> how many leading tokens they all share, leaving every row's
    EOT (the argmax) outside the prefix."""
    same = (tokens == tokens[:1]).all(0).long().cumprod(0).sum()
    return min(int(same), int(tokens.argmax(-1).min()))


def block_step(block: nn.Module, x: Tensor, past: tuple[Tensor, Tensor], mask: Tensor
               ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One residual block on new positions ``x`` ``(B, s, D)``.

    They attend to the ``past`` keys/values ``(B, heads, p, d_h)`` and to each other, as the
    bool ``mask`` ``(B, 1, s, p + s)`` allows. Returns the block output ``(B, s, D)`` and
    the new positions' keys/values ``(B, heads, s, d_h)``.
    """
    q, k, v = attention_qkv(block, block.ln_1(x))
    keys, values = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    out = block.attn.out_proj
    o = F.linear(merge_heads(o), out.weight, out.bias)
    return around(block, x, o, residual=True, ffn=True), (k, v)


def run_positions(model: nn.Module, tokens: Tensor, positions: Tensor, past: KV, mask: Tensor
                  ) -> tuple[Tensor, KV]:
    """``(B, s)`` tokens at ``(B, s)`` positions through every block -> ``(B, s, D)`` states
    (before ``ln_final``) and each block's keys/values of these positions."""
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[positions].to(cast)
    new = []
    for block, kv in zip(model.transformer.resblocks, past):
        x, kv = block_step(block, x, kv, mask)
        new.append(kv)
    return x, new


def empty_kv(model: nn.Module, batch: int, device: torch.device) -> KV:
    """Zero-length keys/values ``(batch, heads, 0, d_h)`` for every block."""
    dtype = model.transformer.get_cast_dtype()
    out = []
    for block in model.transformer.resblocks:
        heads = block.attn.num_heads
        shape = (batch, heads, 0, block.attn.embed_dim // heads)
        out.append((torch.zeros(shape, dtype=dtype, device=device),) * 2)
    return out


def prefix_states(model: nn.Module, prefixes: Tensor) -> KV:
    """``(G, p)`` prefix tokens (each group's shared start, padded at the end) -> every
    block's keys/values ``(G, heads, p, d_h)``. Padding comes last, so the causal mask keeps
    it out of the real positions."""
    G, p = prefixes.shape
    past = empty_kv(model, G, prefixes.device)
    if p == 0:
        return past
    pos = torch.arange(p, device=prefixes.device)
    causal = (pos[None, :] <= pos[:, None]).expand(G, 1, p, p)
    return run_positions(model, prefixes, pos.expand(G, p), past, causal)[1]


def suffix_embeddings(model: nn.Module, tokens: Tensor, starts: Tensor, past: KV) -> Tensor:
    """``(B, L)`` prompts whose first ``starts`` tokens are in ``past`` -> ``(B, E)``.

    ``past`` holds each row's prefix keys/values ``(B, heads, p, d_h)``; a row attends to
    its first ``starts[b]`` of them. The suffixes run up to the batch's longest EOT.
    """
    B, L = tokens.shape
    p = past[0][0].shape[2]
    eot = tokens.argmax(-1)
    s = int((eot - starts).max()) + 1
    j = torch.arange(s, device=tokens.device)
    positions = (starts[:, None] + j).clamp(max=L - 1)  # (B, s); clamped ones are padding
    prefix_ok = torch.arange(p, device=tokens.device)[None, :] < starts[:, None]  # (B, p)
    causal = j[None, :] <= j[:, None]  # (s, s): query j sees keys ≤ j
    mask = torch.cat([prefix_ok[:, None, :].expand(B, s, p), causal.expand(B, s, s)], -1)
    x, _ = run_positions(model, tokens.gather(1, positions), positions, past, mask[:, None])
    x = model.ln_final(x[torch.arange(B, device=x.device), eot - starts])
    return project(model, x)


def project(model: nn.Module, x: Tensor) -> Tensor:
    """``(B, D)`` pooled states -> ``(B, E)`` through the text projection (a matrix, a
    ``Linear`` with or without bias, or none)."""
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def token_batches(order: Tensor, lens: Tensor, budget: int) -> list[Tensor]:
    """Split ``order`` (rows sorted by ascending ``lens``) into batches of at most ``budget``
    padded tokens (at least one row each)."""
    out, start = [], 0
    for end, n in enumerate(lens.tolist(), start=1):
        if (end - start) * n > budget and end - 1 > start:
            out.append(order[start:end - 1])
            start = end - 1
    return out + [order[start:]]


def prefix_plan(model: nn.Module, tokens: Tensor, groups: Tensor, batch_tokens: int
                ) -> tuple[list[Tensor], Callable[[Tensor], Tensor]]:
    """Run each group's shared prefix once -> (batches of row indices, rows -> ``(b, E)``).

    Batches follow ascending suffix length and hold at most ``batch_tokens`` padded tokens.
    """
    _, gid = groups.unique(return_inverse=True)
    members = [(gid == g).nonzero()[:, 0] for g in range(int(gid.max()) + 1)]
    lengths = torch.tensor([common_prefix(tokens[m]) for m in members], device=tokens.device)
    first = torch.stack([m[0] for m in members])
    kv = prefix_states(model, tokens[first, :int(lengths.max())])
    starts = lengths[gid]
    lens = tokens.argmax(-1) - starts + 1  # suffix lengths, EOT included
    order = lens.argsort(stable=True)

    def encode(rows: Tensor) -> Tensor:
        past = [(k[gid[rows]], v[gid[rows]]) for k, v in kv]
        return suffix_embeddings(model, tokens[rows], starts[rows], past)

    return token_batches(order, lens[order], batch_tokens), encode


@torch.inference_mode()
def encode_prompts(model: nn.Module, tokens: Tensor, groups: Tensor, batch_tokens: int = 1024,
                   progress: Callable[[int], object] | None = None) -> Tensor:
    """``(P, L)`` token ids -> ``(P, E)`` text embeddings (not normalised, model dtype).

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` (its text tower is used).
        tokens: the tokenised prompts, in any order (P ≥ 1).
        groups: ``(P,)`` ids; rows of one group (one template) share a cached prefix. Any
            grouping is exact; grouping by template saves the most work.
        batch_tokens: padded tokens per forward (~250 prompts of 4 suffix tokens). 1024 was
            fastest on a 2-core AVX2 CPU; 512 ran ~10% slower, 2048 ~25% (the activations
            of larger batches leave the caches).
        progress: called with the number of prompts after each batch.
    """
    tower = text_module(model)
    if causal_clip_text(tower):
        batches, encode = prefix_plan(tower, tokens, groups, batch_tokens)
    else:
        step = max(1, batch_tokens // tokens.shape[1])
        batches = list(torch.arange(len(tokens), device=tokens.device).split(step))

        def encode(rows: Tensor) -> Tensor:
            return model.encode_text(tokens[rows])

    parts = []
    for rows in batches:
        parts.append(encode(rows))
        if progress is not None:
            progress(len(rows))
    embs = torch.cat(parts)
    return torch.empty_like(embs).index_copy_(0, torch.cat(batches), embs)
