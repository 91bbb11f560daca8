"""Text classifier: templates × class names -> query embeddings ``(Q, E)`` (docs/protocol.md §4).

Each class line may hold synonyms ("person, person in shirt, …"); every name is one query
and ``query_class[q]`` is its class. All prompts of a vocabulary are encoded together in
large, length-sorted batches with each template's shared prefix run once
(``sclip_lab.text_tower``; exact under CLIP's causal mask). Embeddings are cached on disk
per vocabulary, keyed by the text tower's weights, arch, dtype, the names and the
templates (and the tokenizer, when it is not CLIP's own at 77 tokens); a new vocabulary
takes the names it shares with cached ones from them. Tokenizers come from open_clip's
model config (``tokenizer_for``); tests and offline setups may register their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn
from tqdm.auto import tqdm

from sclip_lab.errors import ConfigError, plural
from sclip_lab.files import atomic_target, state_digest
from sclip_lab.text_tower import causal_clip_text, encode_prompts, project, text_module

log = logging.getLogger(__name__)

SILENT_BELOW = 640  # prompts: smaller vocabularies (≈ 8 names × 80 templates) show no bar
# CLIP's BPE tokenizer at CLIP's context: cache keys written before other tokenizers existed
# omit it, so they stay valid (docs/protocol.md §4).
DEFAULT_TOKENIZER = {"tokenizer": "SimpleTokenizer", "context_length": 77}
_TOKENIZERS: dict[str, Callable[[list[str]], Tensor]] = {}  # arch -> register_tokenizer's

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


def register_tokenizer(arch: str, tokenizer: Callable[[list[str]], Tensor] | None) -> None:
    """Use ``tokenizer`` (``list[str]`` -> ``(B, L)`` long) for ``arch`` instead of
    open_clip's; None removes it. For tests and for hub tokenizers kept elsewhere."""
    if tokenizer is None:
        _TOKENIZERS.pop(arch, None)
    else:
        _TOKENIZERS[arch] = tokenizer


def text_config(arch: str) -> dict:
    """open_clip's ``text_cfg`` of ``arch`` ({} for an arch it does not know)."""
    return dict((open_clip.get_model_config(arch) or {}).get("text_cfg", {}))


def tokenizer_identity(arch: str, tokenizer: Callable | None = None) -> dict:
    """What a cache key needs of the tokenizer: ``{"tokenizer": name, "context_length": L}``.

    From ``tokenizer`` (or the registered one) when given, else from open_clip's config
    without building it (a cached vocabulary needs no hub download).
    """
    tok = tokenizer or _TOKENIZERS.get(arch)
    if tok is not None:
        hf = getattr(getattr(tok, "tokenizer", None), "name_or_path", None)
        name = hf or getattr(tok, "name", None) or type(tok).__name__
        return {"tokenizer": str(name), "context_length": int(getattr(tok, "context_length", 0))}
    cfg = text_config(arch)
    name = cfg.get("hf_tokenizer_name") or (
        "SigLipTokenizer" if "siglip" in arch.lower() else "SimpleTokenizer")
    return {"tokenizer": name, "context_length": int(cfg.get("context_length", 77))}


def tokenizer_for(arch: str, override: Callable | None = None) -> Callable[[list[str]], Tensor]:
    """The tokenizer of ``arch``: ``override``, a registered one, or open_clip's.

    Raises:
        ConfigError: a Hugging Face tokenizer that cannot be loaded here (offline and not in
            the local cache, or ``transformers`` missing), as one line naming the fix.
    """
    if override is not None or arch in _TOKENIZERS:
        return override or _TOKENIZERS[arch]
    try:
        return open_clip.get_tokenizer(arch)
    except ImportError as e:
        pkg = e.name or "transformers"
        raise ConfigError(f"the {arch} tokenizer ({tokenizer_identity(arch)['tokenizer']}) "
                          f"needs the {pkg} package: pip install {pkg}") from None
    except (OSError, ValueError) as e:
        hf = tokenizer_identity(arch)["tokenizer"]
        if hf == "SimpleTokenizer":
            raise
        raise ConfigError(f"the {arch} tokenizer ({hf}) is not in the local Hugging Face cache "
                          "and the hub is offline: go online once or set HF_HOME to a cache "
                          "that has it") from e


