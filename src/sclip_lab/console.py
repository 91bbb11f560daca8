"""What a researcher reads on the console: the start banner, the per-class table, and
third-party chatter kept out of the way.

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


class _OpenClipChatter(logging.Filter):
    """Drop open_clip's INFO lines and its random-init warning; keep its other warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(_OPEN_CLIP_DIR):
            return True
        return record.levelno >= logging.WARNING and _RANDOM_INIT not in record.getMessage()


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


def per_class_table(per_class: Mapping[str, float | None], columns: int = 3) -> str:
    """mmseg-style console table: ``name  IoU`` cells, ``columns`` per line ("–" = absent
    from the split)."""
    cells = [f"{name[:22]:<22} {'–' if v is None else f'{v:6.2f}':>6}"
             for name, v in per_class.items()]
    return "\n".join("  " + "   ".join(cells[i:i + columns])
                     for i in range(0, len(cells), columns))
