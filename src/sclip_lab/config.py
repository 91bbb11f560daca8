"""Where the Hydra configs live, the resolvers they use, and how a variant entry reads."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import sclip_lab.data  # noqa: F401 - registers dataset/base_dataset, the schema conf/dataset/ extends
from sclip_lab.errors import ConfigError
from sclip_lab.knobs import BLOCK_KNOBS

log = logging.getLogger("sclip_lab")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PAPER_SHORT_SIDE = {"cityscapes": 560}


def paper_short_side(dataset: str) -> int:
    """The paper's Table 1 short side: 336, Cityscapes 560 (docs/protocol.md §9)."""
    return PAPER_SHORT_SIDE.get(dataset, 336)


def local_kernel(window: int | None, kernel: int) -> int:
    """attention=local's size: ``kernel``, or the deprecated top-level ``window=`` if given."""
    if window is None:
        return kernel
    log.warning("window=%s names the local attention size by its old name: write kernel=%s "
                "(window= will go; preprocess.window is the crop)", window, window)
    return window


def by_dataset(name: str, default: Any, table: Mapping[str, Any] | None = None) -> Any:
    """A protocol's per-benchmark value: ``table[name]``, else ``default``
    (``${by_dataset:${dataset.name},336,{cityscapes:560}}``)."""
    return (table or {}).get(name, default)


def window_of(window: int | None, name: str, whole_image: Sequence[str] | None) -> int | None:
    """The sliding window of a protocol, or None (the whole image in one window) for the
    benchmarks it evaluates whole."""
    return None if name in (whole_image or ()) else window


def register_attention_schema() -> None:
    """``attention/base_attention``: the block knobs every attention file extends
    (``defaults: [base_attention, _self_]``); null = the variant's own block."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="attention", name="base_attention",
                                 node={k.name: None for k in BLOCK_KNOBS})


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("paper_short_side"):
        OmegaConf.register_new_resolver("paper_short_side", paper_short_side)
    for name, fn in (("by_dataset", by_dataset), ("window_of", window_of)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("local_kernel"):  # cached: the warning shows once
        OmegaConf.register_new_resolver("local_kernel", local_kernel, use_cache=True)


def variant_overrides(entry: str) -> list[str]:
    """``"local kernel=5"`` or ``"attention=local kernel=5"`` -> Hydra overrides."""
    tokens = shlex.split(str(entry))
    if not tokens:
        raise ConfigError("a variant entry is empty; write e.g. 'attention=local kernel=5'")
    if "=" not in tokens[0]:
        tokens[0] = f"attention={tokens[0]}"
    return tokens


register_resolvers()
register_attention_schema()