SCORES = ("softmax", "sigmoid")  # text.scores: how cosine logits become probabilities


@dataclass(frozen=True)
class SigmoidHead:
    """SigLIP's image-text probability, per query: ``sigmoid(scale·cos + bias)``
    (docs/protocol.md §4, "Sigmoid backbones"). ``scale`` is ``exp(model.logit_scale)``."""

    scale: float
    bias: float


def sigmoid_head(model: nn.Module) -> SigmoidHead | None:
    """The model's own sigmoid text head (SigLIP, SigLIP 2: a ``logit_bias``), else None."""
    bias = getattr(model, "logit_bias", None)
    if bias is None:
        return None
    return SigmoidHead(float(model.logit_scale.detach().exp()), float(bias.detach()))


def check_scores(scores: str) -> str:
    """``text.scores`` checked by name (before any model is loaded)."""
    if scores not in SCORES:
        raise ConfigError(f"unknown text.scores={scores!r}; choose one of {list(SCORES)}")
    return scores


def score_rule(scores: str, model: nn.Module, arch: str) -> SigmoidHead | None:
    """``text.scores`` -> None (softmax over queries at the protocol's logit scale, the
    default) or the model's ``SigmoidHead``.

    Raises:
        ConfigError: an unknown value, or ``sigmoid`` on a backbone without a sigmoid head.
    """
    check_scores(scores)
    if scores == "softmax":
        return None
    head = sigmoid_head(model)
    if head is None:
        raise ConfigError(f"text.scores=sigmoid needs a sigmoid backbone (a logit_bias: SigLIP, "
                          f"SigLIP 2); {arch} has none: use text.scores=softmax")
    return head


def tower_fingerprint(model: nn.Module) -> str:
    """Hash of every text-side tensor (weights identity for the cache key)."""
    return state_digest(model.state_dict(),
                        skip=lambda name: name.startswith("visual.") or name == "logit_scale")


@torch.no_grad()
def encode_text(model: nn.Module, tokens: Tensor) -> Tensor:
    """``(B, L)`` token ids -> ``(B, E)`` text embeddings (not normalised).

    For a CLIP-style causal, EOT-pooled text tower the sequence is cut after the longest prompt's
    end-of-text token: under the causal mask later positions cannot reach it, so the
    result equals ``model.encode_text`` at a fraction of the cost.
    """
    tower = text_module(model)
    if not causal_clip_text(tower):
        return model.encode_text(tokens)
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1
    tokens = tokens[:, :n]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast) + tower.positional_embedding[:n].to(cast)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    return project(tower, tower.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot])


def query_embeddings(model: nn.Module, tokenizer: Callable, names: Sequence[str],
                     templates: Sequence[Callable[[str], str]], device: torch.device,
                     batch_tokens: int = 1024, desc: str = "text embeddings (not cached)"
                     ) -> Tensor:
    """``(Q, E)`` fp32: per name, mean of the L2-normalised template embeddings, re-normalised.

    Every prompt of the vocabulary (distinct names × templates) is tokenised at once and
    encoded across names in large batches (``text_tower.encode_prompts``: shared template
    prefixes once, suffixes sorted by length); a repeated name is encoded once. One progress
    bar (``desc``) counts prompts; one INFO line reports the rate.
    """
    unique = list(dict.fromkeys(names))
    prompts = [t(n) for n in unique for t in templates]  # name-major: row u·T + t
    start = time.perf_counter()
    tokens = tokenizer(prompts).to(device)
    width = getattr(model, "context_length", tokens.shape[1])
    if tokens.ndim != 2 or tokens.shape[1] != width:
        raise ConfigError(f"the tokenizer gives {tuple(tokens.shape)} token ids but the text "
                         f"tower takes (B, {width}): give the model's own tokenizer")
    groups = torch.arange(len(templates), device=device).repeat(len(unique))
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False,
              disable=len(prompts) < SILENT_BELOW) as bar:
        embs = encode_prompts(model, tokens, groups, batch_tokens, bar.update)
    seconds = time.perf_counter() - start
    log.info("text embeddings: %s (%s × %s) in %.1f s, %.0f prompts/s",
             plural(len(prompts), "prompt"), plural(len(unique), "name"),
             plural(len(templates), "template"), seconds, len(prompts) / seconds)
    per_name = F.normalize(embs.float(), dim=-1).view(len(unique), len(templates), -1).mean(1)
    row = {n: i for i, n in enumerate(unique)}
    return F.normalize(per_name, dim=-1)[[row[n] for n in names]]


