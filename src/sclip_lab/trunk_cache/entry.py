"""One trunk-cache entry on disk: a preprocessed image's trunk outputs as safetensors.

Per window-size group ``g``: ``g.x`` ``(n, N, D)``, ``g.early.<l>`` ``(n, heads, N, N)``,
``g.hidden.<l>`` ``(n, N, D)`` and ``g.<name>`` ``(n, ...)`` (a provider's named feature,
``sclip_lab.features``); the windows' boxes and a checksum per tensor in the metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from sclip_lab.features import TrunkOutput
from sclip_lab.files import atomic_target

FORMAT = "sclip-trunk-cache/1"
Box = tuple[int, int, int, int]
Layout = list[tuple[tuple[int, int], list[Box]]]  # window size -> its boxes, in group order


def digest(tensor: Tensor, size: int = 16) -> str:
    """blake2b of a tensor's dtype, shape and bytes."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=size)
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def entry_tensors(parts: Sequence[TrunkOutput], dtype: torch.dtype) -> dict[str, Tensor]:
    """Per group ``g`` (one TrunkOutput per window size): ``g.x``, ``g.early.<l>``,
    ``g.hidden.<l>``, ``g.<name>``, as fresh CPU tensors of ``dtype`` (safetensors refuses
    views; a non-floating feature keeps its own)."""
    out = {}
    for g, t in enumerate(parts):
        named = {"x": t.x, **{f"early.{k}": v for k, v in t.early.items()},
                 **{f"hidden.{k}": v for k, v in t.hidden.items()}, **t.named}
        for name, v in named.items():
            out[f"{g}.{name}"] = v.detach().to(
                "cpu", dtype if v.is_floating_point() else v.dtype, copy=True).contiguous()
    return out


def layers_of(keys: Iterable[str], kind: str) -> set[int]:
    """The layers of ``kind`` (early|hidden) among an entry's tensor names ``g.kind.l``."""
    return {int(k.split(".")[2]) for k in keys if k.split(".")[1] == kind}


def names_of(keys: Iterable[str]) -> set[str]:
    """The named features among an entry's tensor names ``g.<name>``."""
    return {k.split(".", 1)[1] for k in keys if k.split(".")[1] not in ("x", "early", "hidden")}


def fits(t: Tensor, shape: tuple, dtype: torch.dtype) -> bool:
    """``t`` is of ``dtype`` and ``shape`` (None: any size; a last ``...``: any further
    axes, and a non-floating ``t`` of its own dtype: a named feature)."""
    free = shape[-1] is Ellipsis
    want = shape[:-1] if free else shape
    rank = len(t.shape) >= len(want) if free else len(t.shape) == len(want)
    return (rank and (t.dtype == dtype or (free and not t.is_floating_point()))
            and all(w in (None, got) for w, got in zip(want, t.shape)))


def read_entry(path: Path, layout: Layout, grids: Sequence[tuple[int, int]],
               early: Sequence[int], hidden: Sequence[int], dtype: torch.dtype,
               width: int, named: Sequence[str] = (), prefix: int = 1
               ) -> tuple[list[TrunkOutput] | None, set[int], set[int], set[str]]:
    """One entry -> (per window-size group a TrunkOutput without ``images``, or None when
    a requested layer or feature is missing; the early and hidden layers and the named
    features the entry holds).

    Raises:
        ValueError: unreadable, another layout, a wrong shape, dtype or checksum.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            has_early, has_hidden = layers_of(keys, "early"), layers_of(keys, "hidden")
            has_named = names_of(keys)
            if meta.get("format") != FORMAT or json.loads(meta["boxes"]) != [
                    [list(b) for b in boxes] for _, boxes in layout]:
                raise ValueError("another format or window layout")
            if not (set(early) <= has_early and set(hidden) <= has_hidden
                    and set(named) <= has_named):
                return None, has_early, has_hidden, has_named
            sums = json.loads(meta["sums"])

            def get(name: str, shape: tuple) -> Tensor:
                t = f.get_tensor(name)
                if not fits(t, shape, dtype):
                    raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}, not {shape}")
                if digest(t) != sums[name]:
                    raise ValueError(f"{name}: checksum mismatch")
                return t

            out = []
            for g, ((_, boxes), grid) in enumerate(zip(layout, grids)):
                n, tokens = len(boxes), prefix + grid[0] * grid[1]  # prefix: the CLS
                out.append(TrunkOutput(
                    get(f"{g}.x", (n, tokens, width)), grid,
                    {k: get(f"{g}.early.{k}", (n, None, tokens, tokens)) for k in early},
                    {k: get(f"{g}.hidden.{k}", (n, tokens, width)) for k in hidden},
                    named={k: get(f"{g}.{k}", (n, ...)) for k in named}))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure means a broken entry
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None
    return out, has_early, has_hidden, has_named


def write_entry(path: Path, layout: Layout, parts: Sequence[TrunkOutput],
                dtype: torch.dtype) -> int:
    """Write one entry atomically (readers see the old file or the new one) -> bytes.

    Raises:
        OSError: it could not be written (safetensors' own I/O errors included).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = entry_tensors(parts, dtype)
    meta = {"format": FORMAT, "boxes": json.dumps([[list(b) for b in boxes]
                                                   for _, boxes in layout]),
            "sums": json.dumps({k: digest(v) for k, v in tensors.items()})}
    with atomic_target(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as e:  # a full disk, reported by its Rust writer: its cause
            raise OSError(str(e).rsplit("I/O error: ", 1)[-1]) from None
        size = tmp.stat().st_size
    return size
