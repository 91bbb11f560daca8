"""Text classifier: templates × class names -> query embeddings ``(Q, E)`` (docs/protocol.md §4).

Each class line may hold synonyms ("person, person in shirt, …"); every name is one query
and ``query_class[q]`` is its class. Embeddings are cached on disk, keyed by the text
tower's weights, the names and the templates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn
from tqdm.auto import tqdm

from sclip_lab.errors import ConfigError
from sclip_lab.files import atomic_target

log = logging.getLogger(__name__)

TEMPLATE_SETS: dict[str, tuple[Callable[[str], str], ...]] = {
    "openai_imagenet": tuple(OPENAI_IMAGENET_TEMPLATES),  # the 80, in their original order
    "single": (lambda c: f"a photo of a {c}.",),
}
# CLIP Surgery's 85 (xmed-lab/CLIP_Surgery clip/clip.py L255): the 80 in the same order, then
# MaskCLIP's five scene templates.
SCENE_TEMPLATES = ("there is a {} in the scene.", "there is the {} in the scene.",
                   "this is a {} in the scene.", "this is the {} in the scene.",
                   "this is one {} in the scene.")
TEMPLATE_SETS["surgery85"] = (*TEMPLATE_SETS["openai_imagenet"],
                              *(t.format for t in SCENE_TEMPLATES))


def split_queries(classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Class lines -> (query names, query_class). Names are not de-duplicated."""
    names, owner = [], []
    for idx, line in enumerate(classes):
        for name in line.split(", "):
            names.append(name.strip())
            owner.append(idx)
    heads = [line.split(", ")[0].strip() for line in classes]
    repeated = sorted({n for n in heads if heads.count(n) > 1})
    if repeated:
        log.warning("the vocabulary lists the class %s more than once: the copies split its "
                    "pixels and the lowest index wins ties", ", ".join(repeated[:5]))
    return names, owner


def get_templates(name: str) -> tuple[Callable[[str], str], ...]:
    if name not in TEMPLATE_SETS:
        raise ConfigError(f"unknown text.templates={name!r}; choose one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


def tower_fingerprint(model: nn.Module) -> str:
    """Hash of every text-side tensor (weights identity for the cache key)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("visual.") or name == "logit_scale":
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _causal_clip_text(model: nn.Module) -> bool:
    return (getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None
            and hasattr(model, "token_embedding"))


@torch.no_grad()
def encode_text(model: nn.Module, tokens: Tensor) -> Tensor:
    """``(B, 77)`` token ids -> ``(B, E)`` text embeddings (not normalised).

    For CLIP's causal, EOT-pooled text tower the sequence is cut after the longest prompt's
    end-of-text token: under the causal mask later positions cannot reach it, so the
    result equals ``model.encode_text`` at a fraction of the cost.
    """
    if not _causal_clip_text(model):
        return model.encode_text(tokens)
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1
    tokens = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


@torch.no_grad()
def query_embeddings(model: nn.Module, tokenizer: Callable, names: Sequence[str],
                     templates: Sequence[Callable[[str], str]], device: torch.device,
                     batch_size: int = 256) -> Tensor:
    """``(Q, E)`` fp32: per name, mean of the L2-normalised template embeddings, re-normalised."""
    out = []
    for name in tqdm(names, desc="text queries", leave=False, disable=len(names) < 8):
        prompts = [t(name) for t in templates]
        embs = torch.cat([encode_text(model, tokenizer(prompts[i:i + batch_size]).to(device))
                          for i in range(0, len(prompts), batch_size)])
        out.append(F.normalize(F.normalize(embs.float(), dim=-1).mean(0), dim=-1))
    return torch.stack(out)


def classifier(model: nn.Module, arch: str, names: Sequence[str], templates: str,
               device: torch.device, cache_dir: str | Path | None) -> Tensor:
    """Cached ``query_embeddings`` for ``names`` with template set ``templates``."""
    tmpl = get_templates(templates)
    dtype = next(model.parameters()).dtype
    key_src = json.dumps({"weights": tower_fingerprint(model), "arch": arch, "dtype": str(dtype),
                          "names": list(names), "templates": [t("{}") for t in tmpl]})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    path = Path(cache_dir).expanduser() / f"text-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return read_cached(path, names).to(device)
        except ValueError as e:
            log.warning("recomputing the broken text cache %s (%s)", path, e)
    emb = query_embeddings(model, open_clip.get_tokenizer(arch), names, tmpl, device)
    if path is not None:
        with atomic_target(path) as tmp:
            torch.save({"names": list(names), "embeddings": emb.cpu()}, tmp)
    return emb


def read_cached(path: Path, names: Sequence[str]) -> Tensor:
    """The ``(Q, E)`` embeddings cached at ``path`` for ``names``.

    Raises:
        ValueError: unreadable or truncated, another vocabulary, or not finite fp32 rows of
            unit length.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure means a broken entry
        raise ValueError(f"unreadable: {type(e).__name__}") from None
    if not isinstance(payload, dict) or payload.get("names") != list(names):
        raise ValueError("not this vocabulary's entry")
    emb = payload.get("embeddings")
    if not isinstance(emb, Tensor) or emb.dtype != torch.float32 or emb.ndim != 2 or len(
            emb) != len(names):
        raise ValueError(f"expected float32 ({len(names)}, E) embeddings")
    if not torch.isfinite(emb).all() or not torch.allclose(emb.norm(dim=-1),
                                                           torch.ones(len(emb)), atol=1e-3):
        raise ValueError("embeddings are not finite unit vectors")
    return emb