def digest(fields: dict) -> str:
    """Cache key of a JSON-able dict (its key order matters)."""
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:24]


def classifier(model: nn.Module, arch: str, names: Sequence[str], templates: str,
               device: torch.device, cache_dir: str | Path | None,
               tokenizer: Callable[[list[str]], Tensor] | None = None) -> Tensor:
    """Cached ``query_embeddings`` for ``names`` with template set ``templates``.

    The vocabulary's own entry ``text-<key>.pt`` is read when present. Otherwise the names
    that other entries of the same tower and templates hold are taken from them (VOC20's
    from VOC21's, Context59's from Context60's) and only the rest are encoded.
    ``tokenizer``: instead of ``tokenizer_for(arch)``; it is built only on a cache miss.
    """
    tmpl = get_templates(templates)
    tower = {"weights": tower_fingerprint(model), "arch": arch,
             "dtype": str(next(model.parameters()).dtype)}
    tok_id = tokenizer_identity(arch, tokenizer)
    if tok_id != DEFAULT_TOKENIZER:  # CLIP's own tokenizer leaves old keys as they were
        tower["tokenizer"] = tok_id
    tmpl_text = [t("{}") for t in tmpl]
    family = digest({**tower, "templates": tmpl_text})  # entries whose rows are interchangeable
    key = digest({**tower, "names": list(names), "templates": tmpl_text})  # old entries stay valid
    root = Path(cache_dir).expanduser() if cache_dir else None
    path = root / f"text-{key}.pt" if root else None
    if path is not None and path.is_file():
        try:
            return read_cached(path, names).to(device)
        except ValueError as e:
            log.warning("recomputing the broken text cache %s (%s)", path, e)
    known = reusable_rows(root, family, names) if root else {}
    missing = [n for n in dict.fromkeys(names) if n not in known]
    if missing:
        where = f"one-time, cached in {root}" if root else "not cached"
        new = query_embeddings(model, tokenizer_for(arch, tokenizer), missing, tmpl, device,
                               desc=f"text embeddings ({where})")
        known.update(zip(missing, new.cpu()))
    emb = torch.stack([known[n] for n in names])
    if path is not None:
        with atomic_target(path) as tmp:
            torch.save({"names": list(names), "embeddings": emb, "family": family}, tmp)
    return emb.to(device)


def reusable_rows(root: Path, family: str, names: Sequence[str]) -> dict[str, Tensor]:
    """name -> ``(E,)`` row, for the ``names`` that valid entries of ``family`` in ``root``
    hold (entries written before families existed are skipped)."""
    wanted, found = set(names), {}
    for path in sorted(root.glob("text-*.pt")):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("family") != family:
                continue
            rows = checked_rows(payload)
        except Exception:  # noqa: BLE001 - a broken entry just offers nothing
            continue
        found.update((n, e) for n, e in zip(payload["names"], rows) if n in wanted)
    return found


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
    return checked_rows(payload)


def checked_rows(payload: dict) -> Tensor:
    """A cache entry's ``(Q, E)`` embeddings, one per name.

    Raises:
        ValueError: not finite fp32 rows of unit length, one per name.
    """
    names, emb = payload.get("names"), payload.get("embeddings")
    if not isinstance(names, list) or not isinstance(emb, Tensor) or (
            emb.dtype != torch.float32 or emb.ndim != 2 or len(emb) != len(names)):
        raise ValueError(f"expected float32 ({len(names or ())}, E) embeddings")
    if not torch.isfinite(emb).all() or not torch.allclose(emb.norm(dim=-1),
                                                           torch.ones(len(emb)), atol=1e-3):
        raise ValueError("embeddings are not finite unit vectors")
    return emb
