"""The trunk cache: blocks 1…depth−1 of every window, on disk (``trunk_cache=DIR``).

A researcher's loop changes the last block and evaluates again; blocks 1…depth−1 see
the same windows every time. With ``trunk_cache=DIR`` each preprocessed image's trunk
outputs (the last block's input ``x``, plus the attention maps, hidden states and named
features that the chosen variants declare: ``borrows=``, ``hidden=``, ``features=``) are
stored once and read back on later runs. Layout::

    DIR/README.txt                               what this folder is, how to drop it
    DIR/<arch>-<model key>/manifest.json         what the key stands for
    DIR/<arch>-<model key>/<image hash>.safetensors   one entry per preprocessed image

The model key hashes the weights' identity, the tower's architecture, precision, device
kind, preprocessing (short side, window, stride) and storage dtype; the image hash is the
content of the preprocessed ``(3, Hr, Wr)`` tensor (mixed with the position-embedding rule
where it is not the default: ``entry_name``). An entry holds, per window-size group
``g``: ``g.x`` ``(n, N, D)``, ``g.early.<l>`` ``(n, heads, N, N)``, ``g.hidden.<l>``
``(n, N, D)``, ``g.<name>`` ``(n, ...)`` (a provider's feature; one with ``cache=False``
is computed on every run), with the windows' boxes and a checksum per tensor in its
metadata (``entry``: the file format). Entries are written to a temporary file and
renamed (parallel sweep jobs may write the same one); one that is unreadable, of
another layout, shape or checksum is recomputed with a warning, and so is a damaged
manifest rewritten. A write that fails (a full disk) is one warning per
run and cache: the run goes on with the entries there are and stores nothing more. The
cache adopts only a missing or empty folder or its own, and ``clear`` deletes only its
own files (``owned``).
An entry without a layer or feature a new variant needs is recomputed with the union.
``fp32`` keeps the trunk's own values (predictions identical to a run without the cache);
``fp16`` halves the size of an fp32 trunk, and the numbers may drift.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sclip_lab import segment
from sclip_lab.errors import ConfigError
from sclip_lab.features import cached_names
from sclip_lab.files import atomic_target, state_digest, write_json_atomic
from sclip_lab.model import TrunkOutput
from sclip_lab.trunk_cache.entry import FORMAT, Box, Layout, digest, read_entry, write_entry
from sclip_lab.trunk_cache.owned import (
    MANIFEST,
    MARKER,
    MARKER_HEAD,
    SUFFIX,
    check_adoptable,
    folder_usage,
    human,
    is_cache,
    read_manifest,
)
from sclip_lab.trunk_cache.owned import check_cache_dir as check_cache_dir  # for run's preflight

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16")
README = f"""\
{MARKER_HEAD}{FORMAT}): blocks 1…depth−1 of every evaluated window, one
folder per model/preprocessing (manifest.json says which), one .safetensors file per
image. Only speed depends on it. Show it:  python -m sclip_lab.trunk_cache info DIR
Drop it:  python -m sclip_lab.trunk_cache clear DIR   (or delete this folder)
"""

def check_dtype(name: Any) -> str:
    """``trunk_cache_dtype`` as one of ``DTYPES``, or ConfigError."""
    if name not in DTYPES:
        raise ConfigError(f"trunk_cache_dtype={name} is not one of {'|'.join(DTYPES)}")
    return str(name)


def storage_dtype(name: str, trunk: torch.dtype) -> torch.dtype:
    """What an entry stores: the trunk's own dtype (``fp32``: exact), or half precision for
    an fp32 trunk (``fp16``; an fp16/bf16 trunk is stored as it is, already 16-bit)."""
    lossy = check_dtype(name) == "fp16" and trunk == torch.float32
    return torch.float16 if lossy else trunk


def model_parts(info: Mapping[str, Any], visual: nn.Module, prep: Mapping[str, Any],
                dtype: torch.dtype) -> dict[str, Any]:
    """Everything the stored values depend on except the image itself (``dtype``: what
    entries store)."""
    if info.get("weights_sha256"):
        weights = f"sha256:{info['weights_sha256']}"
    elif str(info.get("pretrained") or "none") not in ("", "none"):
        weights = f"tag:{info['pretrained']}"
    else:
        weights = f"tensors:{state_digest(visual.state_dict())}"
    return {"format": FORMAT, "arch": info["arch"], "weights": weights,
            # the tower's structure (activation, widths) beyond what the arch name says
            "tower": hashlib.blake2b(repr(visual).encode(), digest_size=8).hexdigest(),
            "precision": info["precision"], "device": torch.device(info["device"]).type,
            "short_side": prep["short_side"], "window": prep["window"],
            "stride": prep["stride"], "dtype": str(dtype).removeprefix("torch.")}


def entry_name(image: Tensor, tag: str = "") -> str:
    """An entry's 32-hex name: the preprocessed image's digest, mixed with ``tag`` where a
    trunk setting differs from the default (the position-embedding rule of some heads),
    so that trunks of different settings never share an entry."""
    name = digest(image)
    if not tag:
        return name
    return hashlib.blake2b(f"{name}:{tag}".encode(), digest_size=16).hexdigest()


def folder_name(parts: Mapping[str, Any]) -> str:
    """``<arch>-<16 hex>``: readable, and distinct for any change of ``parts``."""
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{parts['arch']}-{key}"


def layout_of(boxes: Sequence[Box]) -> Layout:
    """An image's windows grouped by size, in the order ``encode`` batches them."""
    return list(segment.group_by_size(boxes).items())


