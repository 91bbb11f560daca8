"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PAPER_SHORT_SIDE = {"cityscapes": 560}

# The parts of a resolved config that determine a run's numbers (top-level knobs such as
# n or window reach them by interpolation); speed, paths and logging are left out.
RESULT_KEYS = ("model", "dataset", "attention", "projection", "preprocess", "postprocess",
               "text", "precision", "limit")


def paper_short_side(dataset: str) -> int:
    """The paper's Table 1 short side: 336, Cityscapes 560 (docs/protocol.md §9)."""
    return PAPER_SHORT_SIDE.get(dataset, 336)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("paper_short_side"):
        OmegaConf.register_new_resolver("paper_short_side", paper_short_side)


def result_key(config: Mapping[str, Any]) -> str:
    """Hash of the result-relevant part of a resolved config (the sweep resume key)."""
    relevant = {k: config.get(k) for k in RESULT_KEYS}
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


register_resolvers()
