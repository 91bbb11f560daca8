"""What a researcher reads on the console: the start banner, the per-class table (as
mmseg prints it), and third-party chatter kept out of the way.

open_clip logs through the root logger: a dozen INFO lines per model and tokenizer, and
"No pretrained weights loaded … initialized randomly" even when the lab loads a local
weights file right after building the model. ``quiet_open_clip`` drops those lines; the
lab says itself which weights it loaded (the banner).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import open_clip

_OPEN_CLIP_DIR = os.path.dirname(open_clip.__file__) + os.sep
# open_clip warns this when it builds a model without a hub tag; the lab then loads its
# own file (or says that the weights are random), so the line is wrong or repeated.
_RANDOM_INIT = "initialized randomly"
# open_clip logs these before it raises; the lab turns the error into its own one line.
_RAISED_NEXT = ("Failed to download", "Pretrained tag or path")


class _OpenClipChatter(logging.Filter):
    """Drop open_clip's INFO lines, its random-init warning and the download error it
    raises right after (``load_clip`` says it in one line); keep its other warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(_OPEN_CLIP_DIR):
            return True
        message = record.getMessage()
        return (record.levelno >= logging.WARNING and _RANDOM_INIT not in message
                and not any(phrase in message for phrase in _RAISED_NEXT))


_FILTER = _OpenClipChatter()


def quiet_open_clip() -> None:
    """Install the filter on the root logger, which open_clip logs to (idempotent)."""
    root = logging.getLogger()
    if _FILTER not in root.filters:
        root.addFilter(_FILTER)


def weights_text(info: Mapping[str, Any]) -> str:
    """``/path/ViT-B-16.pt (sha256 1a2b3c4d5e6f)``, ``hub tag openai`` or ``random``."""
    pretrained = str(info.get("pretrained", ""))
    if info.get("weights_sha256"):
        return f"{pretrained} (sha256 {info['weights_sha256'][:12]})"
    if pretrained in ("", "none"):
        return "random init (model.pretrained=none)"
    return f"hub tag {pretrained}"


def proxy_text(identity: Mapping[str, Any]) -> str:
    """``dino_vitb8 (vit_base_patch8_224.dino)  weights sha256 1a2b3c4d5e6f`` or
    ``clip_self: CLIP's stream after block 9``."""
    if identity.get("arch") is None:
        return f"{identity['proxy']}: CLIP's stream after block {identity['layer']}"
    weights = str(identity.get("weights"))
    text = f"sha256 {weights[:12]}" if len(weights) == 64 else f"hub tag {weights}"
    return f"{identity['proxy']} ({identity['arch']})  weights {text}"


def banner(rows: Sequence[tuple[str, str]]) -> str:
    """Aligned ``name  value`` lines under a title line."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def per_class_table(iou: Mapping[str, float | None], acc: Mapping[str, float | None],
                    summary: Mapping[str, float | None]) -> str:
    """mmseg's evaluation log, drawn as its PrettyTable draws it: one ``Class | IoU | Acc``
    row per class, then ``Summary:`` and the ``aAcc | mIoU | mAcc`` row.

    Values in percent, each shown as mmseg shows ``np.round(v, 2)`` (``93.32``, ``90.0``,
    ``nan`` for a class absent from the split or, for Acc, from its labels); columns
    centred and as wide as their widest cell."""
    rows = [(name, _mmseg_value(v), _mmseg_value(acc.get(name))) for name, v in iou.items()]
    summary_row = [_mmseg_value(summary.get(k)) for k in ("aAcc", "mIoU", "mAcc")]
    return "\n".join([*_pretty(("Class", "IoU", "Acc"), rows), "Summary:",
                      *_pretty(("aAcc", "mIoU", "mAcc"), [summary_row])])


def _mmseg_value(v: float | None) -> str:
    """``str(np.round(v, 2))``: round half to even at two decimals, shortest repr."""
    if v is None or v != v:
        return "nan"
    return str(round(v * 100) / 100)


def _pretty(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """PrettyTable's default look: ``+---+`` rules, cells centred as ``str.center``."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c.center(w)} " for c, w in zip(cells, widths)) + "|"

    return [rule, line(header), rule, *map(line, rows), rule]