def take(trunk: TrunkOutput, early: Iterable[int], hidden: Iterable[int],
         named: Iterable[str] = ()) -> TrunkOutput:
    """``trunk`` with only the given layers' maps and states and the given features."""
    return TrunkOutput(trunk.x, trunk.grid, {k: trunk.early[k] for k in early},
                       {k: trunk.hidden[k] for k in hidden}, trunk.images,
                       named={k: trunk.named[k] for k in named})


def split_by_image(groups: Sequence[Any], count: int) -> list[dict[tuple[int, int], TrunkOutput]]:
    """Computed window groups (``.owners`` ``[(image, box)]``, ``.trunk``) -> per image,
    window size -> its windows' TrunkOutput (an image's windows are contiguous in a group)."""
    out: list[dict] = [{} for _ in range(count)]
    for group in groups:
        rows: dict[int, list[int]] = {}
        for row, (i, _) in enumerate(group.owners):
            rows.setdefault(i, []).append(row)
        for i, r in rows.items():
            (y1, y2, x1, x2) = group.owners[r[0]][1]
            out[i][(y2 - y1, x2 - x1)] = group.trunk.select(r[0], r[-1] + 1)
    return out


@dataclass
class TrunkCache:
    """One model/preprocessing folder of the cache, and this run's hit/miss counts."""

    folder: Path
    dtype: torch.dtype  # what entries store
    trunk_dtype: torch.dtype  # what the encoder computes (loaded values are cast back)
    width: int  # D
    patch: int
    prefix: int = 1  # tokens before the grid: the CLS (0 on a MAP tower: timm_tower.py)
    hits: int = 0
    misses: int = 0
    stopped: str = ""  # why this run stores no more entries (a full disk); "" while it does

    def lookup(self, path: Path, layout: Layout, early: Sequence[int], hidden: Sequence[int],
               named: Sequence[str] = ()
               ) -> tuple[list[TrunkOutput] | None, set[int], set[int], set[str]]:
        """An entry's groups, or None with the layers and features it already holds (a
        broken entry: one warning, then it is recomputed like a missing one)."""
        if not path.is_file():
            return None, set(), set(), set()
        grids = [(h // self.patch, w // self.patch) for (h, w), _ in layout]
        try:
            return read_entry(path, layout, grids, early, hidden, self.dtype, self.width,
                              named, self.prefix)
        except ValueError as e:
            log.warning("trunk cache: recomputing the broken entry %s (%s)", path, e)
            return None, set(), set(), set()

    def store(self, path: Path, layout: Layout, parts: Sequence[TrunkOutput]) -> None:
        if self.stopped:
            return
        try:
            write_entry(path, layout, parts, self.dtype)
        except OSError as e:
            self.stop(e)

    def stop(self, error: OSError) -> None:
        """Store nothing more in this run, with one warning: a full disk (or any failing
        write) costs speed, never the evaluation; entries already there are still read."""
        self.stopped = error.strerror or str(error) or type(error).__name__
        log.warning("trunk cache: cannot write to %s (%s); going on without storing new "
                    "entries", self.folder, self.stopped)

    @torch.no_grad()
    def encode(self, images: Sequence[Tensor], boxes: Callable[[int, int], list[Box]],
               early: Sequence[int], hidden: Sequence[int],
               compute: Callable[..., list[Any]], device: torch.device, tag: str = "",
               features: Sequence[str] = ()
               ) -> list[tuple[list[tuple[int, Box]], TrunkOutput]]:
        """``Segmenter.encode`` through the cache -> ``[(owners, trunk)]`` per window size,
        in the order and batches of an uncached pass. ``compute(images, early, hidden,
        features=...)`` is that pass; it runs on the images that miss, with every layer and
        feature their old entries held too, so that an entry is rewritten with the union.
        ``tag``: a trunk setting beyond the model key (``entry_name``). Of ``features``
        only the stored ones are returned (``features.cached_names``)."""
        named = cached_names(features)
        layouts = [layout_of(boxes(img.shape[1], img.shape[2])) for img in images]
        paths = [self.folder / f"{entry_name(img, tag)}{SUFFIX}" for img in images]
        found, missing, all_early, all_hidden, all_named = ({}, [], set(early), set(hidden),
                                                            set(named))
        for i, (path, layout) in enumerate(zip(paths, layouts)):
            parts, has_early, has_hidden, has_named = self.lookup(path, layout, early, hidden,
                                                                  named)
            if parts is None:
                missing.append(i)
                all_early, all_hidden = all_early | has_early, all_hidden | has_hidden
                all_named |= set(cached_names(has_named))  # of providers registered here
            else:
                found[i] = dict(zip((size for size, _ in layout), parts))
        self.hits, self.misses = self.hits + len(found), self.misses + len(missing)
        if missing:
            groups = compute([images[i] for i in missing], tuple(sorted(all_early)),
                             tuple(sorted(all_hidden)), features=tuple(sorted(all_named)))
            for i, parts in zip(missing, split_by_image(groups, len(missing))):
                self.store(paths[i], layouts[i], [parts[size] for size, _ in layouts[i]])
                found[i] = {size: take(t, early, hidden, named) for size, t in parts.items()}
        return assemble(images, layouts, found, device, self.trunk_dtype)

    def summary(self) -> str:
        """One line for the end of a run: hits, misses and the folder's size."""
        count, size = folder_usage(self.folder)
        return (f"trunk cache: {self.hits} hits, {self.misses} misses; {self.folder}: "
                f"{count} entries, {human(size)}"
                + (f"; stored nothing new ({self.stopped})" if self.stopped else ""))


def assemble(images: Sequence[Tensor], layouts: Sequence[Layout],
             found: Mapping[int, Mapping[tuple[int, int], TrunkOutput]],
             device: torch.device, dtype: torch.dtype
             ) -> list[tuple[list[tuple[int, Box]], TrunkOutput]]:
    """Per window size (first-seen order), the owners and the concatenated trunk outputs
    of all images, on ``device`` in ``dtype``, with the windows' pixels as ``images``."""
    owners: dict[tuple[int, int], list] = {}
    parts: dict[tuple[int, int], list[TrunkOutput]] = {}
    for i, layout in enumerate(layouts):
        for size, boxes in layout:
            t = found[i][size]
            crops = torch.stack([images[i][:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
            owners.setdefault(size, []).extend((i, box) for box in boxes)
            parts.setdefault(size, []).append(TrunkOutput(
                t.x.to(device, dtype), t.grid,
                {k: v.to(device, dtype) for k, v in t.early.items()},
                {k: v.to(device, dtype) for k, v in t.hidden.items()}, crops.to(device),
                named={k: v.to(device, dtype if v.is_floating_point() else v.dtype)
                       for k, v in t.named.items()}))
    return [(owners[s], TrunkOutput.cat(parts[s])) for s in owners]


def open_cache(root: str | Path, dtype: str, encoder: Any, info: Mapping[str, Any],
               prep: Mapping[str, Any]) -> TrunkCache:
    """The cache folder of this model and preprocessing under ``root`` (created, with its
    README and manifest; when they cannot be written, one warning and a cache that only
    reads). ``encoder`` is the ``DenseEncoder``.

    Raises:
        ConfigError: ``root`` is a folder of other files (``owned.check_adoptable``).
    """
    root = check_adoptable(root)
    stored = storage_dtype(dtype, encoder.dtype)
    parts = model_parts(info, encoder.visual, prep, stored)
    cache = TrunkCache(root / folder_name(parts), stored, encoder.dtype,
                       int(encoder.width), int(encoder.patch), int(encoder.prefix))
    try:
        prepare_folder(root, cache.folder, parts)
    except OSError as e:
        cache.stop(e)
    return cache


def prepare_folder(root: Path, folder: Path, parts: Mapping[str, Any]) -> None:
    """The marker (what ``clear`` asks for), then the model folder and its manifest,
    rewritten with a warning when it is unreadable or says something else than ``parts``
    (a manifest heals like an entry).

    Raises:
        OSError: something could not be written.
    """
    if not is_cache(root):
        with atomic_target(root / MARKER) as tmp:
            tmp.write_text(README)
    folder.mkdir(exist_ok=True)
    path, want = folder / MANIFEST, json.loads(json.dumps(parts))
    if read_manifest(path) == want:
        return
    if path.exists():
        log.warning("trunk cache: rewriting the damaged manifest %s", path)
    write_json_atomic(path, parts)

